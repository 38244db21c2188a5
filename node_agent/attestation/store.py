"""The agent's credentials on disk: its SVID, its key and the trust bundle, in the data dir.

Files (all written atomically: a 0600 temporary file in the same directory, fsync,
rename over the target, fsync of the directory):

* ``agent_svid.pem`` — the agent SVID chain, leaf first;
* ``agent_key.pem`` — its PKCS#8 private key (0600, never readable by others);
* ``bundle.pem`` — the trust domain's X.509 authorities the agent last saw.

A restarted agent resumes with these instead of a new join token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from credo._files import write_atomically
from credo._paths import check_path_chain, check_private_dir, check_private_file
from credo.bundle import load_certificates
from credo.errors import CredoError
from credo.x509svid import X509Svid

__all__ = ["StoredCredentials", "SvidStore", "atomic_write"]

SVID_FILE = "agent_svid.pem"
KEY_FILE = "agent_key.pem"
BUNDLE_FILE = "bundle.pem"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old file or the new one."""
    write_atomically(path, data, mode)


@dataclass(frozen=True)
class StoredCredentials:
    """What a previous run left: the agent SVID and the trust bundle's authorities."""

    svid: X509Svid
    authorities: tuple[x509.Certificate, ...]


class SvidStore:
    """Reads and writes the agent's credentials under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)

    @property
    def svid_path(self) -> Path:
        return self.data_dir / SVID_FILE

    @property
    def key_path(self) -> Path:
        return self.data_dir / KEY_FILE

    @property
    def bundle_path(self) -> Path:
        return self.data_dir / BUNDLE_FILE

    def _ensure_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def prepare(self) -> None:
        """Create the data directory (0700), refusing one another user could tamper with.

        A directory someone else owns or may write to, or one under such a directory, could
        hold their key and SVID in place of the agent's (:mod:`credo._paths`).
        """
        check_path_chain(self.data_dir, "data directory", skip_leaf_mode=True)
        self._ensure_dir()
        check_private_dir(self.data_dir, "data directory")
        for path in (self.svid_path, self.key_path, self.bundle_path):
            check_private_file(path, "agent credentials file")

    def load(self) -> StoredCredentials | None:
        """The stored credentials, or None if any file is missing or unreadable."""
        try:
            chain = self.svid_path.read_bytes()
            key = self.key_path.read_bytes()
            bundle = self.bundle_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            svid = X509Svid.parse(chain, key)
            authorities = tuple(load_certificates(bundle))
        except (CredoError, ValueError):
            return None
        if not authorities:
            return None
        return StoredCredentials(svid, authorities)

    def save_svid(self, svid: X509Svid) -> None:
        """Store the agent SVID and key (key first, so a crash never pairs a new chain
        with an old key unnoticed: :meth:`load` checks they match)."""
        self._ensure_dir()
        atomic_write(self.key_path, svid.marshal_key_pem())
        atomic_write(self.svid_path, svid.marshal_chain_pem())

    def save_bundle(self, authorities: tuple[x509.Certificate, ...]) -> None:
        """Store the trust bundle's X.509 authorities as PEM."""
        self._ensure_dir()
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in authorities)
        atomic_write(self.bundle_path, pem, 0o644)

    def delete(self) -> None:
        """Remove the stored SVID and key (the bundle is public and may stay)."""
        for path in (self.svid_path, self.key_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
