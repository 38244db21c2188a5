"""The server's files and sockets on disk: the admin socket needs a private directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.server import InProcessServer


def test_admin_socket_in_a_shared_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    """An admin socket in a directory others can enter fails start, and the mode is untouched."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    server = InProcessServer(tmp_path, admin_socket=shared / "api.sock")
    with pytest.raises(OSError, match="open to other users"):
        server.start()
    assert shared.stat().st_mode & 0o7777 == 0o1777
