"""The ``medledger`` CLI against a real node: record export (client-side decryption),
consent restrict/list/revoke signed with the patient's own key, record get, audit log."""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from helpers import NodeHandle, load_patient, run_cli, running_node

from medledger.fhir.synthetic import synthetic_observation

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("cli") / "home") as n:
        load_patient(n, 1, n_encounters=2)
        yield n


@pytest.fixture(scope="module")
def key(node: NodeHandle) -> Path:
    return node.home / "keystores" / "users" / f"{node.patients[0]}.json"


def _served(node: NodeHandle) -> dict[tuple[str, str], dict[str, Any]]:
    with node.login(node.patients[0]) as h:
        doc = h.get(f"/fhir/Patient/{node.patients[0]}/$everything").json()
    return {(e["resource"]["resourceType"], e["resource"]["id"]): e["resource"]
            for e in doc["entry"] if e["search"]["mode"] == "match"}


def test_record_export_equals_what_the_node_serves(node: NodeHandle, key: Path,
                                                  tmp_path: Path) -> None:
    pid = node.patients[0]
    obs = synthetic_observation(pid, 9)
    with node.client("dr-house") as c:  # a second version: export must give the head
        c.request("PUT", f"/fhir/Observation/{obs['id']}", obs)
        c.request("PUT", f"/fhir/Observation/{obs['id']}",
                  {**obs, "valueQuantity": {**obs["valueQuantity"], "value": 77}})
    out = tmp_path / "export.json"
    out.write_text("{}")
    out.chmod(0o644)  # an old world-readable file there: replaced by a private one
    res = run_cli("record", "export", "--node", node.url, "--key", str(key), "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # decrypted PHI: this user only
    bundle = orjson.loads(out.read_bytes())
    assert bundle["resourceType"] == "Bundle"
    exported = {(e["resource"]["resourceType"], e["resource"]["id"]): e["resource"]
                for e in bundle["entry"]}
    served = _served(node)
    assert exported.keys() == served.keys()
    for ref, resource in served.items():
        assert exported[ref] == resource, ref
    assert exported[("Observation", obs["id"])]["valueQuantity"]["value"] == 77


def test_export_with_a_wrong_password(node: NodeHandle, key: Path, tmp_path: Path) -> None:
    res = run_cli("record", "export", "--node", node.url, "--key", str(key), "--out",
                  str(tmp_path / "x.json"), MEDLEDGER_KEY_PASSWORD="not-the-password")
    assert res.returncode == 1 and "wrong password" in res.stderr
    assert "Traceback" not in res.stderr


def test_export_with_someone_elses_key(node: NodeHandle, tmp_path: Path) -> None:
    nurse_key = node.home / "demo-keys" / "nurse-joy.json"
    res = run_cli("record", "export", "--node", node.url, "--key", str(nurse_key), "--out",
                  str(tmp_path / "x.json"))
    assert res.returncode == 1 and "403" in res.stderr


def test_consent_cli(node: NodeHandle, key: Path) -> None:
    served = _served(node)
    vital = next(r for r in served.values() if r["resourceType"] == "Observation" and any(
        c.get("code") == "vital-signs" for cat in r["category"] for c in cat["coding"]))
    path = f"/fhir/Observation/{vital['id']}"

    def nurse_status() -> int:
        with node.client("nurse-joy") as c:
            return c.http.get(path, headers={"Authorization": f"Bearer {c.token()}"}
                              ).status_code

    assert nurse_status() == 200
    res = run_cli("consent", "restrict", "--node", node.url, "--key", str(key),
                  "--category", "vital-signs", "--practitioner", "nurse-joy")
    assert res.returncode == 0, res.stdout + res.stderr
    cid = re.search(r"consent ([0-9a-f-]{36})", res.stdout)
    assert cid, res.stdout
    assert nurse_status() == 403
    listed = run_cli("consent", "list", "--node", node.url, "--key", str(key))
    assert listed.returncode == 0 and cid.group(1)[:8] in listed.stdout
    res = run_cli("consent", "revoke", "--node", node.url, "--key", str(key), cid.group(1))
    assert res.returncode == 0, res.stderr
    assert nurse_status() == 200
    bad = run_cli("consent", "restrict", "--node", node.url, "--key", str(key),
                  "--category", "no-such-category")
    assert bad.returncode == 1 and "no-such-category" in bad.stderr


def test_record_get_and_audit_log(node: NodeHandle, key: Path) -> None:
    pid = node.patients[0]
    nurse_key = node.home / "demo-keys" / "nurse-joy.json"
    res = run_cli("record", "get", "--node", node.url, "--key", str(nurse_key),
                  f"Patient/{pid}")
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout)["id"] == pid
    denied = run_cli("record", "get", "--node", node.url, "--key", str(nurse_key),
                     f"Condition?patient={pid}")
    assert denied.returncode == 0 and "withheld" in denied.stdout
    log = run_cli("audit", "log", "--node", node.url, "--key", str(key), "--count", "200")
    assert log.returncode == 0, log.stderr
    assert "nurse-joy" in log.stdout


def test_cli_cannot_reach_node(key: Path) -> None:
    res = run_cli("record", "export", "--node", "http://127.0.0.1:9", "--key", str(key))
    assert res.returncode == 1 and "cannot reach" in res.stderr


_ = httpx
