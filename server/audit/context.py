"""Who is acting, for the records written while they act.

The API edge sets the actor (and the request id) for the duration of one call::

    with acting_as(Actor("admin", "uid=1000 pid=4242"), request_id=rid):
        await asyncio.to_thread(datastore.create_registration_entries, entries)

The actor lives in a :class:`contextvars.ContextVar`, so it follows the call into
``asyncio.to_thread`` and into tasks it starts, and never leaks into another call.
Outside any call (CA rotation, housekeeping) the actor is the server itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from server.audit.records import Actor

__all__ = [
    "ADMIN_PID_KEY",
    "ADMIN_UID_KEY",
    "CallContext",
    "acting_as",
    "current",
    "identify",
    "set_server_actor",
]


ADMIN_UID_KEY = "credo-admin-uid"
"""Metadata key: the uid of the process making an admin call (the CLI sets it)."""
ADMIN_PID_KEY = "credo-admin-pid"
"""Metadata key: the pid of the process making an admin call (the CLI sets it)."""


@dataclass(frozen=True)
class CallContext:
    """The actor of the current call and its request id."""

    actor: Actor
    request_id: str = ""


_SERVER = CallContext(Actor("server", ""))
_current: ContextVar[CallContext | None] = ContextVar("credo_audit_call", default=None)
_server_actor: list[CallContext] = [_SERVER]  # one slot: this process's server identity


def set_server_actor(server_id: str) -> None:
    """Name this process's server (its server id) as the actor of its own actions."""
    _server_actor[0] = CallContext(Actor("server", server_id))


def current() -> CallContext:
    """The current call's actor and request id (the server when no call is active)."""
    found = _current.get()
    return found if found is not None else _server_actor[0]


@contextmanager
def acting_as(actor: Actor, *, request_id: str = "") -> Iterator[CallContext]:
    """Make ``actor`` the actor of every record written inside the block."""
    ctx = CallContext(actor, request_id or str(uuid.uuid4()))
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def identify(actor: Actor, *, request_id: str = "") -> CallContext:
    """Make ``actor`` the actor for the rest of the current task, without a block.

    For a gRPC handler, which runs in a task of its own per call: once it has
    authenticated its caller it names them here, and the task's context ends with it.
    """
    ctx = CallContext(actor, request_id or current().request_id or str(uuid.uuid4()))
    _current.set(ctx)
    return ctx
