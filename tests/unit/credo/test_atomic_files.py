"""credo._files.write_atomically: the one way keys and SVIDs reach the disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from credo._files import TEMP_PREFIX, write_atomically


@pytest.mark.parametrize(
    "umask", [0o000, 0o022, 0o077], ids=["umask-000", "umask-022", "umask-077"]
)
def test_new_file_has_exactly_the_requested_mode(tmp_path: Path, umask: int) -> None:
    """A key file is 0600 whatever the process umask is."""
    old = os.umask(umask)
    try:
        write_atomically(tmp_path / "key.pem", b"secret", 0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "key.pem").read_bytes() == b"secret"


def test_replaces_whole_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """Rewriting a file swaps in the new content whole and leaves nothing else behind."""
    target = tmp_path / "svid.pem"
    write_atomically(target, b"old content that is longer", 0o644)
    write_atomically(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svid.pem"]


def test_failed_rename_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    """If the final rename fails, the old file is intact and the temporary file is gone."""
    target = tmp_path / "taken"
    target.mkdir()  # renaming a file over a directory fails
    (target / "x").write_bytes(b"")
    with pytest.raises(OSError):
        write_atomically(target, b"data")
    assert target.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
