"""node.records: sealed blobs as the node writes them, one at a time (sealed boxes) and
in batches (``node.bundles.seal_many``: batch-wrapped keys), and blobs written before
batch wrapping existed (a stored vector), opened through every path a read takes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from medledger.crypto import envelope
from medledger.crypto.canonical import b64d, loads
from medledger.errors import Forbidden
from medledger.node.bundles import seal_many
from medledger.node.records import open_any, open_as, rewrap_key, seal_record, wrapped_key
from medledger.search.extract import extract

VECTOR = json.loads((Path(__file__).parent / "vectors" / "sealed_box_record.json").read_text())
CHAIN = "chain-v"


def _keypair(n: int) -> tuple[bytes, bytes]:
    sk = PrivateKey(hashlib.sha256(b"reader-%d" % n).digest())
    return bytes(sk), bytes(sk.public_key)


ORG, PATIENT, LATE = _keypair(1), _keypair(2), _keypair(3)
READERS = {"org-a": ORG[1], "p1": PATIENT[1]}


def _observation(i: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": f"o{i}", "status": "final",
            "code": {"text": f"test {i}"}, "subject": {"reference": "Patient/p1"}}


def _meta(fields: dict[str, Any], resource: dict[str, Any], version: int = 1
          ) -> dict[str, Any]:
    return {"type": resource["resourceType"], "id": resource["id"], "v": version,
            "patient": "p1", "commitment": fields["commitment"], "blob": fields["blob"]}


def _key_sizes(blob: bytes) -> set[int]:
    return {len(b64d(k)) for k in loads(blob)["keys"].values()}


def test_blob_sealed_before_batch_wrapping_still_opens() -> None:
    blob = VECTOR["blob"].encode()
    assert _key_sizes(blob) == {envelope.SEALED_KEY_SIZE}
    for rid, sk in (("org-a", ORG[0]), ("p1", PATIENT[0])):
        assert open_any(VECTOR["chain"], VECTOR["meta"], blob, rid, [sk]) == VECTOR["resource"]
    with pytest.raises(Forbidden):
        open_as(VECTOR["chain"], VECTOR["meta"], blob, "org-a", LATE[0])


def test_seal_many_wraps_in_batch_format_and_every_reader_opens_every_record() -> None:
    resources = [_observation(i) for i in range(5)]
    sealed = seal_many(CHAIN, [(r, "p1", 1, READERS) for r in resources])
    data_keys = set()
    for resource, (fields, blob, values) in zip(resources, sealed, strict=True):
        assert values == extract(resource)  # what the node's index takes instead of decrypting
        assert _key_sizes(blob) == {envelope.BATCH_KEY_SIZE}
        meta = _meta(fields, resource)
        for rid, sk in (("org-a", ORG[0]), ("p1", PATIENT[0])):
            assert open_any(CHAIN, meta, blob, rid, [LATE[0], sk]) == resource
        with pytest.raises(Forbidden):
            open_as(CHAIN, meta, blob, "org-a", PATIENT[0])  # the patient's key, org's wrap
        wrapped = wrapped_key(blob, "org-a")
        assert wrapped is not None
        data_keys.add(envelope.unwrap_key(wrapped, ORG[0]))
    assert len(data_keys) == len(resources)  # a fresh data key per version


def test_single_writes_keep_sealed_boxes() -> None:
    _, blob = seal_record(CHAIN, _observation(1), "p1", 1, READERS)
    assert _key_sizes(blob) == {envelope.SEALED_KEY_SIZE}


@pytest.mark.parametrize("batch", [True, False], ids=["batch-wrapped", "sealed-box"])
def test_rewrap_to_a_late_reader(batch: bool) -> None:
    resource = _observation(7)
    if batch:
        fields, blob, _ = seal_many(CHAIN, [(resource, "p1", 1, READERS)])[0]
    else:
        fields, blob = seal_record(CHAIN, resource, "p1", 1, READERS)
    meta = _meta(fields, resource)
    rewrapped = rewrap_key(blob, "org-a", ORG[0], LATE[1])
    with pytest.raises(Forbidden):
        open_any(CHAIN, meta, blob, "org-late", [LATE[0]])
    assert open_any(CHAIN, meta, blob, "org-late", [LATE[0]], [rewrapped]) == resource
    with pytest.raises(Forbidden):
        rewrap_key(blob, "org-a", PATIENT[0], LATE[1])


def test_rewrap_in_a_batch_opens_each_record_with_one_ephemeral_key() -> None:
    """``org rewrap`` and a patient's key rotation re-wrap many keys at once: in the batch
    format, under one ephemeral key per batch (the late reader opens every record with
    its own), where a sealed box per record cost an X25519 key generation each."""
    resources = [_observation(i) for i in range(3)]
    sealed = [seal_record(CHAIN, r, "p1", 1, READERS) for r in resources]
    with envelope.BatchWrapper() as wrapper:
        rewrapped = [rewrap_key(blob, "org-a", ORG[0], LATE[1], wrapper) for _, blob in sealed]
    assert {len(k) for k in rewrapped} == {envelope.BATCH_KEY_SIZE}
    assert len({k[1:33] for k in rewrapped}) == 1  # one ephemeral public key
    assert len(set(rewrapped)) == 3  # fresh nonces: no two alike
    for r, (fields, blob), key in zip(resources, sealed, rewrapped, strict=True):
        assert open_any(CHAIN, _meta(fields, r), blob, "org-late", [LATE[0]], [key]) == r
        with pytest.raises(Forbidden):
            open_any(CHAIN, _meta(fields, r), blob, "org-late", [PATIENT[0]], [key])
