"""SMART Health Links end to end: the portal API and the ``medledger share`` CLI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from helpers import NodeHandle, load_patient, run_cli, running_node

from medledger.fhir import shl

pytestmark = pytest.mark.timeout(150)
PASSCODE = "blue-42-otter"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("share") / "home") as n:
        load_patient(n, 1, n_encounters=2)
        yield n


@pytest.fixture(scope="module")
def own_records(node: NodeHandle) -> dict[str, dict[str, Any]]:
    with node.login(node.patients[0]) as h:
        doc = h.get(f"/fhir/Patient/{node.patients[0]}/$everything").json()
    return {e["resource"]["id"]: e["resource"] for e in doc["entry"]
            if e["search"]["mode"] == "match"}


def _create(node: NodeHandle, **body: Any) -> dict[str, Any]:
    with node.login(node.patients[0]) as h:
        resp = h.post("/api/shares", json=body)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def _manifest(link: str, recipient: str, passcode: str | None = None) -> httpx.Response:
    payload = shl.decode_shlink(link)
    return httpx.post(payload.url, json={"recipient": recipient, "passcode": passcode})


def _open(link: str, recipient: str, passcode: str | None = None) -> dict[str, Any]:
    resp = _manifest(link, recipient, passcode)
    assert resp.status_code == 200, resp.text
    payload = shl.decode_shlink(link)
    return dict(orjson.loads(shl.decrypt_jwe(resp.json()["files"][0]["embedded"],
                                             payload.key_bytes)))


def _access_log(node: NodeHandle) -> list[dict[str, Any]]:
    with node.login(node.patients[0]) as h:
        return list(h.get("/api/access-log?count=1000").json())


def _is_vital(r: dict[str, Any]) -> bool:
    return r["resourceType"] == "Observation" and any(
        c.get("code") == "vital-signs" for cat in r.get("category", [])
        for c in cat.get("coding", []))


def test_share_with_passcode(node: NodeHandle, own_records: dict[str, Any]) -> None:
    share = _create(node, selection={"categories": ["vital-signs"]}, passcode=PASSCODE,
                    expires_in_s=3600, label="for my cardiologist")
    assert share["shlink"].startswith("shlink:/")
    payload = shl.decode_shlink(share["shlink"])
    assert payload.flag and "P" in payload.flag and payload.exp == share["exp"]
    first = _manifest(share["shlink"], "Dr Guess", "wrong-one")
    second = _manifest(share["shlink"], "Dr Guess", "wrong-two")
    assert first.status_code == second.status_code == 401
    assert second.json()["remainingAttempts"] == first.json()["remainingAttempts"] - 1
    assert "attempts left" in first.json()["error"]
    bare = _manifest(share["shlink"], "Dr Guess")  # no passcode at all: costs no attempt
    assert bare.status_code == 401
    assert bare.json()["remainingAttempts"] == second.json()["remainingAttempts"]
    bundle = _open(share["shlink"], "Dr Heart, City Cardiology", PASSCODE)
    got = {e["resource"]["id"]: e["resource"] for e in bundle["entry"]}
    want = {i for i, r in own_records.items() if _is_vital(r)}
    assert set(got) == want and want
    assert all(got[i] == own_records[i] for i in got)  # what the node serves, nothing else
    everything_else = set(own_records) - want
    assert everything_else and not (everything_else & set(got))
    events = [e for e in _access_log(node) if e["subtype"] == "share-access"]
    assert any(e["outcome"] == "0" and "Dr Heart, City Cardiology" in e["detail"]
               for e in events)
    assert sum(1 for e in events if e["outcome"] != "0" and e["reason"] == "wrong passcode"
               and e["detail"] == "Dr Guess") == 2
    assert sum(1 for e in events if e["outcome"] != "0" and e["reason"] == "no passcode given"
               and e["detail"] == "Dr Guess") == 1


def _guess_until_locked(guess: Callable[[], httpx.Response]) -> list[Any]:
    """Up to 6 wrong-passcode attempts, stopping at the lock (410): each answer's
    ``remainingAttempts``."""
    remaining = []
    for _ in range(6):
        resp = guess()
        remaining.append(resp.json().get("remainingAttempts"))
        if resp.status_code == 410:
            break
    return remaining


def test_passcode_lockout(node: NodeHandle) -> None:
    share = _create(node, selection={"types": ["AllergyIntolerance"]}, passcode=PASSCODE,
                    expires_in_s=3600)
    remaining = _guess_until_locked(
        lambda: _manifest(share["shlink"], "Mallory", "guess-guess"))
    assert remaining[:5] == [4, 3, 2, 1, 0], remaining
    resp = _manifest(share["shlink"], "Mallory", PASSCODE)
    assert resp.status_code == 410 and "locked" in resp.text


def test_passcode_budget_holds_with_a_reused_idempotency_key(node: NodeHandle) -> None:
    """A guesser who sends every wrong passcode with the same Idempotency-Key gets each
    failure counted: the key made the node resubmit the first ``share.attempt`` (a
    replay, no new count), so a 4-digit passcode fell to unlimited guessing."""
    share = _create(node, selection={"types": ["AllergyIntolerance"]}, passcode=PASSCODE,
                    expires_in_s=3600)
    url = shl.decode_shlink(share["shlink"]).url
    remaining = _guess_until_locked(lambda: httpx.post(
        url, json={"recipient": "Mallory", "passcode": "guess-guess"},
        headers={"Idempotency-Key": "same-key-every-time"}))
    assert remaining[:5] == [4, 3, 2, 1, 0], remaining
    resp = _manifest(share["shlink"], "Mallory", PASSCODE)
    assert resp.status_code == 410 and "locked" in resp.text


def test_recipient_name_is_not_plaintext_on_the_ledger(node: NodeHandle) -> None:
    """The recipient a link is opened by is free text (a name, a clinic): it was the
    plaintext ``agent`` of the anchored share-access event, on every member's ledger."""
    share = _create(node, selection={"types": ["AllergyIntolerance"]}, expires_in_s=3600)
    name = "Dr Quentin Zabriskie, Harbour Oncology"
    _open(share["shlink"], name)
    deadline = time.time() + 30
    while True:
        events = [e for e in _access_log(node) if e["subtype"] == "share-access"
                  and e["detail"] == name]  # the patient reads it, unsealed for them
        if events and all(e["anchored_height"] for e in events) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert events and all(e["anchored_height"] for e in events), events
    for path in node.home.glob("ledger.db*"):
        assert b"Zabriskie" not in path.read_bytes(), path


def test_defaults_are_time_limited_and_never_everything_by_omission(node: NodeHandle) -> None:
    """A link made without an expiry never expired; a portal form with no box ticked
    (empty lists) shared every record, PSY and HIV-labelled ones included."""
    made = _create(node)  # nothing said: every record, but for a week (the CLI's default)
    assert made["exp"] is not None and made["exp"] <= time.time() + 7 * 86400 + 60
    with node.login(node.patients[0]) as h:
        resp = h.post("/api/shares", json={"selection": {"categories": [], "types": []},
                                           "expires_in_s": 3600})
    assert resp.status_code == 400 and "selection is empty" in resp.text, resp.text


def test_expired_share(node: NodeHandle) -> None:
    share = _create(node, selection={"categories": ["allergies"]}, expires_in_s=2)
    time.sleep(2.6)
    resp = _manifest(share["shlink"], "Late Reader")
    assert resp.status_code == 410 and "expired" in resp.text
    assert any(e["reason"] == "share link expired" and e["detail"] == "Late Reader"
               for e in _access_log(node))


def test_revoked_share(node: NodeHandle) -> None:
    share = _create(node, selection={"categories": ["allergies"]}, expires_in_s=3600)
    assert _open(share["shlink"], "Early Reader")["entry"]
    with node.login(node.patients[0]) as h:
        assert h.post(f"/api/shares/{share['id']}/revoke").json()["revoked"] is True
        listed = {g["id"]: g for g in h.get("/api/shares").json()}
    assert listed[share["id"]]["revoked"] is True and "passcode" not in listed[share["id"]]
    resp = _manifest(share["shlink"], "Late Reader")
    assert resp.status_code == 410 and "revoked" in resp.text
    assert any(e["reason"] == "share link was revoked" for e in _access_log(node))


def test_only_the_patient_shares(node: NodeHandle) -> None:
    with node.client("dr-house") as c:
        resp = c.http.post("/api/shares", json={"selection": {}},
                           headers={"Authorization": f"Bearer {c.token()}"})
    assert resp.status_code == 403
    assert httpx.post(f"{node.url}/shl/{'x' * 32}", json={"recipient": "x"}).status_code == 404


# ---------------------------------------------------------------- CLI

def test_share_cli(node: NodeHandle, own_records: dict[str, Any], tmp_path: Path) -> None:
    key = node.home / "keystores" / "users" / f"{node.patients[0]}.json"
    qr = tmp_path / "share.png"
    made = run_cli("share", "create", "--node", node.url, "--key", str(key),
                   "--category", "vital-signs", "--expires", "1h", "--passcode", PASSCODE,
                   "--label", "cli share", "--qr", str(qr))
    assert made.returncode == 0, made.stdout + made.stderr
    link = made.stdout.strip().splitlines()[-1]
    assert link.startswith("shlink:/")
    assert qr.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    share_id = shl.decode_shlink(link).url.rsplit("/", 1)[-1]

    listed = run_cli("share", "list", "--node", node.url, "--key", str(key))
    assert listed.returncode == 0 and share_id[:12] in listed.stdout and "active" in listed.stdout

    wrong = run_cli("share", "open", link, "--recipient", "CLI Reader", "--passcode", "nope-nope",
                    "--out", str(tmp_path / "x.json"))
    assert wrong.returncode == 1 and "attempts left" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    out = tmp_path / "shared.json"
    opened = run_cli("share", "open", link, "--recipient", "CLI Reader", "--passcode", PASSCODE,
                     "--out", str(out))
    assert opened.returncode == 0, opened.stderr
    bundle = orjson.loads(out.read_bytes())
    ids = {e["resource"]["id"] for e in bundle["entry"]}
    assert ids == {i for i, r in own_records.items() if _is_vital(r)}

    revoked = run_cli("share", "revoke", "--node", node.url, "--key", str(key), share_id)
    assert revoked.returncode == 0, revoked.stderr
    again = run_cli("share", "open", link, "--recipient", "CLI Reader", "--passcode", PASSCODE,
                    "--out", str(out))
    assert again.returncode == 1 and "revoked" in again.stderr
    events = [e for e in _access_log(node) if e["subtype"] == "share-access"
              and e["detail"] == "CLI Reader"]
    assert sorted(e["outcome"] for e in events) == ["0", "4", "4"]
