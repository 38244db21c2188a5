"""What a bundle publisher plugin is: something that keeps a copy of the trust bundle.

A plugin is handed the trust domain's current :class:`~credo.bundle.Bundle` each time it
changes (and once at start) by :class:`~server.bundle_publisher.runner.BundlePublishing`,
in a worker thread: ``publish`` may block, and raises
:class:`~server.bundle_publisher.errors.PublishFailed` when it cannot write. It should skip
the write when what it keeps would not change (a JWT key rotation leaves a PEM bundle as
it was).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from credo.bundle import Bundle

__all__ = ["BundlePublisherPlugin"]


class BundlePublisherPlugin(Protocol):
    """Keeps one copy of the bundle up to date."""

    @property
    def name(self) -> str:
        """The plugin's name, as in its table (``k8s_configmap``)."""
        ...

    @property
    def destination(self) -> str:
        """Where the copy is kept, for log lines (``configmap credo/credo-bundle``)."""
        ...

    def publish(self, bundle: Bundle) -> bool:
        """Write ``bundle``; True if written, False if the copy was current already.

        Raises :class:`~server.bundle_publisher.errors.PublishFailed`.
        """
        ...
