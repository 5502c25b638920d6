"""storage.files.write_private: the one way a private file is written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medledger.storage.files import write_private


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # a umask that narrows nothing: the mode still comes out 0600
    try:
        write_private(tmp_path / "a.json", b"secret")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_bytes() == b"secret"
    assert _mode(tmp_path / "a.json") == 0o600
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left behind


def test_a_world_readable_file_is_replaced_by_a_private_one(tmp_path: Path) -> None:
    target = tmp_path / "export.json"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_private(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o600


def test_exclusive_refuses_an_existing_file_and_keeps_it(tmp_path: Path) -> None:
    target = tmp_path / "key.json"
    write_private(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_private(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["key.json"]


def test_a_symlink_is_followed_and_a_device_written_through(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_bytes(b"old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_private(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new" and _mode(real) == 0o600
    write_private(Path("/dev/null"), b"discarded")  # --out /dev/stdout and the like
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        write_private(fifo, b"piped")
        assert os.read(reader, 100) == b"piped"
    finally:
        os.close(reader)


def test_long_names_fit(tmp_path: Path) -> None:
    name = "x" * 250 + ".json"  # the temporary name does not grow with the target's
    write_private(tmp_path / name, b"ok")
    assert (tmp_path / name).read_bytes() == b"ok"


def test_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_private(tmp_path / "no" / "such.json", b"x")
