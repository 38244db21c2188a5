"""When to renew a credential: written once for every SVID Credo renews.

The server's own TLS SVID, the agent SVID, workload X509-SVIDs and cached JWT-SVIDs are all
renewed at about half their lifetime, with +-10% jitter (SPIRE's default) so that many
credentials issued together do not all come back at the same moment.

The lifetime is counted from the later of ``NotBefore`` and the moment the credential
arrived: the server backdates ``NotBefore`` (10 s by default), so with a short TTL half of
``NotAfter - NotBefore`` could fall before the credential was even received, and the holder
would renew at once, forever.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["RENEWAL_JITTER", "renew_at"]

RENEWAL_JITTER = 0.1
"""Renewal happens at half-life, moved by up to this fraction of the half-life either way."""


def renew_at(
    not_before: float,
    not_after: float,
    *,
    received_at: float | None = None,
    jitter: float = RENEWAL_JITTER,
    rng: Callable[[], float] = random.random,
) -> float:
    """The Unix time at which a credential valid from ``not_before`` to ``not_after`` is renewed.

    ``received_at`` (when the holder got it) moves the start of the counted lifetime forward
    when it is later than ``not_before``. ``rng`` returns a float in [0, 1); the result lies in
    ``start + half * [1 - jitter, 1 + jitter)`` and never after ``not_after``.
    """
    start = not_before
    if received_at is not None:
        start = max(start, min(received_at, not_after))
    half = max(0.0, not_after - start) / 2
    moved = half * (1.0 + jitter * (2.0 * rng() - 1.0))
    return min(start + moved, not_after)
