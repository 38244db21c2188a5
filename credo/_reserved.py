"""Names Credo keeps for its own signing server, so that no workload SVID can carry them.

Agents dial the server by address but check its certificate against
:data:`SERVER_TLS_NAME` (gRPC's ``ssl_target_name_override``). Were that name one a
registration entry could also ask for (``localhost``, say), a workload holding such an
SVID could pose as the server to agents on the network path. The server therefore
refuses every DNS name under :data:`RESERVED_DNS_SUFFIX` in entries and minted SVIDs.
``.invalid`` is reserved by RFC 2606, so the name can never resolve or be issued
publicly.
"""

from __future__ import annotations

__all__ = ["RESERVED_DNS_SUFFIX", "SERVER_TLS_NAME", "is_reserved_dns_name"]

RESERVED_DNS_SUFFIX = "credo.invalid"
SERVER_TLS_NAME = f"server.{RESERVED_DNS_SUFFIX}"


def is_reserved_dns_name(name: str) -> bool:
    """True for ``credo.invalid`` and every name (wildcards included) under it."""
    lowered = name.lower().rstrip(".")
    return lowered == RESERVED_DNS_SUFFIX or lowered.endswith("." + RESERVED_DNS_SUFFIX)
