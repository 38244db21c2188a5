"""Errors raised by the signing server's datastore.

::

    CredoError
    └── DataStoreError
        ├── NotFound                 the named record does not exist
        ├── AlreadyExists            the record (or an equivalent one) already exists
        ├── InvalidRequest (also ValueError)
        │                            a malformed record, filter or page token
        ├── SchemaTooNew             the database was migrated by a newer Credo
        └── UnsupportedDatabase (also ValueError)
                                     the URL names a database Credo cannot use

Every error may carry ``index``: in a batch call (``create_registration_entries``,
``update_registration_entries``, ``delete_registration_entries``) it is the position
of the item that failed; ``None`` otherwise. The API layer maps these to gRPC status
codes; nothing here knows about gRPC.
"""

from __future__ import annotations

from credo.errors import CredoError

__all__ = [
    "AlreadyExists",
    "DataStoreError",
    "InvalidRequest",
    "NotFound",
    "SchemaTooNew",
    "UnsupportedDatabase",
]


class DataStoreError(CredoError):
    """Root of every error the datastore raises on purpose."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        self.index = index
        super().__init__(message if index is None else f"item {index}: {message}")


class NotFound(DataStoreError):
    """The named record does not exist (``registration entry 'abc' not found``)."""


class AlreadyExists(DataStoreError):
    """The record, or one that would duplicate it, already exists."""


class InvalidRequest(DataStoreError, ValueError):
    """A record, filter or page token the datastore cannot accept."""


class SchemaTooNew(DataStoreError):
    """The database schema is newer than this build of Credo knows how to use."""

    def __init__(self, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            f"database schema version {found} is newer than this credo supports "
            f"({supported}); upgrade credo or point it at another database"
        )


class UnsupportedDatabase(DataStoreError, ValueError):
    """The datastore URL names a database or driver Credo cannot use."""
