"""Differential check: the fast evaluator against fhirpathpy on real resources.

``compare(resource)`` evaluates every indexed parameter of the resource's type with
both evaluators and returns the differences (empty when they agree). Used by the
unit tests (vectors) and by ``python -m medledger.search.differential DIR`` over a
whole Synthea output folder.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from medledger.search import fastpath
from medledger.search.extract import (
    Extracted,
    add_composite,
    indexed_params,
    reference_evaluator,
)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return value
    return value


def _same(a: list[Any], b: list[Any]) -> bool:
    return orjson.dumps(_plain(a), option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        _plain(b), option=orjson.OPT_SORT_KEYS) or _numbers_equal(_plain(a), _plain(b))


def _numbers_equal(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_numbers_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_numbers_equal(x, y) for x, y in zip(a, b,
                                                                             strict=True))
    return bool(a == b)


def compare(resource: dict[str, Any]) -> list[str]:
    """Every parameter whose fast and reference values differ (empty when none do):
    raw FHIRPath results for simple parameters, index rows for composites."""
    rtype = str(resource.get("resourceType"))
    diffs = []
    for param in indexed_params(rtype):
        if param.type == "composite":
            fast_rows, ref_rows = Extracted(), Extracted()
            add_composite(fast_rows, param, resource, True)
            add_composite(ref_rows, param, resource, False)
            if fast_rows.composites != ref_rows.composites:
                diffs.append(f"{rtype}.{param.code}: composite rows differ")
            continue
        fast = fastpath.compile_path(param.path, rtype)
        if fast is None:
            continue
        want = reference_evaluator(param.path, rtype)(resource)
        got = fast(resource)
        if not _same(got, want):
            diffs.append(f"{rtype}.{param.code} ({param.path}): fast {_plain(got)!r} "
                         f"!= fhirpathpy {_plain(want)!r}")
    return diffs


def resources_in(folder: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        doc = orjson.loads(path.read_bytes())
        if doc.get("resourceType") == "Bundle":
            out.extend(e["resource"] for e in doc.get("entry", []) if "resource" in e)
        else:
            out.append(doc)
    return out


def _compare_all(resources: list[dict[str, Any]]) -> list[str]:
    return [d for r in resources for d in compare(r)]


def main(folder: str, jobs: int = 1) -> int:
    resources = resources_in(Path(folder))
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        chunks = [resources[i::jobs * 8] for i in range(jobs * 8)]
        with ProcessPoolExecutor(jobs) as pool:
            problems = [d for part in pool.map(_compare_all, chunks) for d in part]
    else:
        problems = _compare_all(resources)
    for p in problems[:50]:
        print(p)
    print(f"{len(resources)} resources, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1))
