"""Errors of the HTTP front end and the one JSON shape every HTTP error has.

Every error response, from any endpoint, is ``application/json``::

    {"error": "<code>", "error_description": "<what was wrong, for a person>"}

the shape of OAuth 2.0 (RFC 6749 5.2), so an OAuth client reads the token endpoint's errors
and every other endpoint's alike. A handler raises :class:`HttpError` (or a subclass); the
front end's middleware renders it. Anything else a handler raises is a bug: it is logged
with its traceback and the caller gets ``500 {"error": "server_error"}`` with no detail.

::

    CredoError
     └── HttpError(status, error, description)   rendered as the JSON shape above
"""

from __future__ import annotations

from collections.abc import Mapping

from credo.errors import CredoError

__all__ = [
    "ERROR_CODES",
    "HttpError",
]

ERROR_CODES: Mapping[int, str] = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    500: "server_error",
    502: "bad_gateway",
    503: "temporarily_unavailable",
}
"""The default ``error`` code for each status, when a handler gives none."""


class HttpError(CredoError):
    """An HTTP error response: ``status``, an ``error`` code and a description."""

    def __init__(
        self,
        status: int,
        description: str,
        *,
        error: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(description)
        self.status = status
        self.error = error or ERROR_CODES.get(status, "invalid_request")
        self.description = description
        self.headers = dict(headers or {})

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}
