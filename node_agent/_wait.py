"""Waiting on an :class:`asyncio.Event` with a timeout, the one way the agent's loops do it."""

from __future__ import annotations

import asyncio

__all__ = ["wait_event"]


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True if it was set.

    Uses :func:`asyncio.timeout`, not :func:`asyncio.wait_for`: on Python 3.11 ``wait_for``
    can swallow a cancellation that arrives as the event fires, and the task never stops.
    """
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    return True
