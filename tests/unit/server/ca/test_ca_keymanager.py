"""Tests for the CA key managers (disk and memory)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from credo.keys import KeyType, private_key_to_pkcs8_der, private_key_to_pkcs8_pem
from server.ca.keymanager import DiskKeyManager, MemoryKeyManager


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_0600_and_directory_0700(tmp_path: Path) -> None:
    """A generated key is a PKCS#8 PEM file with mode 0600 in a 0700 directory."""
    km = DiskKeyManager(tmp_path / "keys")
    key = km.generate_key("jwt-abc", KeyType.EC_P256)
    path = tmp_path / "keys" / "jwt-abc.pem"
    assert _mode(path) == 0o600
    assert _mode(tmp_path / "keys") == 0o700
    assert path.read_bytes() == private_key_to_pkcs8_pem(key)


def test_existing_directory_is_tightened_to_0700(tmp_path: Path) -> None:
    """An existing, too-open key directory is chmod-ed to 0700."""
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    DiskKeyManager(directory)
    assert _mode(directory) == 0o700


def test_file_is_created_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    """The key file never has group/other bits, whatever the umask."""
    old = os.umask(0)
    try:
        km = DiskKeyManager(tmp_path / "keys")
        km.generate_key("k1", "ec-p256")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "keys" / "k1.pem") == 0o600


def test_replace_is_whole_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """Writing a key twice replaces the file whole and leaves no temporary file behind."""
    km = DiskKeyManager(tmp_path / "keys")
    km.generate_key("k", KeyType.RSA_2048)
    second = km.generate_key("k", KeyType.EC_P256)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["k.pem"]
    assert (tmp_path / "keys" / "k.pem").read_bytes() == private_key_to_pkcs8_pem(second)


def test_failed_rename_keeps_old_key_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the rename fails, the old key file is untouched and the temp file is removed."""
    km = DiskKeyManager(tmp_path / "keys")
    first = km.generate_key("k", KeyType.EC_P256)

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        km.generate_key("k", KeyType.EC_P256)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["k.pem"]
    assert (tmp_path / "keys" / "k.pem").read_bytes() == private_key_to_pkcs8_pem(first)


def test_stray_temp_file_is_removed_on_open(tmp_path: Path) -> None:
    """A temporary file left by a crash mid-write is deleted when the manager opens."""
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / ".tmp-k-0123").write_bytes(b"partial")
    km = DiskKeyManager(directory)
    assert list(directory.iterdir()) == []
    assert km.list_key_ids() == []


def test_keys_survive_restart(tmp_path: Path) -> None:
    """A new manager on the same directory loads the same keys and lists them."""
    km = DiskKeyManager(tmp_path / "keys")
    a = km.generate_key("x509-ca-aa", KeyType.EC_P384)
    b = km.generate_key("jwt-bb", KeyType.EC_P256)
    reopened = DiskKeyManager(tmp_path / "keys")
    assert reopened.list_key_ids() == ["jwt-bb", "x509-ca-aa"]
    loaded_a = reopened.get_key("x509-ca-aa")
    loaded_b = reopened.get_key("jwt-bb")
    assert loaded_a is not None and loaded_b is not None
    assert private_key_to_pkcs8_der(loaded_a) == private_key_to_pkcs8_der(a)
    assert private_key_to_pkcs8_der(loaded_b) == private_key_to_pkcs8_der(b)


def test_delete_and_missing(tmp_path: Path) -> None:
    """A deleted or never-stored key reads as None, and deleting twice is not an error."""
    km = DiskKeyManager(tmp_path / "keys")
    km.generate_key("k", KeyType.EC_P256)
    km.delete_key("k")
    km.delete_key("k")
    assert km.get_key("k") is None
    assert km.list_key_ids() == []


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "a/b", ".hidden", "x" * 200])
def test_unsafe_key_ids_are_refused(tmp_path: Path, bad: str) -> None:
    """Key ids that are not plain file names are refused before touching the disk."""
    km = DiskKeyManager(tmp_path / "keys")
    with pytest.raises(ValueError, match="invalid key id"):
        km.generate_key(bad, KeyType.EC_P256)


def test_memory_key_manager_round_trip() -> None:
    """The memory key manager stores, lists, returns and deletes keys."""
    km = MemoryKeyManager()
    key = km.generate_key("jwt-x", KeyType.EC_P256)
    assert km.get_key("jwt-x") is key
    assert km.list_key_ids() == ["jwt-x"]
    km.delete_key("jwt-x")
    assert km.get_key("jwt-x") is None
