"""Errors of calls to the Kubernetes API.

::

    CredoError
    └── KubeApiError                 a call to the Kubernetes API failed
        ├── KubeApiUnreachable       no answer: connection refused, TLS failure, timeout, or
        │                            the API answered that it cannot serve now (5xx, 429)
        └── KubeApiRefused           the API answered no: ``status`` (401, 403, 404, 409,
                                     422, ...) and the API's own message

Messages are lower case and name what was asked (``create tokenreviews``) so that an
operator can fix RBAC or the kubeconfig from the one line.
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = ["KubeApiError", "KubeApiRefused", "KubeApiUnreachable"]


class KubeApiError(CredoError):
    """A call to the Kubernetes API failed; ``action`` says which (``get pods credo/x``)."""

    def __init__(self, action: str, message: str) -> None:
        self.action = action
        super().__init__(message)


class KubeApiUnreachable(KubeApiError):
    """The API did not answer, or answered that it cannot serve now; retrying may work."""

    def __init__(self, action: str, reason: str) -> None:
        self.reason = reason
        super().__init__(action, f"kubernetes API unreachable ({action}): {reason}")


class KubeApiRefused(KubeApiError):
    """The API answered with an error ``status``; ``detail`` is its message."""

    def __init__(self, action: str, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(action, f"kubernetes API refused {action} ({status}): {detail}")

    @property
    def not_found(self) -> bool:
        """True when the object does not exist (404)."""
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """True when the object exists already (409), e.g. a create that lost a race."""
        return self.status == 409
