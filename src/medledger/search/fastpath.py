"""A fast evaluator for the simple FHIRPath expressions most search parameters use.

``fhirpathpy`` is the reference evaluator (~45 µs a call here: too slow to index
1,500 resources/s). Most registry expressions are unions of dotted paths, with an
optional ``as``/``.as(T)`` on a choice element or ``.where(field='literal')``;
``compile_path`` turns those into plain dict walks and returns None for anything
else (the caller then uses fhirpathpy). ``tests/unit/test_search_fastpath.py``
proves on every Synthea resource and on test vectors that both return the same
values.

Element types come from fhirpathpy's own R4 model (``path2Type``,
``choiceTypePaths``), so choice elements expand exactly as fhirpathpy expands them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson
from fhirpathpy.models import models

Evaluator = Callable[[Any], list[Any]]
_MODEL = models["r4"]
_CHOICES: dict[str, list[str]] = _MODEL["choiceTypePaths"]
_PATH_TYPE: dict[str, str] = _MODEL["path2Type"]
_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_IDENT = r"[A-Za-z][A-Za-z0-9]*"
_STEP = re.compile(rf"^\.({_IDENT})")
_AS_CALL = re.compile(rf"^\.ofType\(({_IDENT})\)")
_WHERE = re.compile(rf"^\.where\(({_IDENT})\s*=\s*'([^'\\]*)'\)")
_NON_ELEMENT = {"BackboneElement", "Element"}
# backbone elements (e.g. ``Observation.component``) have no entry of their own
_BACKBONES = {p.rsplit(".", 1)[0] for p in (*_PATH_TYPE, *_CHOICES) if "." in p}


def split_union(expression: str) -> list[str]:
    """Top-level ``|`` branches of an expression."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expression):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return parts


# A compiled branch: a list of steps. ("field", name, choices|None, path) navigates;
# ("as", type) keeps a choice's one type; ("where", field, literal) filters.
Step = tuple[Any, ...]


def _next_path(path: str, name: str) -> str:
    full = f"{path}.{name}"
    return _ELSEWHERE.get(full, full)


def _type_after(full: str) -> str:
    """Where navigation continues after ``full``: its datatype, or the path itself."""
    t = _PATH_TYPE.get(full)
    if t is None or t in _NON_ELEMENT or t.startswith("System."):
        return full
    return t


def _compile_branch(branch: str, start: str, relative: bool) -> list[Step] | None:
    if relative:
        rest, path = "." + branch, start
    else:
        if not branch.startswith(start) or branch[len(start):][:1] not in ("", "."):
            return None
        rest, path = branch[len(start):], start
    steps: list[Step] = []
    while rest:
        if (m := _AS_CALL.match(rest)) is not None:
            if not steps or steps[-1][0] != "field" or steps[-1][2] is None:
                return None
            steps.append(("as", m.group(1)))
            path = _as_path(m.group(1))
        elif (m := _WHERE.match(rest)) is not None:
            steps.append(("where", m.group(1), m.group(2)))
        elif (m := _STEP.match(rest)) is not None:
            name = m.group(1)
            full = _next_path(path, name)
            choices = _CHOICES.get(full)
            if choices is None and full not in _PATH_TYPE and full not in _BACKBONES:
                return None  # unknown element: let fhirpathpy decide
            steps.append(("field", name, choices, full))
            path = _type_after(full)
        else:
            return None
        rest = rest[m.end():]
    return steps


def _as_path(type_name: str) -> str:
    return type_name[0].upper() + type_name[1:]


def _keys_for(name: str, choices: list[str] | None) -> list[str]:
    if choices is None:
        return [name]
    return [name + c[0].upper() + c[1:] for c in choices]


# A step made ready to run: ("field", keys) navigates, reading whichever of the keys an
# item has (a choice element's ``as`` already narrowed them); ("where", field, literal)
# filters.
Ready = tuple[tuple[Any, ...], ...]


def _ready(steps: list[Step]) -> Ready:
    out: list[tuple[Any, ...]] = []
    for i, step in enumerate(steps):
        if step[0] == "field":
            _, name, choices, _ = step
            if i + 1 < len(steps) and steps[i + 1][0] == "as":
                t = steps[i + 1][1]
                out.append(("field", (name + t[0].upper() + t[1:],)))
            else:
                out.append(("field", tuple(_keys_for(name, choices))))
        elif step[0] == "where":
            out.append(step)
        # "as": applied by the field step before it
    return tuple(out)


def _run(steps: Ready, items: list[Any]) -> list[Any]:
    for step in steps:
        if step[0] == "where":
            _, field, literal = step
            items = [x for x in items if isinstance(x, dict) and x.get(field) == literal]
            continue
        out: list[Any] = []
        for item in items:
            if not isinstance(item, dict):
                continue
            for key in step[1]:
                value = item.get(key)
                if value is None:
                    continue
                if isinstance(value, list):
                    out.extend(value if None not in value else
                               [v for v in value if v is not None])
                else:
                    out.append(value)
        items = out
    return items


def _distinct(items: list[Any]) -> list[Any]:
    """FHIRPath ``|`` is a union: equal items appear once, first occurrence kept."""
    seen: set[bytes] = set()
    out = []
    for item in items:
        key = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _branch_keys(steps: list[Step]) -> tuple[str, ...] | None:
    """The keys a compiled branch reads first: () when it selects the node itself, None
    when it does not begin with an element (a filter first: not for the fast path)."""
    if not steps:
        return ()
    if steps[0][0] != "field":
        return None
    return tuple(_keys_for(steps[0][1], steps[0][2]))


def first_keys(expression: str, start: str) -> frozenset[str] | None:
    """The top-level keys a ``start`` resource must have one of for ``expression`` to
    select anything (``compile_path``'s evaluators return [] without one), or None when
    that is not known (not a simple expression, or a branch selecting the resource)."""
    keys: set[str] = set()
    for branch in split_union(expression):
        steps = _compile_branch(branch, start, False)
        first = None if steps is None else _branch_keys(steps)
        if not first:
            return None
        keys.update(first)
    return frozenset(keys)


def compile_path(expression: str, start: str, relative: bool = False) -> Evaluator | None:
    """A fast evaluator for ``expression`` on a ``start`` resource (or, ``relative``,
    on an element at path ``start``), or None when the expression is not simple."""
    branches: list[tuple[tuple[str, ...], Ready]] = []
    for branch in split_union(expression):
        steps = _compile_branch(branch, start, relative)
        first = None if steps is None else _branch_keys(steps)
        if steps is None or first is None:
            return None
        branches.append((first, _ready(steps)))

    if len(branches) == 1 and len(branches[0][0]) == 1:
        (key,), ready = branches[0]

        def evaluate_one(node: Any) -> list[Any]:
            # most parameters name elements a resource lacks: check the first key first
            if isinstance(node, dict) and key in node:
                return _run(ready, [node])
            return []

        return evaluate_one

    def evaluate(node: Any) -> list[Any]:
        out: list[Any] = []
        for first, branch_steps in branches:
            if not first:
                out.append(node)
            elif isinstance(node, dict) and any(k in node for k in first):
                out.extend(_run(branch_steps, [node]))
        return _distinct(out) if len(branches) > 1 else out

    return evaluate
