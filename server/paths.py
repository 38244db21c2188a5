"""Where the server keeps things on disk: the data dir, its server id, the admin socket.

* :func:`private_dir` creates a directory only this user can enter (0700);
* :func:`load_server_id` reads (or creates once) ``<data-dir>/server_id``, the id that
  names the owner of this server's CA authorities in a shared datastore;
* :func:`default_admin_socket` is where the admin socket goes by default (under ``/run``
  as root);
* :func:`prepare_admin_socket` makes sure the admin socket's directory is private and
  removes a stale socket of a server that is gone.
"""

from __future__ import annotations

import os
import socket
import stat
import uuid
from pathlib import Path

from credo._paths import check_path_chain, check_private_dir, default_runtime_path

__all__ = ["default_admin_socket", "load_server_id", "prepare_admin_socket", "private_dir"]

ADMIN_SOCKET_HELP = (
    "/run/credo-server/private/api.sock as root, else /tmp/credo-server-<uid>/private/api.sock"
)
"""The default admin socket, in words (for ``--help`` and docs)."""


def default_admin_socket() -> Path:
    """Where the admin socket is when nothing says otherwise: ``/run/credo-server/private/
    api.sock`` as root, else ``/tmp/credo-server-<uid>/private/api.sock`` (per user).

    The server and its CLI use the same default, so ``credo-server bundle show`` finds the
    socket ``credo-server run`` made as the same user.
    """
    return default_runtime_path("credo-server", "private/api.sock", per_user=True)


def private_dir(path: Path, what: str = "data directory") -> Path:
    """Create ``path`` (and parents) and make it 0700.

    Refuses (:class:`~credo._paths.UnsafePath`) a path under a directory another user could
    tamper with, and an existing directory another user owns or may write to: they could
    have put their own datastore or keys in it (:mod:`credo._paths`).
    """
    check_path_chain(path, what, skip_leaf_mode=True)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_private_dir(path, what)
    os.chmod(path, 0o700)
    return path


def load_server_id(data_dir: Path) -> str:
    """This server's stable id, from ``<data-dir>/server_id`` (a random UUID made once).

    It names the owner of the CA authorities this server manages when several servers
    share one datastore. Created atomically: a temp file linked into place, so two
    processes racing on one data dir end up with the same id.
    """
    path = data_dir / "server_id"
    if not path.exists():
        _create_server_id(path)
    text = path.read_text().strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise OSError(
            f"{path} holds {text[:40]!r}; expected a server id (a UUID). Remove the file only "
            "if this server's keys are gone too: a new id orphans this server's authorities"
        ) from None


def _create_server_id(path: Path) -> None:
    tmp = path.with_name(f".server_id.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{uuid.uuid4()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process won the race; use its id
    finally:
        tmp.unlink(missing_ok=True)


def prepare_admin_socket(path: Path) -> None:
    """Make the socket's directory private (0700), refusing one that others can reach.

    A directory Credo creates is made 0700. An existing one is never chmod'ed: pointing
    ``--admin-socket`` at ``/tmp/api.sock`` must not lock everyone else out of ``/tmp``,
    and a directory others can enter would let them reach the admin API.
    """
    parent = path.parent
    if parent.exists():
        st = parent.stat()
        if st.st_uid != os.geteuid():
            raise OSError(
                f"admin socket directory {parent} is owned by uid {st.st_uid}, not by this "
                f"server's uid {os.geteuid()}"
            )
        if st.st_mode & 0o077:
            raise OSError(
                f"admin socket directory {parent} is open to other users (mode "
                f"{stat.S_IMODE(st.st_mode):o}); the admin socket needs a private (0700) "
                "directory of its own, e.g. /run/credo-server/private/api.sock"
            )
    else:
        private_dir(parent, "admin socket directory")
    # An ancestor someone else owns lets them rename this directory and put their own
    # socket in its place, to serve root's next CLI call.
    check_path_chain(parent, "admin socket directory")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"admin socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a server that is gone
        else:
            raise OSError(f"admin socket {path} is in use by another server")
        finally:
            probe.close()
