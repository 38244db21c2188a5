"""SPIFFE federation: the bundle endpoint this server serves and the federated bundles it
fetches (SPIFFE Federation standard).

* :mod:`server.federation.endpoint`: ``GET /`` and ``GET /bundle`` on the HTTP front end
  answer the trust domain's SPIFFE bundle;
* :mod:`server.federation.relationships`: what a federation relationship may hold;
* :mod:`server.federation.fetch`: one bundle fetch, ``https_spiffe`` or ``https_web``;
* :mod:`server.federation.refresher`: :class:`BundleRefresher`, the loop that refreshes
  each relationship's bundle at its ``spiffe_refresh_hint``.
"""
