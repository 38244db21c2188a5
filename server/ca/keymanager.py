"""Where the CA keeps its private keys: a ``KeyManager`` protocol and two implementations.

* :class:`DiskKeyManager` — one PKCS#8 PEM file per key in a 0700 directory. Each file
  is created 0600 (never readable by others, not even for an instant) and written
  atomically: a temporary file in the same directory, fsync, rename over the target,
  fsync of the directory. A crash therefore leaves either the old key or the new one,
  never a partial file; stray temporary files are removed on open.
* :class:`MemoryKeyManager` — keys in a dict, for tests.

Key ids are short names such as ``x509-ca-<authority id>`` or ``jwt-<kid>``; they are
restricted to letters, digits, ``.``, ``_`` and ``-`` so they are safe file names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Protocol

from credo._files import TEMP_PREFIX, fsync_directory, write_atomically
from credo._paths import check_private_dir, check_private_file
from credo.keys import (
    KeyType,
    PrivateKey,
    generate_private_key,
    key_type_of,
    load_private_key,
    private_key_to_pkcs8_pem,
)

__all__ = ["DiskKeyManager", "KeyManager", "MemoryKeyManager", "check_key_id", "read_key_file"]

log = logging.getLogger(__name__)

_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SUFFIX = ".pem"
_TMP_PREFIX = TEMP_PREFIX


def check_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is a safe key name; raise ValueError otherwise."""
    if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
        raise ValueError(
            f"invalid key id {key_id!r}; expected 1-128 letters, digits, '.', '_' or '-'"
        )
    return key_id


def read_key_file(directory: Path | str, key_id: str) -> PrivateKey | None:
    """Load the key a :class:`DiskKeyManager` stored under ``key_id`` in ``directory``.

    Read-only (no directory creation or cleanup), so signing worker processes can load the
    CA key themselves. None if there is no such file; InvalidKey if it is unreadable.
    """
    path = Path(directory) / (check_key_id(key_id) + _SUFFIX)
    check_private_file(path, "key file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return load_private_key(data)


class KeyManager(Protocol):
    """Creates, loads and deletes the CA's private keys by key id."""

    def generate_key(self, key_id: str, key_type: KeyType | str) -> PrivateKey:
        """Generate a key of ``key_type``, store it under ``key_id`` (replacing any), return it."""
        ...

    def store_key(self, key_id: str, key: PrivateKey) -> None:
        """Store an existing ``key`` under ``key_id`` (replacing any).

        For keys whose id derives from the public key (an X.509 CA's id is its SKI).
        """
        ...

    def get_key(self, key_id: str) -> PrivateKey | None:
        """The key stored under ``key_id``, or None."""
        ...

    def delete_key(self, key_id: str) -> None:
        """Delete the key stored under ``key_id``; no error if there is none."""
        ...

    def list_key_ids(self) -> list[str]:
        """Every stored key id, sorted."""
        ...


class MemoryKeyManager:
    """A :class:`KeyManager` that keeps keys in memory (tests, ephemeral servers)."""

    def __init__(self) -> None:
        self._keys: dict[str, PrivateKey] = {}
        self._lock = threading.Lock()

    def generate_key(self, key_id: str, key_type: KeyType | str) -> PrivateKey:
        """Generate a key of ``key_type`` and keep it under ``key_id``."""
        key = generate_private_key(key_type)
        self.store_key(key_id, key)
        return key

    def store_key(self, key_id: str, key: PrivateKey) -> None:
        """Keep ``key`` under ``key_id``."""
        check_key_id(key_id)
        with self._lock:
            self._keys[key_id] = key

    def get_key(self, key_id: str) -> PrivateKey | None:
        """The key kept under ``key_id``, or None."""
        with self._lock:
            return self._keys.get(key_id)

    def delete_key(self, key_id: str) -> None:
        """Forget the key kept under ``key_id``."""
        with self._lock:
            self._keys.pop(key_id, None)

    def list_key_ids(self) -> list[str]:
        """Every key id kept, sorted."""
        with self._lock:
            return sorted(self._keys)


class DiskKeyManager:
    """A :class:`KeyManager` storing one PKCS#8 PEM file (mode 0600) per key in ``directory``.

    The directory is created with mode 0700 if missing, and tightened to 0700 if it exists.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_dir(self.directory, "key directory")
        os.chmod(self.directory, 0o700)
        self._lock = threading.Lock()
        self._remove_stray_temp_files()

    def _path(self, key_id: str) -> Path:
        return self.directory / (check_key_id(key_id) + _SUFFIX)

    def _remove_stray_temp_files(self) -> None:
        """Delete temporary files a crash left behind mid-write."""
        for path in self.directory.glob(_TMP_PREFIX + "*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            log.warning("removed stray temporary key file", extra={"path": str(path)})

    def _fsync_directory(self) -> None:
        fsync_directory(self.directory)

    def _write_atomically(self, key_id: str, data: bytes) -> None:
        """Write ``data`` to the key file of ``key_id``: 0600 temp file, fsync, rename."""
        write_atomically(self._path(key_id), data, 0o600)

    def generate_key(self, key_id: str, key_type: KeyType | str) -> PrivateKey:
        """Generate a key of ``key_type`` and write it atomically to ``<key_id>.pem``."""
        check_key_id(key_id)
        key = generate_private_key(key_type)
        self.store_key(key_id, key)
        return key

    def store_key(self, key_id: str, key: PrivateKey) -> None:
        """Write ``key`` atomically to ``<key_id>.pem`` (mode 0600), replacing any file."""
        check_key_id(key_id)
        with self._lock:
            self._write_atomically(key_id, private_key_to_pkcs8_pem(key))
        log.info("stored private key", extra={"key_id": key_id, "key_type": str(key_type_of(key))})

    def get_key(self, key_id: str) -> PrivateKey | None:
        """Load ``<key_id>.pem``; None if it does not exist (InvalidKey if unreadable)."""
        return read_key_file(self.directory, key_id)

    def delete_key(self, key_id: str) -> None:
        """Remove ``<key_id>.pem`` (and fsync the directory); no error if it is gone."""
        path = self._path(key_id)
        with self._lock:
            try:
                path.unlink()
            except FileNotFoundError:
                return
            self._fsync_directory()
        log.info("deleted private key", extra={"key_id": key_id})

    def list_key_ids(self) -> list[str]:
        """Every key id with a file in the directory, sorted."""
        ids = []
        for path in self.directory.iterdir():
            name = path.name
            if name.startswith(_TMP_PREFIX) or not name.endswith(_SUFFIX):
                continue
            key_id = name[: -len(_SUFFIX)]
            if _KEY_ID.match(key_id):
                ids.append(key_id)
        return sorted(ids)
