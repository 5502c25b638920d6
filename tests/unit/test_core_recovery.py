"""core.machine, key recovery (ADR 7): recovery.setup / revoke / request / approve /
complete / cancel. Pure: the shares are off-chain, the ledger sees their hashes only.

World: org-a cares for pat-1 (and registers dr-phys); org-b cares for pat-2. pat-1 picks
guardians org-b, pat-2 (a person) and dr-phys, any 2 of 3.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_core_machine import (
    CONFLICT,
    FORBIDDEN,
    INVALID,
    NOTFOUND,
    OK,
    T0,
    Chain,
    enc_pub,
    sign_pub,
    world,
)

from medledger.core import state as st
from medledger.crypto.canonical import sha256

GONE = 11
GUARDIANS = ["dr-phys", "org-b", "pat-2"]
REQ = "r" * 20
NOW_S = T0 // 10**9


def h(name: str) -> str:
    return sha256(name.encode()).hex()


def setup_body(**change: Any) -> dict[str, Any]:
    body = {"patient": "pat-1", "scheme": "slip39-v1", "threshold": 2, "guardians": GUARDIANS,
            "shares": {g: h(f"share:{g}") for g in GUARDIANS}}
    return {**body, **change}


def request_body(**change: Any) -> dict[str, Any]:
    return {"patient": "pat-1", "id": REQ, "enc_pub": enc_pub("ephemeral"),
            "exp": NOW_S + 86400, **change}


def approve(rid: str = REQ, share: str = "") -> dict[str, Any]:
    return {"id": rid, "share": share or h(f"approval:{rid}")}


@pytest.fixture
def c() -> Chain:
    c = world()
    assert c.run("pat-1", "recovery.setup", setup_body()).code == OK
    return c


def test_setup_is_stored_without_any_share(c: Chain) -> None:
    setup = st.recovery_setup(c.state, "pat-1")
    assert setup is not None and setup["status"] == "active"
    assert (setup["threshold"], setup["guardians"]) == (2, GUARDIANS)
    assert setup["shares"] == {g: h(f"share:{g}") for g in GUARDIANS}  # hashes only


@pytest.mark.parametrize(
    ("change", "why"),
    [({"threshold": 1}, "no guardian may recover alone"),
     ({"threshold": 4}, "threshold must be 2-3"),
     ({"threshold": "2"}, "wrong type"),
     ({"guardians": ["org-b"], "shares": {"org-b": h("x")}, "threshold": 2}, "2-16 guardians"),
     ({"guardians": ["org-b", "pat-1"], "shares": {"org-b": h("x"), "pat-1": h("y")}},
      "own guardian"),
     ({"guardians": ["nobody", "org-b"], "shares": {"org-b": h("x"), "nobody": h("y")}},
      "guardian nobody"),
     ({"guardians": ["pat-2", "org-b"]}, "sorted list"),
     ({"shares": {"org-b": h("x"), "pat-2": h("y")}}, "every guardian"),
     ({"shares": {**{g: h(g) for g in GUARDIANS}, "org-b": "not-a-hash"}}, "every guardian"),
     ({"scheme": "xor"}, "scheme")],
)
def test_setup_shape_errors(change: dict[str, Any], why: str) -> None:
    c = world()
    r = c.run("pat-1", "recovery.setup", setup_body(**change))
    assert r.code == INVALID and why in r.log, r.log


def test_only_the_patient_sets_up_recovery() -> None:
    c = world()
    for signer in ("org-a", "dr-phys", "pat-2"):
        r = c.run(signer, "recovery.setup", setup_body())
        assert r.code == FORBIDDEN and "must be signed by that patient" in r.log
    assert st.recovery_setup(c.state, "pat-1") is None


def test_recover_with_k_approvals(c: Chain) -> None:
    r = c.run("org-a", "recovery.request", request_body())  # the caring org proofed them
    assert (r.code, r.data) == (OK, REQ)
    assert c.run("org-b", "recovery.approve", approve()).data == "1/2"
    r = c.run("pat-1", "recovery.complete", {"id": REQ})  # k-1: not enough
    assert r.code == CONFLICT and "1 of 2 guardian approvals" in r.log
    assert c.run("pat-2", "recovery.approve", approve()).data == "2/2"
    assert c.run("pat-1", "recovery.complete", {"id": REQ}).code == OK
    req = st.recovery_request(c.state, REQ)
    assert req is not None and req["status"] == "completed"
    assert sorted(req["approvals"]) == ["org-b", "pat-2"]
    assert c.run("dr-phys", "recovery.approve", approve()).code == CONFLICT  # closed


def test_a_guardian_cannot_recover_alone(c: Chain) -> None:
    # a guardian may open a request (with its own ephemeral key)...
    assert c.run("org-b", "recovery.request", request_body()).code == OK
    assert c.run("org-b", "recovery.approve", approve()).code == OK
    # ...but approves once, and only the patient's own key completes it
    assert c.run("org-b", "recovery.approve", approve()).code == CONFLICT
    r = c.run("org-b", "recovery.complete", {"id": REQ})
    assert r.code == FORBIDDEN
    assert st.recovery_request(c.state, REQ)["approvals"] == {"org-b": h(f"approval:{REQ}")}  # type: ignore[index]


def test_who_may_request_and_approve(c: Chain) -> None:
    r = c.run("pat-2", "recovery.request", request_body(patient="pat-1", id="x" * 20))
    assert r.code == OK  # pat-2 is a guardian
    assert c.run("pat-1", "recovery.cancel", {"id": "x" * 20}).code == OK
    r = c.run("dr-b", "recovery.request", request_body())  # neither caring org nor guardian
    assert r.code == FORBIDDEN and "caring for pat-1 or one of their guardians" in r.log
    assert c.run("org-a", "recovery.request", request_body()).code == OK
    r = c.run("org-a", "recovery.approve", approve())  # the requester is no guardian
    assert r.code == FORBIDDEN and "not a guardian" in r.log
    assert c.run("nurse-n", "recovery.approve", approve()).code == FORBIDDEN
    r = c.run("org-a", "recovery.request", request_body(id="y" * 20))
    assert r.code == CONFLICT and "still open" in r.log


@pytest.mark.parametrize(
    "change",
    [{"id": "short"}, {"id": "r" * 19 + "/"}, {"enc_pub": "short"}, {"exp": NOW_S},
     {"exp": NOW_S + 31 * 86400}, {"exp": "soon"}],
)
def test_request_shape_errors(c: Chain, change: dict[str, Any]) -> None:
    assert c.run("org-a", "recovery.request", request_body(**change)).code == INVALID


def test_request_needs_an_active_setup_for_the_current_key() -> None:
    c = world()
    r = c.run("org-a", "recovery.request", request_body())
    assert r.code == NOTFOUND and "has not set up key recovery" in r.log
    assert c.run("pat-1", "recovery.setup", setup_body()).code == OK
    rotate = {"id": "pat-1", "sign_pub": sign_pub("pat-1"), "enc_pub": enc_pub("pat-1-new")}
    assert c.run("pat-1", "key.rotate", rotate).code == OK
    r = c.run("org-a", "recovery.request", request_body())
    assert r.code == CONFLICT and "rotated after the recovery setup" in r.log


def test_expired_request_takes_no_approval(c: Chain) -> None:
    assert c.run("org-a", "recovery.request", request_body()).code == OK
    late = c.block(c.tx("org-b", "recovery.approve", approve()), time_ns=T0 + 2 * 86400 * 10**9)
    assert late.results[0].code == GONE
    # an expired request no longer blocks a new one
    r = c.block(c.tx("org-a", "recovery.request", request_body(
        id="z" * 20, exp=NOW_S + 3 * 86400)), time_ns=T0 + 2 * 86400 * 10**9).results[0]
    assert r.code == OK


def test_cancel_and_revoke(c: Chain) -> None:
    assert c.run("org-a", "recovery.request", request_body()).code == OK
    assert c.run("org-b", "recovery.cancel", {"id": REQ}).code == FORBIDDEN
    assert c.run("pat-1", "recovery.cancel", {"id": REQ}).code == OK
    assert c.run("org-b", "recovery.approve", approve()).code == CONFLICT
    assert c.run("org-a", "recovery.request", request_body(id="q" * 20)).code == OK
    assert c.run("org-a", "recovery.revoke", {"patient": "pat-1"}).code == FORBIDDEN
    assert c.run("pat-1", "recovery.revoke", {"patient": "pat-1"}).code == OK
    req = st.recovery_request(c.state, "q" * 20)
    assert req is not None and req["status"] == "cancelled"  # revoking ends open requests
    assert st.recovery_setup(c.state, "pat-1")["status"] == "revoked"  # type: ignore[index]
    r = c.run("org-a", "recovery.request", request_body(id="w" * 20))
    assert r.code == NOTFOUND
    assert c.run("pat-1", "recovery.revoke", {"patient": "pat-1"}).code == NOTFOUND


def test_a_new_setup_replaces_the_old_and_its_requests(c: Chain) -> None:
    assert c.run("org-a", "recovery.request", request_body()).code == OK
    assert c.run("org-b", "recovery.approve", approve()).code == OK
    assert c.run("pat-1", "recovery.setup", setup_body(threshold=3)).code == OK
    req = st.recovery_request(c.state, REQ)
    assert req is not None and req["status"] == "cancelled"
    assert c.run("pat-2", "recovery.approve", approve()).code == CONFLICT
    assert [r["id"] for r in st.recovery_requests(c.state, "pat-1")] == [REQ]
