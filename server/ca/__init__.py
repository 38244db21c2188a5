"""The signing server's CA: key manager, credential templates, signer, and rotation manager.

* :mod:`server.ca.keymanager` — ``KeyManager`` protocol, ``DiskKeyManager``, ``MemoryKeyManager``
* :mod:`server.ca.templates` — what goes into every certificate
* :mod:`server.ca.ca` — ``CertificateAuthority``: signs with the active authorities
* :mod:`server.ca.manager` — ``AuthorityManager``: prepare / activate / taint / revoke / prune
* :mod:`server.ca.errors` — ``CaError`` and its subclasses
"""
