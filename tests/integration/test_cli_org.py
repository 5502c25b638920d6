"""Governance through the CLI on a real node: organisations join by members' approval.

With one founding member its proposal alone is a majority; once there are two
members a proposal stays "proposed" until the second approves. Refusals (double
approval, a proposal signed by a non-member) are clear errors.
"""

from __future__ import annotations

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
    out = _ok("org", "propose", "--home", str(node.home), str(tmp_path / "org-clinic.json"))
    assert "now active" in out  # 1 of 1 members approved
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
    assert res.returncode == 1 and "unknown signer" in res.stderr
    assert "org-outsider" not in _orgs(node)
