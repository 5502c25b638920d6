"""The canonical encoder: sorted-key compact JSON (orjson), UTF-8.

Every byte that is signed or hashed in medledger is made here, so two nodes
always produce the same bytes for the same value. Binary values travel as
unpadded base64url strings (``b64e``/``b64d``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import orjson

from medledger.errors import InvalidInput

# Passthrough makes orjson refuse (TypeError) datetimes and dataclasses instead of
# silently inventing a JSON form for them: only JSON values are canonical.
_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def canonical(value: Any) -> bytes:
    """Encode ``value`` canonically. Raises ``InvalidInput`` for non-JSON values.

    The result is a right-sized copy: orjson (3.12+) returns bytes whose allocation is
    never trimmed (at least 4 KiB, else a power of two above the length: a 600-byte
    state entry holds 8 KiB, a 720 KiB import part 8 MiB), and canonical bytes are what
    medledger keeps — state entries, txs, staged parts (issue 10: import peak RSS).
    """
    try:
        return bytes(memoryview(orjson.dumps(value, option=_OPTS)))
    except TypeError as exc:
        raise InvalidInput(f"value cannot be canonically encoded: {exc}") from exc


def loads(data: bytes | str) -> Any:
    """Parse JSON; malformed input raises ``InvalidInput`` with the parser's position."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from exc


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str, *, field: str = "value", size: int | None = None) -> bytes:
    """Decode canonical unpadded base64url.

    Wrong alphabet, padding, non-zero trailing bits or a wrong ``size`` raise
    ``InvalidInput`` naming ``field``.
    """
    if not isinstance(text, str):
        raise InvalidInput(f"{field} must be a base64url string")
    if not _B64URL_RE.fullmatch(text):
        raise InvalidInput(f"{field} is not valid base64url (unpadded, alphabet A-Z a-z 0-9 - _)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{field} is not valid base64url") from exc
    if b64e(raw) != text:  # non-zero trailing bits: one value, one encoding
        raise InvalidInput(f"{field} is not canonical base64url")
    if size is not None and len(raw) != size:
        raise InvalidInput(f"{field} must be {size} bytes, got {len(raw)}")
    return raw
