"""Files only this user may read: keystores, onboarding and recovery state, and what the
CLI writes out for a user (decrypted exports, share and activation QR codes, PDFs).

``write_private`` is the one way such a file is written: created ``0600`` from its first
byte (never written first and narrowed after), under a temporary name, then renamed
over the target, so a reader sees the old file or the whole new one, never a mix, and an
existing world-readable file is replaced by a private one.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_private"]


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` atomically, mode ``0600``.

    ``exclusive``: raise ``FileExistsError`` if ``path`` exists (checked by the final
    hard link, so two writers cannot both succeed). A symlink is followed (its target is
    replaced); a device or FIFO (``--out /dev/stdout``) is written through, as is."""
    path = Path(os.path.realpath(path))
    if not exclusive and path.exists() and not path.is_file():
        with open(path, "wb") as out:
            out.write(data)
        return
    tmp = path.with_name(f".{os.getpid()}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o600)  # exactly 0600, whatever the umask took away
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
