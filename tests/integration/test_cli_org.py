"""Governance through the CLI on a real node: organisations join by members' approval.

With one founding member its proposal alone is a majority; once there are two
members a proposal stays "proposed" until the second approves. Refusals (double
approval, a proposal signed by a non-member) are clear errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from helpers import NodeHandle, run_cli, running_node

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("gov") / "home", staff=False) as n:
        yield n


def _ok(*args: str) -> str:
    res = run_cli(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _joiner(node: NodeHandle, root: Path, org_id: str, name: str) -> Path:
    """A joining organisation: its own home on the network's genesis, and its descriptor."""
    home = root / org_id
    _ok("init", "--home", str(home), "--org-id", org_id, "--org-name", name,
        "--genesis", str(node.home / "genesis.json"))
    descriptor = root / f"{org_id}.json"
    descriptor.write_text(_ok("org", "describe", "--home", str(home)))
    doc = orjson.loads(descriptor.read_bytes())
    assert doc["id"] == org_id and len(doc["sign_pub"]) == 43 and len(doc["enc_pub"]) == 43
    return home


def _orgs(node: NodeHandle) -> dict[str, dict[str, object]]:
    return {o["id"]: o for o in orjson.loads(_ok("org", "list", "--node", node.url, "--json"))}


def test_members_admit_organisations_by_majority(node: NodeHandle, tmp_path: Path) -> None:
    clinic = _joiner(node, tmp_path, "org-clinic", "City Clinic")
    res = run_cli("org", "propose", "--home", str(node.home), str(tmp_path / "org-clinic.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "now active" in res.stdout  # 1 of 1 members approved
    assert "names no CometBFT node" in res.stderr  # described without --cometbft-home
    assert _orgs(node)["org-clinic"]["status"] == "active"

    _joiner(node, tmp_path, "org-lab", "Lakeside Lab")
    out = _ok("org", "propose", "--home", str(node.home), str(tmp_path / "org-lab.json"))
    assert "now proposed" in out  # 1 of 2: not a majority
    assert _orgs(node)["org-lab"]["status"] == "proposed"

    out = _ok("org", "approve", "--home", str(clinic), "--node", node.url, "org-lab")
    assert "now active" in out
    lab = _orgs(node)["org-lab"]
    assert lab["status"] == "active" and lab["approvals"] == ["org-clinic", "org-stmary"]

    again = run_cli("org", "approve", "--home", str(clinic), "--node", node.url, "org-lab")
    assert again.returncode == 1 and "already active" in again.stderr


def test_non_member_cannot_propose(node: NodeHandle, tmp_path: Path) -> None:
    outsider = _joiner(node, tmp_path, "org-outsider", "Nobody's Clinic")
    res = run_cli("org", "propose", "--home", str(outsider), "--node", node.url,
                  str(tmp_path / "org-outsider.json"))
    # not a member: it cannot even authenticate to submit (the ledger is members-only)
    assert res.returncode == 1 and "not registered" in res.stderr
    assert "org-outsider" not in _orgs(node)


def _ledger_copy(node: NodeHandle, into: Path) -> None:
    """A consistent copy of the running node's ledger and sealed blobs (SQLite online
    backup): the blobs stand in for what replication brings a running member (ADR 4)."""
    import sqlite3
    for name in ("ledger.db", "blobs.db"):
        target = into / name
        target.unlink(missing_ok=True)
        src, dst = sqlite3.connect(node.home / name), sqlite3.connect(target)
        with dst:
            src.backup(dst)
        src.close()
        dst.close()


def test_late_member_gets_keys_by_rewrap(tmp_path: Path) -> None:
    """Records sealed before an organisation joined open for it once a member re-wraps."""
    from helpers import PASSWORD

    from medledger.core import state as st
    from medledger.errors import Forbidden
    from medledger.node.runtime import open_node

    with running_node(tmp_path / "stmary", patients=1, n_encounters=1) as node:
        clinic = _joiner(node, tmp_path, "org-clinic", "City Clinic")
        _ok("org", "propose", "--home", str(node.home), str(tmp_path / "org-clinic.json"))

        _ledger_copy(node, clinic)
        late = open_node(str(clinic), PASSWORD)
        metas = [orjson.loads(v) for _, v in late.store.scan("rec/Observation/")]
        assert metas
        with pytest.raises(Forbidden, match="re-wrapped"):
            late.decrypt(metas[0])
        late.store.close()

        out = _ok("org", "rewrap", "--home", str(node.home), "org-clinic")
        assert re.search(r"re-wrapped (\d+) record versions", out)
        again = _ok("org", "rewrap", "--home", str(node.home), "org-clinic")
        assert "re-wrapped 0 record versions" in again  # nothing left to do

        _ledger_copy(node, clinic)
        late = open_node(str(clinic), PASSWORD)
        with node.client("dr-house") as c:
            for meta in metas:
                served = c.get(f"/fhir/Observation/{meta['id']}")
                assert late.decrypt(st.record_head(late.store, "Observation", meta["id"])
                                    or {}) == served
        late.store.close()
