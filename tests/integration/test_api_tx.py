"""POST /ledger/tx: client-signed transactions and every way one can be refused."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import orjson
import pytest
from helpers import ORG_ID, NodeHandle, assert_outcome, load_patient, running_node

from medledger.core.tx import make_tx
from medledger.crypto import keys
from medledger.crypto.canonical import b64e, canonical

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("tx") / "home") as n:
        load_patient(n, 3, n_encounters=1)
        yield n


@pytest.fixture(scope="module")
def patient(node: NodeHandle) -> keys.Identity:
    return node.user_identity(node.patients[0])


def _chain(node: NodeHandle) -> str:
    return str(httpx.get(node.url + "/ledger/status").json()["chain"])


def _consent_tx(node: NodeHandle, who: keys.Identity, chain: str | None = None) -> bytes:
    body = {"id": os.urandom(8).hex(), "patient": who.id, "decision": "permit",
            "orgs": ["org-elsewhere"], "categories": ["vital-signs"]}
    return make_tx(who.id, who.signer(), chain or _chain(node), "consent.put", body,
                   os.urandom(16).hex()).raw


def _token(node: NodeHandle, who: keys.Identity | str) -> str:
    with node.client(who) as c:
        return c.token()


def _post(node: NodeHandle, raw: bytes, who: keys.Identity | str | None = ORG_ID
          ) -> httpx.Response:
    """POST raw bytes with ``who``'s bearer token (default: the node's organisation, a
    member relaying a client's tx); ``None``: no token."""
    headers = {"Content-Type": "application/octet-stream"}
    if who is not None:
        headers["Authorization"] = f"Bearer {_token(node, who)}"
    return httpx.post(node.url + "/ledger/tx", content=raw, headers=headers)


def test_signed_tx_commits(node: NodeHandle, patient: keys.Identity) -> None:
    resp = _post(node, _consent_tx(node, patient), patient)  # the signer submits it
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["code"] == 0 and doc["height"] > 0 and len(doc["hash"]) == 64


def test_submission_needs_the_signer_or_a_member(node: NodeHandle,
                                                 patient: keys.Identity) -> None:
    """The refusal of a raw tx (its log can name state) reaches only whoever could sign it:
    no token is a 401, another principal's token a 403; a share link goes through its
    issuing node (which keeps its payload), never as a raw tx."""
    assert_outcome(_post(node, _consent_tx(node, patient), None), 401, "bearer token")
    ghost = keys.new_identity("ghost-patient", "patient")
    assert_outcome(_post(node, _consent_tx(node, ghost), "dr-house"), 403, "signed by someone")
    assert_outcome(_post(node, _consent_tx(node, patient), "nurse-joy"), 403, "not by nurse-joy")
    share = make_tx(patient.id, patient.signer(), _chain(node), "share.create",
                    {"id": "s" * 32}, os.urandom(16).hex()).raw
    assert_outcome(_post(node, share, patient), 403, "/api/shares/publish")


def test_bad_signature(node: NodeHandle, patient: keys.Identity) -> None:
    doc = orjson.loads(_consent_tx(node, patient))
    doc["sig"] = b64e(keys.new_identity("x", "patient").signer().sign(b"something else"))
    resp = _post(node, canonical(doc))
    assert_outcome(resp, 401, "bad signature", patient.id)
    assert resp.json()["issue"][0]["code"] == "security"


def test_replayed_tx(node: NodeHandle, patient: keys.Identity) -> None:
    raw = _consent_tx(node, patient)
    assert _post(node, raw).status_code == 200
    resp = _post(node, raw)
    assert_outcome(resp, 409, "already used", "replay")


def test_unknown_signer(node: NodeHandle) -> None:
    ghost = keys.new_identity("ghost-patient", "patient")
    assert_outcome(_post(node, _consent_tx(node, ghost)), 401, "unknown signer", "ghost-patient")


def test_wrong_chain(node: NodeHandle, patient: keys.Identity) -> None:
    resp = _post(node, _consent_tx(node, patient, chain="some-other-chain"))
    assert_outcome(resp, 409, "some-other-chain", _chain(node))


@pytest.mark.parametrize("raw, needle", [
    (b"this is not json", "json"),
    (b"", "empty"),
    (b'{"v": 1}', "exactly the fields"),
    (b"[1, 2, 3]", "exactly the fields"),
    (b"\xff\xfe\x00garbage", "json"),
])
def test_malformed_bytes(node: NodeHandle, raw: bytes, needle: str) -> None:
    assert_outcome(_post(node, raw), 400, needle)


def test_non_canonical_encoding(node: NodeHandle, patient: keys.Identity) -> None:
    doc = orjson.loads(_consent_tx(node, patient))
    pretty = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    assert_outcome(_post(node, pretty), 400, "canonical")


def test_consent_signed_by_someone_else(node: NodeHandle, patient: keys.Identity) -> None:
    nurse = node.staff["nurse-joy"]
    body = {"id": "c-by-nurse", "patient": patient.id, "decision": "permit"}
    raw = make_tx(nurse.id, nurse.signer(), _chain(node), "consent.put", body,
                  os.urandom(16).hex()).raw
    assert_outcome(_post(node, raw, "nurse-joy"), 403, "must be signed by that patient",
                   "nurse-joy")
