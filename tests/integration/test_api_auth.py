"""Identities and authentication against a real node: SMART backend-services assertions,
bearer tokens (a node with a 2-second token lifetime), scopes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import NodeHandle, assert_outcome, running_node

from medledger.crypto import keys
from medledger.node.auth import ASSERTION_TYPE, make_assertion

pytestmark = pytest.mark.timeout(120)
TTL_S = 2


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("auth") / "home", token_ttl_s=TTL_S) as n:
        yield n


def _exchange(node: NodeHandle, assertion: str, scope: str | None = None) -> httpx.Response:
    data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion}
    if scope:
        data["scope"] = scope
    return httpx.post(node.url + "/auth/token", data=data)


def _signed(identity: keys.Identity, **claims: object) -> str:
    now = int(time.time())
    base: dict[str, object] = {"iss": identity.id, "sub": identity.id, "iat": now,
                               "exp": now + 120, "jti": uuid.uuid4().hex}
    base.update(claims)
    key = Ed25519PrivateKey.from_private_bytes(identity.sign_seed)
    return jwt.encode(base, key, algorithm="EdDSA", headers={"kid": identity.id})


def test_token_exchange_with_signed_assertion(node: NodeHandle) -> None:
    nurse = node.staff["nurse-joy"]
    resp = _exchange(node, make_assertion(nurse, node.url + "/auth/token"))
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["token_type"] == "bearer" and doc["actor"] == "nurse-joy"
    assert doc["role"] == "nurse" and doc["kind"] == "practitioner"
    assert 0 < doc["expires_in"] <= TTL_S
    me = httpx.get(node.url + "/auth/me",
                   headers={"Authorization": f"Bearer {doc['access_token']}"})
    assert me.status_code == 200 and me.json()["actor"] == "nurse-joy"


def test_expired_assertion(node: NodeHandle) -> None:
    nurse = node.staff["nurse-joy"]
    old = make_assertion(nurse, node.url + "/auth/token", now=time.time() - 600)
    assert_outcome(_exchange(node, old), 401, "expired")


def test_wrong_audience(node: NodeHandle) -> None:
    nurse = node.staff["nurse-joy"]
    bad = _signed(nurse, aud="https://elsewhere.example/auth/token")
    assert_outcome(_exchange(node, bad), 401, "aud", node.url + "/auth/token")


def test_replayed_jti(node: NodeHandle) -> None:
    nurse = node.staff["nurse-joy"]
    assertion = make_assertion(nurse, node.url + "/auth/token")
    assert _exchange(node, assertion).status_code == 200
    assert_outcome(_exchange(node, assertion), 401, "jti", "replay")


def test_replayed_jti_after_restart(node: NodeHandle) -> None:
    """Used assertion ids are kept durably: a restart does not reopen the replay window."""
    nurse = node.staff["nurse-joy"]
    assertion = make_assertion(nurse, node.url + "/auth/token")
    assert _exchange(node, assertion).status_code == 200
    node.stop()
    node.start()
    assert_outcome(_exchange(node, assertion), 401, "jti", "replay")


def test_unknown_signer(node: NodeHandle) -> None:
    ghost = keys.new_identity("ghost-practitioner", "practitioner")
    assert_outcome(_exchange(node, make_assertion(ghost, node.url + "/auth/token")), 401,
                   "unknown client", "ghost-practitioner")


def test_tampered_signature(node: NodeHandle) -> None:
    nurse = node.staff["nurse-joy"]
    head, payload, sig = make_assertion(nurse, node.url + "/auth/token").split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    assert_outcome(_exchange(node, f"{head}.{payload}.{flipped}"), 401, "signature")


def test_assertion_signed_by_another_key(node: NodeHandle) -> None:
    impostor = keys.new_identity("nurse-joy", "practitioner")  # right id, wrong key
    assert_outcome(_exchange(node, make_assertion(impostor, node.url + "/auth/token")), 401,
                   "signature")


@pytest.mark.parametrize("who", ["../../config", "../keystores/org", "a/b"])
def test_login_ids_never_name_paths(node: NodeHandle, who: str) -> None:
    resp = httpx.post(node.url + "/auth/login", json={"id": who, "password": "x" * 12})
    assert_outcome(resp, 400, "id is 1-64 characters")


def test_missing_token(node: NodeHandle) -> None:
    resp = httpx.get(node.url + "/fhir/Observation?patient=nobody")
    assert_outcome(resp, 401, "missing bearer token")
    assert resp.headers["www-authenticate"].lower().startswith("bearer")


def test_unknown_token(node: NodeHandle) -> None:
    resp = httpx.get(node.url + "/fhir/Observation?patient=nobody",
                     headers={"Authorization": "Bearer not-a-token"})
    assert_outcome(resp, 401, "unknown")


def test_expired_bearer_token(node: NodeHandle) -> None:
    nurse = node.staff["nurse-joy"]
    tok = _exchange(node, make_assertion(nurse, node.url + "/auth/token")).json()
    hdr = {"Authorization": f"Bearer {tok['access_token']}"}
    assert httpx.get(node.url + "/auth/me", headers=hdr).status_code == 200
    time.sleep(TTL_S + 0.5)
    assert_outcome(httpx.get(node.url + "/auth/me", headers=hdr), 401, "expired")


def test_insufficient_scope(node: NodeHandle) -> None:
    nurse = node.staff["nurse-joy"]
    resp = _exchange(node, make_assertion(nurse, node.url + "/auth/token"),
                     scope="user/Patient.rs")
    assert resp.status_code == 200, resp.text
    assert resp.json()["scope"] == "user/Patient.rs"
    hdr = {"Authorization": f"Bearer {resp.json()['access_token']}"}
    r = httpx.get(node.url + "/fhir/Observation?patient=p1", headers=hdr)
    assert_outcome(r, 403, "scope", "Observation")


def test_scope_beyond_role_refused(node: NodeHandle) -> None:
    nurse = node.staff["nurse-joy"]
    resp = _exchange(node, make_assertion(nurse, node.url + "/auth/token"),
                     scope="system/*.cruds")
    assert_outcome(resp, 403, "none of the requested scopes", "practitioner")


def test_garbage_assertion(node: NodeHandle) -> None:
    assert_outcome(_exchange(node, "not.a.jwt"), 400, "not a JWT")


def test_password_login_wrong_password(node: NodeHandle) -> None:
    resp = httpx.post(node.url + "/auth/login", json={"id": "nurse-joy", "password": "wrong-pw!"})
    assert_outcome(resp, 401, "wrong password")


_ = Path
