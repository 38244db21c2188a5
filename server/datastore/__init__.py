"""The signing server's datastore: entries, nodes, join tokens, bundles, CA journal, events.

Open one with ``SqlDataStore.open("sqlite:///credo.db")`` (or a ``postgresql://`` URL);
code that uses it should depend on the :class:`DataStore` Protocol.
"""

from __future__ import annotations

from server.datastore.errors import (
    AlreadyExists,
    DataStoreError,
    InvalidRequest,
    NotFound,
    SchemaTooNew,
    UnsupportedDatabase,
)
from server.datastore.models import (
    AttestedNode,
    Authority,
    AuthorityKind,
    AuthorityStatus,
    Budget,
    BudgetUse,
    BySelectors,
    Crl,
    DelegatedToken,
    DelegationPolicy,
    Event,
    EventKind,
    FederationRelationship,
    GrantOutcome,
    IssuedJwtSvid,
    IssuedX509Svid,
    JoinToken,
    ListAttestedNodesRequest,
    ListAttestedNodesResponse,
    ListAuditRecordsRequest,
    ListRegistrationEntriesRequest,
    ListRegistrationEntriesResponse,
    MatchBehavior,
    RegistrationEntry,
    Revocation,
    TokenGrant,
)
from server.datastore.protocol import DataStore
from server.datastore.schema import SCHEMA_VERSION
from server.datastore.sql import Listener, SqlDataStore

__all__ = [
    "SCHEMA_VERSION",
    "AlreadyExists",
    "AttestedNode",
    "Authority",
    "AuthorityKind",
    "AuthorityStatus",
    "Budget",
    "BudgetUse",
    "BySelectors",
    "Crl",
    "DataStore",
    "DataStoreError",
    "DelegatedToken",
    "DelegationPolicy",
    "Event",
    "EventKind",
    "FederationRelationship",
    "GrantOutcome",
    "InvalidRequest",
    "IssuedJwtSvid",
    "IssuedX509Svid",
    "JoinToken",
    "ListAttestedNodesRequest",
    "ListAttestedNodesResponse",
    "ListAuditRecordsRequest",
    "ListRegistrationEntriesRequest",
    "ListRegistrationEntriesResponse",
    "Listener",
    "MatchBehavior",
    "NotFound",
    "RegistrationEntry",
    "Revocation",
    "SchemaTooNew",
    "SqlDataStore",
    "TokenGrant",
    "UnsupportedDatabase",
]
