"""SMART Health Links: the ``shlink:/`` payload, its JWE files, manifests and QR codes.

This module owns the wire formats of the SMART Health Links specification
(https://docs.smarthealthit.org/smart-health-links/spec):

* the SHLink payload (``url``, ``key``, ``exp``, ``flag``, ``label``, ``v``) and its
  encoding as ``shlink:/`` + base64url(JSON), optionally behind a viewer prefix
  (``https://viewer.example/#shlink:/...``);
* the compact JWE every shared file is wrapped in: ``alg`` ``dir``, ``enc``
  ``A256GCM``, ``cty`` the content type, an empty encrypted-key part and the
  ASCII of the encoded protected header as AAD;
* the manifest response (``{"files": [{"contentType", "location"}]}``);
* the QR code of a link (PNG bytes or SVG text, error correction level M).

Everything here is pure: keys, IVs and expiry times are arguments, never drawn from
the clock or the OS entropy pool.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass

import segno
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medledger.errors import IntegrityError, InvalidInput

__all__ = [
    "SHLINK_PREFIX",
    "ShlPayload",
    "b64url_decode",
    "b64url_encode",
    "decode_shlink",
    "decrypt_jwe",
    "encode_shlink",
    "encrypt_jwe",
    "jwe_header",
    "manifest_response",
    "qr_png",
    "qr_svg",
]

SHLINK_PREFIX = "shlink:/"
JWE_ALG = "dir"
JWE_ENC = "A256GCM"
KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16
MAX_LABEL_CHARS = 80
KNOWN_FLAGS = frozenset("LPU")
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*$")


# --------------------------------------------------------------------------- base64url


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, what: str = "value") -> bytes:
    """Decode unpadded base64url strictly; anything else is ``InvalidInput``."""
    if not isinstance(text, str) or not _B64URL_RE.match(text) or len(text) % 4 == 1:
        raise InvalidInput(f"{what} is not base64url text (A-Z a-z 0-9 - _ without padding)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - regex guards this
        raise InvalidInput(f"{what} is not valid base64url: {exc}") from exc


# --------------------------------------------------------------------------------- JWE


def _protected_header(content_type: str) -> str:
    header = {"alg": JWE_ALG, "enc": JWE_ENC, "cty": content_type}
    return b64url_encode(json.dumps(header, separators=(",", ":")).encode("utf-8"))


def encrypt_jwe(
    plaintext: bytes,
    key: bytes,
    iv: bytes,
    content_type: str = "application/fhir+json",
) -> str:
    """Encrypt ``plaintext`` as a compact JWE (``dir`` + ``A256GCM``).

    ``iv`` must be 12 fresh random bytes, never reused with the same ``key``; the
    caller supplies it so this function stays deterministic.
    """
    if len(key) != KEY_BYTES:
        raise InvalidInput(f"JWE key must be {KEY_BYTES} bytes for A256GCM, got {len(key)}")
    if len(iv) != IV_BYTES:
        raise InvalidInput(f"JWE IV must be {IV_BYTES} bytes for A256GCM, got {len(iv)}")
    if not content_type:
        raise InvalidInput("JWE content type (cty) must not be empty")
    header_b64 = _protected_header(content_type)
    sealed = AESGCM(key).encrypt(iv, plaintext, header_b64.encode("ascii"))
    ciphertext, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
    return ".".join(
        [header_b64, "", b64url_encode(iv), b64url_encode(ciphertext), b64url_encode(tag)]
    )


def _parse_header(header_b64: str) -> dict[str, object]:
    raw = b64url_decode(header_b64, what="JWE protected header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput("JWE protected header is not JSON") from exc
    if not isinstance(header, dict):
        raise InvalidInput("JWE protected header is not a JSON object")
    return header


def jwe_header(token: str) -> dict[str, object]:
    """The decoded protected header of a compact JWE (unauthenticated until decrypted)."""
    return _parse_header(_split_jwe(token)[0])


def _split_jwe(token: str) -> list[str]:
    if not isinstance(token, str):
        raise InvalidInput("JWE must be a string in compact serialization")
    parts = token.strip().split(".")
    if len(parts) != 5:
        raise InvalidInput(
            f"JWE compact serialization has 5 dot-separated parts, this has {len(parts)}"
        )
    return parts


def decrypt_jwe(token: str, key: bytes) -> bytes:
    """Decrypt a compact JWE made by :func:`encrypt_jwe` (or any ``dir``/``A256GCM`` JWE).

    Raises ``InvalidInput`` for malformed tokens and unsupported algorithms, and
    ``IntegrityError`` when the authentication tag does not verify (tampered
    header, IV, ciphertext or tag, or the wrong key).
    """
    header_b64, encrypted_key, iv_b64, ct_b64, tag_b64 = _split_jwe(token)
    header = _parse_header(header_b64)
    if header.get("alg") != JWE_ALG:
        raise InvalidInput(
            f"JWE alg must be {JWE_ALG!r} for SMART Health Links, got {header.get('alg')!r}"
        )
    if header.get("enc") != JWE_ENC:
        raise InvalidInput(
            f"JWE enc must be {JWE_ENC!r} for SMART Health Links, got {header.get('enc')!r}"
        )
    if "zip" in header:
        raise InvalidInput(f"JWE zip={header['zip']!r} is not supported; send uncompressed")
    if encrypted_key != "":
        raise InvalidInput("JWE with alg 'dir' must have an empty encrypted-key part")
    if len(key) != KEY_BYTES:
        raise InvalidInput(f"JWE key must be {KEY_BYTES} bytes for A256GCM, got {len(key)}")
    iv = b64url_decode(iv_b64, what="JWE IV")
    tag = b64url_decode(tag_b64, what="JWE authentication tag")
    ciphertext = b64url_decode(ct_b64, what="JWE ciphertext")
    if len(iv) != IV_BYTES:
        raise InvalidInput(f"JWE IV must be {IV_BYTES} bytes, got {len(iv)}")
    if len(tag) != TAG_BYTES:
        raise InvalidInput(f"JWE authentication tag must be {TAG_BYTES} bytes, got {len(tag)}")
    return _open_a256gcm(header_b64, iv, ciphertext, tag, key)


def _open_a256gcm(header_b64: str, iv: bytes, ciphertext: bytes, tag: bytes, key: bytes) -> bytes:
    """JWE A256GCM content decryption (RFC 7516 section 5.2 steps 14-16)."""
    try:
        return AESGCM(key).decrypt(iv, ciphertext + tag, header_b64.encode("ascii"))
    except InvalidTag as exc:
        raise IntegrityError(
            "JWE authentication failed: the file was altered or the key is wrong",
            hint="fetch the file again from the manifest; do not trust its content",
        ) from exc


# ----------------------------------------------------------------------------- payload


def _validate_flag(flag: str | None) -> None:
    if flag is None:
        return
    if not isinstance(flag, str) or not flag:
        raise InvalidInput("SHLink flag must be a non-empty string of letters such as 'LP'")
    unknown = sorted(set(flag) - KNOWN_FLAGS)
    if unknown:
        raise InvalidInput(
            f"SHLink flag has unknown letters {''.join(unknown)!r}; known flags are L, P and U"
        )
    if len(set(flag)) != len(flag) or list(flag) != sorted(flag):
        raise InvalidInput(
            f"SHLink flag {flag!r} must list each letter once, in alphabetical order"
        )
    if "U" in flag and "P" in flag:
        raise InvalidInput("SHLink flag 'U' (direct file) cannot be combined with 'P' (passcode)")


@dataclass(frozen=True)
class ShlPayload:
    """The JSON payload inside a ``shlink:/`` link.

    ``key`` is the 43-character base64url form of the 32-byte file key; ``exp`` is
    the expiry in seconds since the epoch; ``flag`` concatenates L (long-term), P
    (passcode required) and U (direct file, no manifest) in alphabetical order.
    """

    url: str
    key: str
    exp: int | None = None
    flag: str | None = None
    label: str | None = None
    v: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise InvalidInput("SHLink url (the manifest location) is missing")
        if not self.url.startswith("https://") and not self.url.startswith("http://"):
            raise InvalidInput(f"SHLink url must be an http(s) URL, got {self.url[:40]!r}")
        if not isinstance(self.key, str) or len(self.key) != 43:
            length = len(self.key) if isinstance(self.key, str) else type(self.key).__name__
            raise InvalidInput(
                f"SHLink key must be 43 base64url characters (32 bytes), got {length}"
            )
        if len(b64url_decode(self.key, what="SHLink key")) != KEY_BYTES:  # pragma: no cover
            raise InvalidInput("SHLink key does not decode to 32 bytes")
        if self.exp is not None and (
            isinstance(self.exp, bool) or not isinstance(self.exp, int) or self.exp < 0
        ):
            raise InvalidInput(f"SHLink exp must be whole epoch seconds, got {self.exp!r}")
        _validate_flag(self.flag)
        if self.label is not None:
            if not isinstance(self.label, str):
                raise InvalidInput("SHLink label must be a string")
            if len(self.label) > MAX_LABEL_CHARS:
                raise InvalidInput(
                    f"SHLink label is {len(self.label)} characters; the limit is {MAX_LABEL_CHARS}"
                )
        if self.v != 1 or isinstance(self.v, bool):
            raise InvalidInput(f"SHLink version v={self.v!r} is not supported (only 1)")

    @property
    def key_bytes(self) -> bytes:
        """The 32-byte file decryption key."""
        return b64url_decode(self.key, what="SHLink key")

    @property
    def requires_passcode(self) -> bool:
        return self.flag is not None and "P" in self.flag

    @property
    def direct_file(self) -> bool:
        return self.flag is not None and "U" in self.flag

    def is_expired(self, now_epoch: int) -> bool:
        """True when ``exp`` is set and ``now_epoch`` (seconds) is at or past it."""
        return self.exp is not None and now_epoch >= self.exp

    def to_json(self) -> dict[str, object]:
        """The payload as JSON, optional members left out when unset."""
        out: dict[str, object] = {"url": self.url, "key": self.key}
        if self.exp is not None:
            out["exp"] = self.exp
        if self.flag is not None:
            out["flag"] = self.flag
        if self.label is not None:
            out["label"] = self.label
        out["v"] = self.v
        return out

    @classmethod
    def with_key_bytes(
        cls,
        url: str,
        key: bytes,
        *,
        exp: int | None = None,
        flag: str | None = None,
        label: str | None = None,
    ) -> ShlPayload:
        """Build a payload from the raw 32-byte key."""
        if len(key) != KEY_BYTES:
            raise InvalidInput(f"SHLink key must be {KEY_BYTES} bytes, got {len(key)}")
        return cls(url=url, key=b64url_encode(key), exp=exp, flag=flag, label=label)


def encode_shlink(payload: ShlPayload, viewer_prefix: str | None = None) -> str:
    """``shlink:/`` + base64url(JSON payload), behind ``viewer_prefix#`` when given."""
    body = json.dumps(payload.to_json(), separators=(",", ":"), ensure_ascii=False)
    link = SHLINK_PREFIX + b64url_encode(body.encode("utf-8"))
    if viewer_prefix is None:
        return link
    return viewer_prefix.rstrip("#") + "#" + link


def decode_shlink(link: str) -> ShlPayload:
    """Parse a bare ``shlink:/...`` or a viewer-prefixed ``https://...#shlink:/...`` link."""
    if not isinstance(link, str):
        raise InvalidInput("SHLink must be a string")
    text = link.strip()
    if "#" in text:
        text = text.split("#", 1)[1]
    if not text.startswith(SHLINK_PREFIX):
        raise InvalidInput("not a SMART Health Link: it must contain 'shlink:/'")
    raw = b64url_decode(text[len(SHLINK_PREFIX) :], what="SHLink payload")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput("SHLink payload is not UTF-8 JSON") from exc
    if not isinstance(data, dict):
        raise InvalidInput("SHLink payload is not a JSON object")
    missing = [name for name in ("url", "key") if name not in data]
    if missing:
        raise InvalidInput(f"SHLink payload lacks required member(s): {', '.join(missing)}")
    exp = data.get("exp")
    if isinstance(exp, float) and exp.is_integer():
        exp = int(exp)
    return ShlPayload(
        url=data["url"],
        key=data["key"],
        exp=exp,
        flag=data.get("flag"),
        label=data.get("label"),
        v=data.get("v", 1),
    )


# ---------------------------------------------------------------------- manifest, QR


def manifest_response(files: list[tuple[str, str]]) -> dict[str, list[dict[str, str]]]:
    """The SHL manifest body listing each file by ``contentType`` and ``location``."""
    out: list[dict[str, str]] = []
    for entry in files:
        try:
            content_type, location = entry
        except (TypeError, ValueError) as exc:
            raise InvalidInput("each manifest file is a (content_type, location) pair") from exc
        if not content_type or not location:
            raise InvalidInput("manifest file needs both a content type and a location URL")
        out.append({"contentType": content_type, "location": location})
    return {"files": out}


def _qr(link: str) -> segno.QRCode:
    if not link:
        raise InvalidInput("cannot draw a QR code for an empty link")
    return segno.make(link, error="m", micro=False, boost_error=False)


def qr_png(link: str, scale: int = 4) -> bytes:
    """The link as a PNG QR code (error correction M)."""
    buf = io.BytesIO()
    _qr(link).save(buf, kind="png", scale=scale, border=4)
    return buf.getvalue()


def qr_svg(link: str, scale: int = 4) -> str:
    """The link as an SVG QR code (error correction M), as text."""
    buf = io.BytesIO()
    _qr(link).save(buf, kind="svg", scale=scale, border=4, xmldecl=False)
    return buf.getvalue().decode("utf-8")
