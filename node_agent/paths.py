"""Where the agent's sockets are by default, and the check a CLI makes before it connects.

As root both sockets live under ``/run/credo-agent`` (``/run`` is root's, so nobody can
create the directories first, as in SPIRE's packages); otherwise under ``/tmp/credo-agent``,
a name every workload can find. The CLI commands that connect to a socket first refuse a
path another local user could have put their own socket at (:func:`check_socket_to_dial`).
"""

from __future__ import annotations

import os
from pathlib import Path

from credo._paths import UnsafePath, check_path_chain, default_runtime_path

__all__ = [
    "ADMIN_SOCKET_HELP",
    "WORKLOAD_SOCKET_HELP",
    "check_socket_to_dial",
    "default_agent_admin_socket",
    "default_workload_socket",
    "workload_socket_to_dial",
]

WORKLOAD_SOCKET_HELP = (
    "/run/credo-agent/public/api.sock as root, else /tmp/credo-agent/public/api.sock"
)
ADMIN_SOCKET_HELP = (
    "/run/credo-agent/private/admin.sock as root, else /tmp/credo-agent/private/admin.sock"
)

_RUN_WORKLOAD_SOCKET = Path("/run/credo-agent/public/api.sock")
_TMP_WORKLOAD_SOCKET = Path("/tmp/credo-agent/public/api.sock")


def default_workload_socket() -> Path:
    """The Workload API socket an agent serves by default (see the module docstring)."""
    return default_runtime_path("credo-agent", "public/api.sock", per_user=False)


def default_agent_admin_socket() -> Path:
    """The agent's private admin (health) socket by default."""
    return default_runtime_path("credo-agent", "private/admin.sock", per_user=False)


def workload_socket_to_dial() -> Path:
    """The Workload API socket a workload dials without ``SPIFFE_ENDPOINT_SOCKET``: a
    root-run agent's under ``/run`` when it exists, else the one under ``/tmp``."""
    if _RUN_WORKLOAD_SOCKET.exists():
        return _RUN_WORKLOAD_SOCKET
    return _TMP_WORKLOAD_SOCKET


def check_socket_to_dial(path: Path | str, what: str, *, agent_owned: bool = False) -> None:
    """Refuse (:class:`~credo._paths.UnsafePath`) a socket whose directory, or a directory
    above it, someone else could have renamed or replaced to plant their own socket.

    The admin socket is dialled by the agent's user or root: every directory must be
    theirs. A workload dialling the Workload API (``agent_owned``) also accepts a socket
    directory of another user (the agent's), but not above it: ``/tmp/credo-agent`` made by
    someone else is refused, so use ``/run`` (or a directory of root's) for an agent that
    serves other users. A directory that does not exist, or that this user may not look
    into, passes: connecting then says it is missing, or permission denied.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        agent_uid = os.stat(directory).st_uid if agent_owned else None
        check_path_chain(directory, what, agent_uid=agent_uid)
    except UnsafePath:
        raise
    except OSError:
        return
