"""Search at scale: the encrypted index with 1M (``--full``: 10M) resources.

Index rows are built directly — synthetic Patients and Observations through the real
extractor (``search.extract``, on worker processes) into the real SQLCipher index —
not through the ledger, so a million resources take minutes. Queries then run through
the real engine (parse, plan, keyset paging, ``_include``…) with a host whose policy
allows everything and whose "decryption" regenerates the resource and AES-GCM-opens a
2 KiB blob (the read path's cost, measured on its own in the read figure).

    python -m bench.search                      # 1M resources (100k patients)
    python -m bench.search --resources 10000000 # 10M (1M patients)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.stats import peak_rss_mib
from medledger.core import policy
from medledger.core.state import MemoryState
from medledger.search.engine import Cursors, Engine, Scope
from medledger.search.extract import Extracted, extract
from medledger.search.index import SearchIndex
from medledger.search.matching import (
    blocking_keys,
    candidate_ids,
    keys_stale,
    mark_keys_current,
    refresh_keys,
    score,
)

SYLLABLES = ("an", "ber", "cal", "dor", "el", "fen", "gar", "hol", "is", "jor", "kel", "lin",
             "mar", "nor", "ol", "pen", "quin", "ros", "sol", "tor", "ul", "ven", "wil", "yor",
             "zan", "bro", "chi", "dra", "fel", "gri")
GIVEN = ("Anna", "Ben", "Carla", "David", "Eva", "Felix", "Greta", "Hugo", "Ida", "Jon",
         "Kira", "Liam", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Umar",
         "Vera", "Will", "Xena", "Yusuf", "Zoe", "Robert", "Elizabeth", "James", "Mary",
         "Michael", "Linda", "William", "Patricia", "Thomas", "Susan")
CITIES = tuple(f"City{i}" for i in range(60))
LOINC = [("8867-4", "/min"), ("8480-6", "mm[Hg]"), ("29463-7", "kg"), ("8302-2", "cm"),
         ("39156-5", "kg/m2"), ("2339-0", "mg/dL"), ("4548-4", "%"), ("2093-3", "mg/dL"),
         ("718-7", "g/dL"), ("6690-2", "10*3/uL"), ("8310-5", "Cel"), ("9279-1", "/min"),
         ("2571-8", "mg/dL"), ("18262-6", "mg/dL"), ("2085-9", "mg/dL"), ("33914-3", "mL/min"),
         ("789-8", "10*6/uL"), ("785-6", "pg"), ("786-4", "g/dL"), ("787-2", "fL")]
LOINC += [(f"{10000 + i}-{i % 10}", "1") for i in range(40)]  # a long tail of rare codes
WEIGHTS = [1.0 / (i + 1) for i in range(len(LOINC))]  # Zipf: a few codes are most rows
_ZIPF = [i for i, w in enumerate(WEIGHTS) for _ in range(round(w * 120))]  # lookup table
YEAR_MS = 365 * 86_400_000
T2000 = 946_684_800_000
MRN = "urn:oid:2.16.840.1.113883.4.3.25"
AES = AESGCM(b"\x07" * 32)
NONCE = b"\x01" * 12
BLOB = AES.encrypt(NONCE, os.urandom(2048), b"")


class _Mix:
    """A cheap deterministic stream of numbers from a seed (the resources are regenerated
    for every "decryption", so ``random.Random(seed)``'s ~70 µs seeding would dominate)."""

    def __init__(self, seed: int) -> None:
        self.x = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF

    def randrange(self, n: int) -> int:
        self.x = (self.x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        return (self.x >> 33) % n

    def choice(self, items: Any) -> Any:
        return items[self.randrange(len(items))]

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.randrange(1_000_000) / 1_000_000

    def weighted(self, items: list[Any]) -> Any:
        return items[_ZIPF[self.randrange(len(_ZIPF))]]


def family_of(i: int) -> str:
    r = _Mix(i * 7919)
    n = r.choice((2, 2, 3))
    return "".join(r.choice(SYLLABLES) for _ in range(n)).capitalize()


def patient(i: int) -> dict[str, Any]:
    r = _Mix(i)
    birth = time.strftime("%Y-%m-%d", time.gmtime((r.randrange(90 * 365) - 40 * 365) * 86400))
    return {"resourceType": "Patient", "id": f"p{i}", "gender": r.choice(("male", "female")),
            "birthDate": birth, "name": [{"family": family_of(r.randrange(20_000)),
                                          "given": [r.choice(GIVEN)]}],
            "identifier": [{"system": MRN, "value": f"MRN{i:09d}"}],
            "telecom": [{"system": "phone", "value": f"555-{i % 10_000_000:07d}"}],
            "address": [{"city": r.choice(CITIES), "postalCode": f"{r.randrange(99999):05d}",
                         "line": [f"{r.randrange(999)} Main St"]}]}


def observation(j: int, n_patients: int) -> dict[str, Any]:
    r = _Mix(-j - 1)
    code, unit = r.weighted(LOINC)
    when = T2000 + r.randrange(25 * YEAR_MS)
    obs: dict[str, Any] = {
        "resourceType": "Observation", "id": f"o{j}", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                            "observation-category",
                                  "code": "vital-signs" if code[0] in "389" else "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": code},
        "subject": {"reference": f"Patient/p{r.randrange(n_patients)}"},
        "encounter": {"reference": f"Encounter/e{j // 8}"},
        "effectiveDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when / 1000)),
        "valueQuantity": {"value": round(r.uniform(1, 200), 1), "unit": unit,
                          "system": "http://unitsofmeasure.org", "code": unit}}
    return obs


def resource(kind: str, i: int, n_patients: int) -> dict[str, Any]:
    return patient(i) if kind == "p" else observation(i, n_patients)


def meta_of(r: dict[str, Any], n: int) -> dict[str, Any]:
    pid = r["id"] if r["resourceType"] == "Patient" else r["subject"]["reference"][8:]
    return {"type": r["resourceType"], "id": r["id"], "v": 1, "patient": pid,
            "category": "laboratory", "labels": [], "time_ns": (T2000 + n) * 1_000_000}


def _extract_chunk(args: tuple[str, int, int, int]) -> list[tuple[dict[str, Any],
                                                                    Extracted, list[str]]]:
    kind, start, stop, n_patients = args
    out = []
    for i in range(start, stop):
        r = resource(kind, i, n_patients)
        out.append((r, extract(r), sorted(blocking_keys(r)) if kind == "p" else []))
    return out


def _bounded_map(pool: ProcessPoolExecutor, fn: Callable[[Any], Any], jobs: list[Any],
                 ahead: int) -> Iterator[Any]:
    """``pool.map`` with at most ``ahead`` results waiting: ``Executor.map`` submits every
    job at once, so extraction that outruns the index writer piles its results up in
    memory (gigabytes at 10M resources)."""
    waiting: deque[Future[Any]] = deque()
    for job in jobs:
        waiting.append(pool.submit(fn, job))
        if len(waiting) >= ahead:
            yield waiting.popleft().result()
    while waiting:
        yield waiting.popleft().result()


def build(path: Path, n_resources: int, n_patients: int, workers: int,
          progress: Callable[[int], None] | None = None,
          key: bytes | None = None) -> tuple[SearchIndex, float]:
    index = SearchIndex(path, key or os.urandom(32))
    # Bulk build only: a page cache of up to a third of RAM (8 GiB at most) keeps the
    # index B-trees' random inserts off disk and SQLCipher's re-encryption at 10M; the
    # queries run later with the node's own cache size (a freshly opened index).
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    index.db.execute(f"PRAGMA cache_size=-{min(8 << 30, ram // 3) >> 10}")
    chunk = 5000
    jobs = [("p", s, min(s + chunk, n_patients), n_patients) for s in range(0, n_patients, chunk)]
    n_obs = n_resources - n_patients
    jobs += [("o", s, min(s + chunk, n_obs), n_patients) for s in range(0, n_obs, chunk)]
    t0 = time.perf_counter()
    done = 0
    with ProcessPoolExecutor(workers) as pool:
        for batch in _bounded_map(pool, _extract_chunk, jobs, ahead=2 * workers):
            keys = {r["id"]: k for r, _, k in batch}
            index.blocking_keys = lambda res: keys[res["id"]]  # noqa: B023 (this batch's)
            index.apply_extracted([(meta_of(r, done + n), v, r) for n, (r, v, _) in
                                   enumerate(batch)])
            done += len(batch)
            if progress:
                progress(done)
    index.set_height(1)
    mark_keys_current(index)
    index.checkpoint()
    index.db.execute("PRAGMA cache_size=-65536")  # back to the node's (SearchIndex's)
    index.db.execute("ANALYZE")
    return index, time.perf_counter() - t0


class Host:
    """Policy: allow. Decryption: regenerate the resource + open a 2 KiB AES-GCM blob."""

    def __init__(self, n_patients: int) -> None:
        self.n_patients = n_patients
        self.store = _Heads(n_patients)

    def decide(self, session: Any, meta: dict[str, Any], bg: str | None) -> policy.Decision:
        return policy.Decision(True, "care", "")

    def decrypt(self, meta: dict[str, Any]) -> dict[str, Any]:
        AES.decrypt(NONCE, BLOB, b"")
        i = int(meta["id"][1:])
        return resource("p" if meta["type"] == "Patient" else "o", i, self.n_patients)


class _Heads(MemoryState):
    """Ledger heads computed on demand (``rec/{type}/{id}``), not held in memory."""

    def __init__(self, n_patients: int) -> None:
        super().__init__()
        self.n_patients = n_patients

    def get(self, key: str) -> bytes | None:
        from medledger.crypto.canonical import canonical
        _, rtype, rid = key.split("/", 2)
        i = int(rid[1:])
        if rtype == "Patient":
            pid = rid
        else:  # the subject is the third draw of the observation's stream
            r = _Mix(-i - 1)
            r.randrange(1)
            r.randrange(1)
            pid = f"p{r.randrange(self.n_patients)}"
        return canonical({"type": rtype, "id": rid, "v": 1, "patient": pid,
                          "category": "laboratory", "labels": [],
                          "time_ns": (T2000 + i) * 1_000_000})


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": round(statistics.median(s) * 1000, 2),
            "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 2),
            "n": len(s)}


class _Work:
    """SQLite virtual-machine instructions run by the index's search connection (counted
    in thousands through a progress handler): the work of a query, whatever the load."""

    def __init__(self, index: SearchIndex) -> None:
        self.kinstr = 0
        index.rdb.set_progress_handler(self._tick, 1000)

    def _tick(self) -> int:
        self.kinstr += 1
        return 0  # go on


def _timed(fn: Callable[[], Any], n: int, work: _Work) -> dict[str, float]:
    for _ in range(min(5, n)):
        fn()
    samples, kinstr = [], []
    for _ in range(n):
        k0 = work.kinstr
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        kinstr.append(work.kinstr - k0)
    kinstr.sort()
    return {**_percentiles(samples), "vm_kinstr_p50": kinstr[len(kinstr) // 2],
            "vm_kinstr_p99": kinstr[min(len(kinstr) - 1, int(len(kinstr) * 0.99))]}


def queries(index: SearchIndex, n_resources: int, n_patients: int, reps: int
            ) -> dict[str, Any]:
    engine = Engine(index, Cursors(os.urandom(32)), lambda: T2000 + 27 * YEAR_MS)
    host = Host(n_patients)
    r = random.Random(42)
    scope = Scope(object(), None, None)

    def search(rtype: str, items: list[tuple[str, str]]) -> Any:
        q = engine.parse(rtype, items, True)
        return engine.run(host, q, items, scope)  # type: ignore[arg-type]

    def family_birth() -> Any:
        p = patient(r.randrange(n_patients))
        return search("Patient", [("family", p["name"][0]["family"]),
                                  ("birthdate", p["birthDate"])])

    def identifier() -> Any:
        return search("Patient", [("identifier", f"{MRN}|MRN{r.randrange(n_patients):09d}")])

    def patient_code_date() -> Any:
        code = r.choices(LOINC[:10])[0][0]
        return search("Observation", [("patient", f"p{r.randrange(n_patients)}"),
                                      ("code", f"http://loinc.org|{code}"),
                                      ("date", "ge2010-01-01")])

    def type_wide_code() -> Any:
        code = r.choices(LOINC, WEIGHTS)[0][0]
        return search("Observation", [("code", code), ("_count", "50")])

    def match_new() -> Any:
        p = patient(r.randrange(n_patients))
        p = {**p, "id": "new", "identifier": [], "telecom": []}  # a returning patient, no MRN
        found = [host.decrypt({"type": "Patient", "id": pid})
                 for pid in candidate_ids(index, p)]
        return score(p, found)

    out: dict[str, Any] = {}
    work = _Work(index)
    for name, fn in (("Patient?family=&birthdate=", family_birth),
                     ("Patient?identifier=", identifier),
                     ("Observation?patient=&code=&date=ge", patient_code_date),
                     ("Observation?code=&_count=50 (type-wide)", type_wide_code),
                     ("$match of a new patient", match_new)):
        out[name] = _timed(fn, reps, work)
    out["paged walk 10,000 results (_count=100)"] = walk(engine, host, 10_000)
    return out


def walk(engine: Engine, host: Host, n: int) -> dict[str, Any]:
    items: list[tuple[str, str]] = [("code", LOINC[0][0]), ("_count", "100")]
    pages: list[float] = []
    seen = 0
    cursor = None
    t_start = time.perf_counter()
    while seen < n:
        page_items = [*items, *([("_page", cursor)] if cursor else [])]
        t0 = time.perf_counter()
        q = engine.parse("Observation", page_items, True)
        res = engine.run(host, q, page_items, Scope(object(), None, None))  # type: ignore
        pages.append(time.perf_counter() - t0)
        seen += len(res.found)
        cursor = res.next_cursor
        if cursor is None:
            break
    total = time.perf_counter() - t_start
    return {**_percentiles(pages), "results": seen, "total_s": round(total, 2)}


def extraction_cost(limit: int = 400) -> dict[str, float]:
    """µs per resource to extract every index value of real Synthea resources (the two
    test patients), fast path vs fhirpathpy alone."""
    import gzip

    import orjson
    data = Path(__file__).resolve().parent.parent / "tests" / "integration" / "data"
    resources = [e["resource"] for f in sorted(data.glob("synthea-*.json.gz"))
                 for e in orjson.loads(gzip.decompress(f.read_bytes()))["entry"]]
    for r in resources[:50]:
        extract(r)
        extract(r, fast=False)
    t0 = time.perf_counter()
    for r in resources:
        extract(r)
    fast = (time.perf_counter() - t0) / len(resources)
    sample = resources[::max(1, len(resources) // limit)]
    t0 = time.perf_counter()
    for r in sample:
        extract(r, fast=False)
    ref = (time.perf_counter() - t0) / len(sample)
    return {"resources": len(resources), "fast_us": round(fast * 1e6),
            "fhirpathpy_us": round(ref * 1e6), "speedup": round(ref / fast, 1)}


def _open_or_build(n_resources: int, workers: int, progress: Callable[[int], None],
                   tmp: Path, keep: Path | None) -> tuple[SearchIndex, float]:
    """The index to query and its build time: built in ``tmp``, or with ``keep`` the one
    kept in that folder for this size (built and kept there the first time)."""
    n_patients = max(1, n_resources // 10)
    if keep is None:
        return build(tmp / "index.db", n_resources, n_patients, workers, progress)
    keep.mkdir(parents=True, exist_ok=True)
    db, meta = keep / f"index-{n_resources}.db", keep / f"index-{n_resources}.json"
    if meta.exists():
        kept = json.loads(meta.read_text())
        index = SearchIndex(db, bytes.fromhex(kept["key"]))
        if keys_stale(index):  # kept from before a change of blocking keys: recompute
            for start in range(0, n_patients, 50_000):
                refresh_keys(index, (patient(i) for i in
                                     range(start, min(start + 50_000, n_patients))))
                progress(start)
            mark_keys_current(index)
            index.checkpoint()
        return index, float(kept["build_s"])
    for stale in keep.glob(f"index-{n_resources}.db*"):
        stale.unlink()
    key = os.urandom(32)
    index, build_s = build(db, n_resources, n_patients, workers, progress, key)
    meta.write_text(json.dumps({"key": key.hex(), "build_s": build_s}))
    return index, build_s


def run(n_resources: int, reps: int = 1000, workers: int = 2, work: Path | None = None,
        log: Callable[[str], None] = print, keep: Path | None = None) -> dict[str, Any]:
    """Build (or, with ``keep``, reuse) an index of ``n_resources`` and time the queries.

    ``keep`` keeps the built index in that folder, so that it can be built once (slow)
    and queried again later, e.g. on a quieter machine."""
    n_patients = max(1, n_resources // 10)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        last = [time.perf_counter()]

        def progress(done: int) -> None:
            if time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                log(f"  indexed {done:,}/{n_resources:,}")

        index, build_s = _open_or_build(n_resources, workers, progress, Path(tmp), keep)
        size = index.size_bytes()
        rows = {t: index.query(f"SELECT count(*) FROM {t}")[0][0]
                for t in ("res", "s", "t", "d", "q", "r", "c", "blk")}
        log(f"  built {n_resources:,} resources in {build_s:.0f}s "
            f"({n_resources / build_s:,.0f}/s), {size / 2**20:,.0f} MiB")
        figures = queries(index, n_resources, n_patients, reps)
        index.close()
    cost = extraction_cost()
    log(f"  extraction on Synthea: {cost}")
    return {"resources": n_resources, "patients": n_patients, "build_s": round(build_s, 1),
            "build_per_s": round(n_resources / build_s), "index_mib": round(size / 2**20, 1),
            "bytes_per_resource": round(size / n_resources), "rows": rows,
            "queries": figures, "extraction": cost, "peak_rss_mib": peak_rss_mib()}


def iter_sizes(full: bool) -> Iterator[int]:
    yield 1_000_000
    if full:
        yield 10_000_000


def _print_every_100k(done: int) -> None:
    if done % 100_000 < 5000:
        print(f"  indexed {done:,}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resources", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=1000,
                    help="queries of each kind (the p99 is the 1%% slowest of them)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the built index in this folder and reuse it on the next run")
    ap.add_argument("--build-only", action="store_true", help="with --keep: build, no queries")
    args = ap.parse_args()
    if args.build_only:
        if args.keep is None:
            ap.error("--build-only needs --keep")
        with tempfile.TemporaryDirectory() as tmp:
            index, build_s = _open_or_build(args.resources, args.workers, _print_every_100k,
                                            Path(tmp), args.keep)
        index.close()
        print(f"index of {args.resources:,} in {args.keep} (built in {build_s:.0f}s)")
        return
    res = run(args.resources, args.reps, args.workers, keep=args.keep)
    for name, fig in res["queries"].items():
        print(f"{name:45s} {fig}")
    print({k: v for k, v in res.items() if k != "queries"})


if __name__ == "__main__":
    main()
