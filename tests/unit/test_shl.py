"""SMART Health Links: JWE vectors (incl. tampered), payload encoding, manifest, QR."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger import errors
from medledger.errors import IntegrityError, InvalidInput
from medledger.fhir import shl
from medledger.fhir.shl import (
    ShlPayload,
    b64url_decode,
    b64url_encode,
    decode_shlink,
    decrypt_jwe,
    encode_shlink,
    encrypt_jwe,
    jwe_header,
    manifest_response,
    qr_png,
    qr_svg,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "shl_jwe.json").read_text())
KEY = bytes(range(32))
KEY_B64 = b64url_encode(KEY)
URL = "https://ehr.example.org/shl/Y9xwkUdtmN9wwoJoN3ffJIhX2UGvCL1JnlPVNL3kDWM"


# ----------------------------------------------------------------------------- JWE


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["name"])
def test_jwe_vector_encrypts_exactly(case: dict[str, Any]) -> None:
    token = encrypt_jwe(
        case["plaintext_utf8"].encode(),
        bytes.fromhex(case["key_hex"]),
        bytes.fromhex(case["iv_hex"]),
        case["content_type"],
    )
    assert token == case["expected"]
    assert decrypt_jwe(token, bytes.fromhex(case["key_hex"])) == case["plaintext_utf8"].encode()


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["name"])
def test_jwe_vector_shape(case: dict[str, Any]) -> None:
    header_b64, enc_key, iv_b64, _ct, tag_b64 = case["expected"].split(".")
    assert enc_key == ""
    assert "=" not in case["expected"]
    header = json.loads(b64url_decode(header_b64))
    assert header == {"alg": "dir", "enc": "A256GCM", "cty": case["content_type"]}
    assert jwe_header(case["expected"]) == header
    assert b64url_decode(iv_b64) == bytes.fromhex(case["iv_hex"])
    assert len(b64url_decode(tag_b64)) == 16


def test_rfc7516_a1_content_encryption_layer() -> None:
    """Independent vector: RFC 7516 A.1's A256GCM step (header b64 as AAD)."""
    v = VECTORS["rfc7516_a1_content_encryption"]
    plaintext = shl._open_a256gcm(
        v["protected_b64"],
        b64url_decode(v["iv_b64"]),
        b64url_decode(v["ciphertext_b64"]),
        b64url_decode(v["tag_b64"]),
        bytes.fromhex(v["cek_hex"]),
    )
    assert plaintext == v["plaintext_utf8"].encode()
    # Our encoder's ciphertext/tag split matches the RFC's for the same inputs.
    ours = encrypt_jwe(
        v["plaintext_utf8"].encode(), bytes.fromhex(v["cek_hex"]), b64url_decode(v["iv_b64"])
    )
    # Different header (dir vs RSA-OAEP) -> same ciphertext (CTR), different tag.
    assert ours.split(".")[3] == v["ciphertext_b64"]
    assert ours.split(".")[4] != v["tag_b64"]


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["name"])
def test_jwe_tampered_vectors_fail(case: dict[str, Any]) -> None:
    expected = getattr(errors, case["error"])
    with pytest.raises(expected) as info:
        decrypt_jwe(case["token"], bytes.fromhex(case["key_hex"]))
    assert str(info.value)  # a human diagnosis, never empty
    if expected is InvalidInput:
        assert not isinstance(info.value, IntegrityError)


def test_jwe_decrypt_error_messages_are_diagnoses() -> None:
    bad = next(c for c in VECTORS["invalid"] if c["name"] == "alg_not_dir")
    with pytest.raises(InvalidInput, match="alg must be 'dir'"):
        decrypt_jwe(bad["token"], KEY)
    tampered = next(c for c in VECTORS["invalid"] if c["name"] == "ciphertext_bit_flipped")
    with pytest.raises(IntegrityError, match="altered or the key is wrong"):
        decrypt_jwe(tampered["token"], KEY)


@pytest.mark.parametrize(
    ("key", "iv", "cty"),
    [(b"\x00" * 16, b"\x00" * 12, "a/b"), (KEY, b"\x00" * 16, "a/b"), (KEY, b"\x00" * 12, "")],
)
def test_jwe_encrypt_rejects_bad_parameters(key: bytes, iv: bytes, cty: str) -> None:
    with pytest.raises(InvalidInput):
        encrypt_jwe(b"x", key, iv, cty)


@settings(max_examples=60, deadline=None)
@given(
    plaintext=st.binary(max_size=2048),
    key=st.binary(min_size=32, max_size=32),
    iv=st.binary(min_size=12, max_size=12),
)
def test_jwe_round_trip_and_determinism(plaintext: bytes, key: bytes, iv: bytes) -> None:
    token = encrypt_jwe(plaintext, key, iv)
    assert token == encrypt_jwe(plaintext, key, iv)
    assert decrypt_jwe(token, key) == plaintext


@settings(max_examples=40, deadline=None)
@given(plaintext=st.binary(min_size=1, max_size=256), index=st.integers(min_value=0))
def test_jwe_any_single_byte_change_in_ciphertext_is_detected(plaintext: bytes, index: int) -> None:
    token = encrypt_jwe(plaintext, KEY, b"\x07" * 12)
    h, ek, iv, ct, tag = token.split(".")
    raw = bytearray(b64url_decode(ct))
    raw[index % len(raw)] ^= 0x01
    with pytest.raises(IntegrityError):
        decrypt_jwe(".".join([h, ek, iv, b64url_encode(bytes(raw)), tag]), KEY)


# -------------------------------------------------------------------------- payload


def test_shlink_encode_matches_spec_layout() -> None:
    payload = ShlPayload(url=URL, key=KEY_B64, exp=1_700_000_000, flag="LP", label="Summary")
    link = encode_shlink(payload)
    assert link.startswith("shlink:/")
    body = link[len("shlink:/") :]
    assert "=" not in body
    decoded = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert decoded == {
        "url": URL,
        "key": KEY_B64,
        "exp": 1_700_000_000,
        "flag": "LP",
        "label": "Summary",
        "v": 1,
    }
    assert decode_shlink(link) == payload


def test_shlink_optional_members_omitted() -> None:
    link = encode_shlink(ShlPayload(url=URL, key=KEY_B64))
    body = link[len("shlink:/") :]
    decoded = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert decoded == {"url": URL, "key": KEY_B64, "v": 1}


@pytest.mark.parametrize(
    "prefix", ["https://viewer.example.org/", "https://viewer.example.org/#", "https://v.example"]
)
def test_shlink_viewer_prefix_round_trip(prefix: str) -> None:
    payload = ShlPayload(url=URL, key=KEY_B64, flag="U")
    link = encode_shlink(payload, viewer_prefix=prefix)
    assert link.startswith(prefix.rstrip("#") + "#shlink:/")
    assert link.count("#") == 1
    assert decode_shlink(link) == payload


def test_shlink_payload_helpers() -> None:
    payload = ShlPayload.with_key_bytes(URL, KEY, exp=100, flag="P")
    assert payload.key == KEY_B64 and len(payload.key) == 43
    assert payload.key_bytes == KEY
    assert payload.requires_passcode and not payload.direct_file
    assert not payload.is_expired(99)
    assert payload.is_expired(100)
    assert not ShlPayload(url=URL, key=KEY_B64).is_expired(10**12)


def test_shlink_accepts_label_of_80_chars_and_unicode() -> None:
    label = "é" * 80
    assert (
        decode_shlink(encode_shlink(ShlPayload(url=URL, key=KEY_B64, label=label))).label == label
    )


def _raw_link(obj: object) -> str:
    return "shlink:/" + str(b64url_encode(json.dumps(obj).encode()))


@pytest.mark.parametrize(
    ("link", "needle"),
    [
        ("https://viewer.example/#nothing", "shlink:/"),
        ("shlink:/!!!", "base64url"),
        ("shlink:/" + b64url_encode(b"\xff\xfe"), "JSON"),
        (_raw_link([1, 2]), "object"),
        (_raw_link({"url": URL}), "key"),
        (_raw_link({"key": KEY_B64}), "url"),
        (_raw_link({"url": URL, "key": KEY_B64[:-1]}), "43"),
        (_raw_link({"url": URL, "key": KEY_B64 + "A"}), "43"),
        (_raw_link({"url": URL, "key": "*" * 43}), "base64url"),
        (_raw_link({"url": URL, "key": KEY_B64, "flag": "X"}), "unknown"),
        (_raw_link({"url": URL, "key": KEY_B64, "flag": "PL"}), "alphabetical"),
        (_raw_link({"url": URL, "key": KEY_B64, "flag": "LL"}), "once"),
        (_raw_link({"url": URL, "key": KEY_B64, "flag": "PU"}), "cannot be combined"),
        (_raw_link({"url": URL, "key": KEY_B64, "flag": ""}), "non-empty"),
        (_raw_link({"url": URL, "key": KEY_B64, "label": "x" * 81}), "81"),
        (_raw_link({"url": URL, "key": KEY_B64, "exp": "tomorrow"}), "exp"),
        (_raw_link({"url": URL, "key": KEY_B64, "exp": 1.5}), "exp"),
        (_raw_link({"url": URL, "key": KEY_B64, "v": 2}), "version"),
        (_raw_link({"url": "ftp://x", "key": KEY_B64}), "http"),
    ],
)
def test_decode_shlink_rejects_bad_links(link: str, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        decode_shlink(link)


def test_decode_shlink_accepts_integral_float_exp() -> None:
    assert decode_shlink(_raw_link({"url": URL, "key": KEY_B64, "exp": 1.7e9})).exp == 1_700_000_000


@settings(max_examples=60, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    exp=st.none() | st.integers(min_value=0, max_value=2**40),
    flag=st.sampled_from([None, "L", "P", "U", "LP", "LU"]),
    label=st.none() | st.text(max_size=80),
)
def test_shlink_round_trip(
    key: bytes, exp: int | None, flag: str | None, label: str | None
) -> None:
    payload = ShlPayload.with_key_bytes(URL, key, exp=exp, flag=flag, label=label)
    assert decode_shlink(encode_shlink(payload)) == payload


# ------------------------------------------------------------------ manifest and QR


def test_manifest_response_shape() -> None:
    body = manifest_response(
        [
            ("application/fhir+json", "https://x.example/f/1"),
            ("application/smart-health-card", "https://x.example/f/2"),
        ]
    )
    assert body == {
        "files": [
            {"contentType": "application/fhir+json", "location": "https://x.example/f/1"},
            {"contentType": "application/smart-health-card", "location": "https://x.example/f/2"},
        ]
    }
    assert manifest_response([]) == {"files": []}


@pytest.mark.parametrize("files", [[("", "https://x")], [("a/b", "")], [("only-one",)]])
def test_manifest_response_rejects_incomplete_files(files: list[Any]) -> None:
    with pytest.raises(InvalidInput):
        manifest_response(files)


def test_qr_png_and_svg() -> None:
    link = encode_shlink(ShlPayload(url=URL, key=KEY_B64, flag="LP", label="IPS"))
    png = qr_png(link)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png == qr_png(link)  # deterministic
    svg = qr_svg(link)
    assert "<svg" in svg and svg.rstrip().endswith("</svg>")
    assert shl._qr(link).error == "M"
    with pytest.raises(InvalidInput):
        qr_png("")
