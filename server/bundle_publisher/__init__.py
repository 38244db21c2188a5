"""Bundle publishers: copies of the trust bundle kept where workloads and agents find it.

* :mod:`server.bundle_publisher.protocol`: the :class:`BundlePublisherPlugin` protocol;
* :mod:`server.bundle_publisher.catalog`: the plugins by name, each with its config
  dataclass (``[server.bundle_publisher.<name>]``);
* :mod:`server.bundle_publisher.runner`: :class:`BundlePublishing`, which hands every
  configured plugin the bundle whenever it changes and retries a failed plugin with backoff;
* :mod:`server.bundle_publisher.errors`: :class:`PublishFailed`;
* one module per plugin (:mod:`server.bundle_publisher.k8s_configmap`).
"""

from __future__ import annotations

from server.bundle_publisher.errors import PublishFailed
from server.bundle_publisher.protocol import BundlePublisherPlugin

__all__ = ["BundlePublisherPlugin", "PublishFailed"]
