"""The search index at rest: encrypted (no plaintext in the file or its WAL), keyed from
the organisation key, rows replaced with new versions and removed on erasure; and
the patient-matching blocking keys find the candidates the match vectors need."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from medledger.crypto.keys import new_identity
from medledger.errors import StorageError
from medledger.search.index import SearchIndex, index_key
from medledger.search.matching import blocking_keys

SECRETS = ["Zebulon", "Quetzalcoatl", "1961-07-04", "MRN-88231", "Wolfeboro", "44261-6",
           "8480-6", "617-555-0199"]


def _patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "birthDate": "1961-07-04",
            "name": [{"family": "Quetzalcoatl", "given": ["Zebulon"]}],
            "identifier": [{"system": "urn:mrn", "value": "MRN-88231"}],
            "telecom": [{"system": "phone", "value": "617-555-0199"}],
            "address": [{"city": "Wolfeboro"}]}


def _obs(oid: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "subject": {"reference": "Patient/p"},
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "effectiveDateTime": "1961-07-04"}


def _meta(r: dict[str, Any], v: int = 1) -> dict[str, Any]:
    return {"type": r["resourceType"], "id": r["id"], "v": v, "patient": "p",
            "category": "laboratory", "labels": [], "time_ns": 10**18}


def test_no_plaintext_in_index_files(tmp_path: Path) -> None:
    org = new_identity("org-a", "org")
    index = SearchIndex(tmp_path / "index.db", index_key(org.enc_private), blocking_keys)
    rows = [_patient("p"), _obs("o1", "44261-6"), _obs("o2", "8480-6")]
    index.apply([(_meta(r), r) for r in rows], 7)
    assert index.query("SELECT count(*) FROM s")[0][0] > 0  # it did index them
    files = [p for p in tmp_path.iterdir() if p.name.startswith("index.db")]
    assert any(p.name.endswith("-wal") for p in files)  # the WAL is scanned too
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            for form in {secret, secret.lower()}:
                assert form.encode() not in data, f"{form!r} in {path.name}"
    index.checkpoint()
    data = (tmp_path / "index.db").read_bytes()
    assert not any(s.encode() in data for s in SECRETS)
    assert b"SQLite format 3" not in data[:16]
    index.close()
    reopened = SearchIndex(tmp_path / "index.db", index_key(org.enc_private))
    assert reopened.height == 7
    reopened.close()
    other = new_identity("org-b", "org")
    with pytest.raises(StorageError, match="wrong key"):
        SearchIndex(tmp_path / "index.db", index_key(other.enc_private))


def test_versions_replace_and_erasure_removes(tmp_path: Path) -> None:
    index = SearchIndex(tmp_path / "i.db", os.urandom(32), blocking_keys)
    o = _obs("o1", "1111-1")
    index.apply([(_meta(o), o)], 1)
    rid = index.query("SELECT rid FROM res")[0][0]
    o2 = _obs("o1", "2222-2")
    index.apply([(_meta(o2, 2), o2)], 2)
    assert index.query("SELECT DISTINCT code FROM t WHERE rid = ? AND code LIKE '%-%'", (rid,)) == [
        ("2222-2",)]
    assert index.query("SELECT rid, v FROM res") == [(rid, 2)]  # same row: stable paging
    index.remove("Observation", "o1")
    assert index.query("SELECT count(*) FROM res")[0][0] == 0
    assert all(index.query(f"SELECT count(*) FROM {t}")[0][0] == 0
               for t in ("s", "t", "tt", "d", "r", "q", "c"))
    index.close()


CASES = json.loads((Path(__file__).parent / "vectors" / "match_cases.json").read_text())[
    "cases"]


@pytest.mark.parametrize("case", [c for c in CASES if c["expected_grade"]],
                         ids=lambda c: c["name"])
def test_blocking_keys_find_every_graded_match_vector(case: dict[str, Any]) -> None:
    assert blocking_keys(case["candidate"]) & blocking_keys(case["existing"])


def test_blocking_keys_carry_no_id() -> None:
    keys = blocking_keys(_patient("p"))
    assert "fd:quetzalcoatl|1961-07-04" in keys and "id:urn:mrn|MRN-88231" in keys
    assert "phone:6175550199" in keys and all("p" != k for k in keys)


def test_a_patient_given_values_without_its_resource_is_refused(tmp_path: Path) -> None:
    """Values alone (a writer's hint) cannot make a Patient's blocking keys: indexing one
    without its resource fails and writes nothing, rather than a Patient $match misses."""
    from medledger.search.extract import extract
    index = SearchIndex(tmp_path / "index.db", os.urandom(32), blocking_keys)
    patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Quetzal"}],
               "birthDate": "1961-07-04"}
    meta = {"type": "Patient", "id": "p1", "v": 1, "patient": "p1", "category": "demographics",
            "labels": [], "time_ns": 1}
    with pytest.raises(ValueError, match="Patient/p1: indexed without its resource"):
        index.apply_extracted([(meta, extract(patient), None)], 1)
    assert index.query("SELECT count(*) FROM res") == [(0,)] and index.height == 0
    index.apply_extracted([(meta, extract(patient), patient)], 1)
    assert index.query("SELECT count(*) FROM blk")[0][0] > 0
    index.close()
