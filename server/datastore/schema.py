"""Tables (SQLAlchemy Core) and the versioned migrations that create them.

``schema_version`` holds one row: the number of migration steps applied. ``migrate``
runs the missing steps in order inside one transaction, so it is idempotent, safe to
run from two servers at once, and leaves nothing half-done. A database whose version
is above ``SCHEMA_VERSION`` is refused with :class:`SchemaTooNew`.

Step 1 creates the tables below as they stood at version 1. A later step that changes
a table must carry its own DDL (``ALTER TABLE ...``); before changing a table here,
freeze its version-1 shape inside step 1.

Versions:

1. every table (``authorities`` in its frozen version-1 shape, ``_authorities_v1``);
2. ``authorities.owner``: the server id of the server holding the private key (servers
   sharing one database each keep their own CA). Rows from version 1 get ``""``: the
   first server that finds their key file adopts them.
3. ``federation_relationships``: federated trust domains and their bundle endpoints.
4. ``registration_entries.owner`` and ``.purpose`` (``""`` for existing rows), indexed by
   owner.
5. ``delegation_policies`` and ``budget_usage`` (token exchange, :mod:`server.delegation`).
6. revocation: ``issued_x509_svids`` (every X.509-SVID the server signed: serial, issuing
   authority, entry, SPIFFE ID, agent, expiry, and when and why it was revoked),
   ``revoked_entries`` (the kill switch: entries that may not be issued for) and ``crls``
   (the current CRL of each X.509 authority), ``issued_jwt_svids`` (every JWT-SVID by
   ``jti``, with its revocation).
7. ``delegated_tokens``: every access token the token endpoint issued (jti, client, person,
   actor chain, expiry; never the token), revocable by jti, entry and chain.
8. ``audit_records``: the hash-chained audit trail (:mod:`server.audit`), one row per
   record, ``seq`` 1, 2, 3, ... assigned under a lock when the writing transaction
   commits.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    select,
    text,
)

from server.datastore.errors import SchemaTooNew

__all__ = ["SCHEMA_VERSION", "metadata", "migrate"]

metadata = MetaData()

# Entry and node tables are WITHOUT ROWID on SQLite: rows are stored in primary-key
# order, so listing everything (ordered by id) and its child rows is a sequential scan.

# SQLite only aliases the rowid (and so only autoincrements) for "INTEGER PRIMARY KEY".
_AutoId = BigInteger().with_variant(Integer(), "sqlite")
# Text compared byte-wise on PostgreSQL as on SQLite (BINARY): ORDER BY then matches
# Python's str ordering, and page tokens do not depend on the server's locale.
_Str = Text().with_variant(Text(collation="C"), "postgresql")
_Key = String(64).with_variant(String(64, collation="C"), "postgresql")

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

entries = Table(
    "registration_entries",
    metadata,
    Column("entry_id", _Key, primary_key=True),
    Column("spiffe_id", _Str, nullable=False),
    Column("parent_id", _Str, nullable=False),
    Column("x509_svid_ttl", Integer, nullable=False),
    Column("jwt_svid_ttl", Integer, nullable=False),
    Column("admin", Boolean, nullable=False),
    Column("downstream", Boolean, nullable=False),
    Column("node_alias", Boolean, nullable=False),
    Column("hint", _Str, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revision_number", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # sha256 over (spiffe_id, parent_id, sorted selectors): the UNIQUE index makes
    # duplicate detection race-free on every backend.
    Column("unique_key", String(64), nullable=False),
    # sha256 over the sorted selectors alone, and their number: EXACT and SUBSET filters.
    Column("selectors_key", String(64), nullable=False),
    Column("selector_count", Integer, nullable=False),
    # Version 3: the accountable person or team, and what the identity is for.
    Column("owner", _Str, nullable=False, server_default=""),
    Column("purpose", _Str, nullable=False, server_default=""),
    Index("ux_registration_entries_unique_key", "unique_key", unique=True),
    Index("ix_registration_entries_spiffe_id", "spiffe_id"),
    Index("ix_registration_entries_parent_id", "parent_id"),
    Index("ix_registration_entries_selectors_key", "selectors_key"),
    Index("ix_registration_entries_hint", "hint"),
    Index("ix_registration_entries_expires_at", "expires_at"),
    Index("ix_registration_entries_owner", "owner"),
    sqlite_with_rowid=False,
)

entry_selectors = Table(
    "entry_selectors",
    metadata,
    Column(
        "entry_id",
        _Key,
        ForeignKey("registration_entries.entry_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("type", _Str, nullable=False),
    Column("value", _Str, nullable=False),
    PrimaryKeyConstraint("entry_id", "type", "value"),
    Index("ix_entry_selectors_type_value", "type", "value"),
    sqlite_with_rowid=False,
)

entry_dns_names = Table(
    "entry_dns_names",
    metadata,
    Column(
        "entry_id",
        _Key,
        ForeignKey("registration_entries.entry_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("position", Integer, nullable=False),
    Column("dns_name", _Str, nullable=False),
    PrimaryKeyConstraint("entry_id", "position"),
    sqlite_with_rowid=False,
)

entry_federates_with = Table(
    "entry_federates_with",
    metadata,
    Column(
        "entry_id",
        _Key,
        ForeignKey("registration_entries.entry_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("trust_domain", _Str, nullable=False),
    PrimaryKeyConstraint("entry_id", "trust_domain"),
    sqlite_with_rowid=False,
)

nodes = Table(
    "attested_nodes",
    metadata,
    Column("spiffe_id", _Str, primary_key=True),
    Column("attestation_type", _Str, nullable=False),
    Column("cert_serial", _Str, nullable=False),
    Column("cert_not_after", BigInteger, nullable=False),
    Column("new_cert_serial", _Str, nullable=False),
    Column("new_cert_not_after", BigInteger, nullable=False),
    Column("banned", Boolean, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Index("ix_attested_nodes_attestation_type", "attestation_type"),
    Index("ix_attested_nodes_cert_not_after", "cert_not_after"),
    sqlite_with_rowid=False,
)

node_selectors = Table(
    "node_selectors",
    metadata,
    Column(
        "spiffe_id",
        _Str,
        ForeignKey("attested_nodes.spiffe_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("type", _Str, nullable=False),
    Column("value", _Str, nullable=False),
    PrimaryKeyConstraint("spiffe_id", "type", "value"),
    Index("ix_node_selectors_type_value", "type", "value"),
    sqlite_with_rowid=False,
)

join_tokens = Table(
    "join_tokens",
    metadata,
    Column("token", _Str, primary_key=True),
    Column("expires_at", BigInteger, nullable=False),
    Column("spiffe_id", _Str, nullable=False),
    Index("ix_join_tokens_expires_at", "expires_at"),
)

bundles = Table(
    "bundles",
    metadata,
    Column("trust_domain", _Str, primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

authorities = Table(
    "authorities",
    metadata,
    # Insertion order breaks ties between authorities created in the same second.
    Column("seq", _AutoId, Identity(), primary_key=True, autoincrement=True),
    Column("authority_id", _Str, nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("tainted", Boolean, nullable=False),
    Column("not_after", BigInteger, nullable=False),
    Column("public_data", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # Version 2: the server id of the server whose key manager holds the private key.
    Column("owner", _Str, nullable=False, server_default=""),
    Index("ix_authorities_kind_created_at", "kind", "created_at"),
)

# Version 4: revocation. ``agent_id`` is the agent that obtained the SVID (for an agent
# SVID, the agent itself; ``""`` for one minted by an admin); ``entry_id`` is ``""`` for
# SVIDs not issued for an entry (agent SVIDs, admin mints). ``revoked_at`` 0: not revoked.
issued_x509_svids = Table(
    "issued_x509_svids",
    metadata,
    Column("serial", _Key, primary_key=True),
    Column("authority_id", _Str, nullable=False),
    Column("entry_id", _Str, nullable=False),
    Column("spiffe_id", _Str, nullable=False),
    Column("agent_id", _Str, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("issued_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=False),
    Column("reason", _Str, nullable=False),
    Index("ix_issued_x509_svids_entry_id", "entry_id"),
    Index("ix_issued_x509_svids_agent_id", "agent_id"),
    Index("ix_issued_x509_svids_authority_revoked", "authority_id", "revoked_at"),
    Index("ix_issued_x509_svids_expires_at", "expires_at"),
)

revoked_entries = Table(
    "revoked_entries",
    metadata,
    Column(
        "entry_id",
        _Key,
        ForeignKey("registration_entries.entry_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("revoked_at", BigInteger, nullable=False),
    Column("reason", _Str, nullable=False),
)

crls = Table(
    "crls",
    metadata,
    Column("authority_id", _Str, primary_key=True),
    Column("number", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("next_update", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Every JWT-SVID the server signed, by ``jti``, until it expires (same columns' meaning).
issued_jwt_svids = Table(
    "issued_jwt_svids",
    metadata,
    Column("jti", _Key, primary_key=True),
    Column("entry_id", _Str, nullable=False),
    Column("spiffe_id", _Str, nullable=False),
    Column("agent_id", _Str, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("issued_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=False),
    Column("reason", _Str, nullable=False),
    Index("ix_issued_jwt_svids_entry_id", "entry_id"),
    Index("ix_issued_jwt_svids_agent_id", "agent_id"),
    Index("ix_issued_jwt_svids_revoked_expires", "revoked_at", "expires_at"),
)

_REVOCATION_TABLES = (issued_x509_svids, revoked_entries, crls, issued_jwt_svids)

# Every delegated access token the token endpoint issued, by ``jti``, until it expires:
# who it was issued to (``client_id``, the agent's SPIFFE ID), for whom (``subject``), the
# whole actor chain (``actors``: SPIFFE IDs newest first, each followed by one space, so
# "contains X" is ``LIKE '%X %'``). Never the token itself.
delegated_tokens = Table(
    "delegated_tokens",
    metadata,
    Column("jti", _Key, primary_key=True),
    Column("client_id", _Str, nullable=False),
    Column("subject", _Str, nullable=False),
    Column("actors", _Str, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("issued_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=False),
    Column("reason", _Str, nullable=False),
    Index("ix_delegated_tokens_client_id", "client_id"),
    Index("ix_delegated_tokens_revoked_expires", "revoked_at", "expires_at"),
)

# ``authorities`` as version 1 created it (step 1 must keep creating exactly this).
_v1_metadata = MetaData()
_authorities_v1 = Table(
    "authorities",
    _v1_metadata,
    Column("seq", _AutoId, Identity(), primary_key=True, autoincrement=True),
    Column("authority_id", _Str, nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("tainted", Boolean, nullable=False),
    Column("not_after", BigInteger, nullable=False),
    Column("public_data", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_authorities_kind_created_at", "kind", "created_at"),
)

federation_relationships = Table(
    "federation_relationships",
    metadata,
    Column("trust_domain", _Str, primary_key=True),
    Column("bundle_endpoint_url", _Str, nullable=False),
    Column("bundle_endpoint_profile", String(16), nullable=False),
    Column("endpoint_spiffe_id", _Str, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("last_refresh_at", BigInteger, nullable=False),
    Column("last_error", _Str, nullable=False),
)
"""Version 3 (created by step 3, not step 1)."""

events = Table(
    "events",
    metadata,
    Column("id", _AutoId, Identity(), primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("subject", _Str, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_events_created_at", "created_at"),
    # AUTOINCREMENT: SQLite never reuses an id, even after the newest row is deleted.
    sqlite_autoincrement=True,
)


audit_records = Table(
    "audit_records",
    metadata,
    # Assigned by the datastore (head + 1 under the audit lock), never by the database.
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time_ms", BigInteger, nullable=False),
    Column("actor_kind", String(16), nullable=False),
    Column("actor", _Str, nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", _Str, nullable=False),
    Column("target", _Str, nullable=False),
    Column("owner", _Str, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("reason", _Str, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("details", _Str, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_records_subject", "subject"),
    Index("ix_audit_records_actor", "actor"),
    Index("ix_audit_records_owner", "owner"),
    Index("ix_audit_records_action", "action"),
    Index("ix_audit_records_time_ms", "time_ms"),
)

_entries_v1 = Table(
    "registration_entries",
    _v1_metadata,
    Column("entry_id", _Key, primary_key=True),
    Column("spiffe_id", _Str, nullable=False),
    Column("parent_id", _Str, nullable=False),
    Column("x509_svid_ttl", Integer, nullable=False),
    Column("jwt_svid_ttl", Integer, nullable=False),
    Column("admin", Boolean, nullable=False),
    Column("downstream", Boolean, nullable=False),
    Column("node_alias", Boolean, nullable=False),
    Column("hint", _Str, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revision_number", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("unique_key", String(64), nullable=False),
    Column("selectors_key", String(64), nullable=False),
    Column("selector_count", Integer, nullable=False),
    Index("ux_registration_entries_unique_key", "unique_key", unique=True),
    Index("ix_registration_entries_spiffe_id", "spiffe_id"),
    Index("ix_registration_entries_parent_id", "parent_id"),
    Index("ix_registration_entries_selectors_key", "selectors_key"),
    Index("ix_registration_entries_hint", "hint"),
    Index("ix_registration_entries_expires_at", "expires_at"),
    sqlite_with_rowid=False,
)

_V1_TABLES = (
    "registration_entries",
    "entry_selectors",
    "entry_dns_names",
    "entry_federates_with",
    "attested_nodes",
    "node_selectors",
    "join_tokens",
    "bundles",
    "events",
)


delegation_policies = Table(
    "delegation_policies",
    metadata,
    Column("policy_id", _Key, primary_key=True),
    # A SPIFFE ID, or a prefix ending in "/*".
    Column("agent_id", _Str, nullable=False),
    Column("subject_issuer", _Str, nullable=False),
    # JSON: {"scopes": [...], "audiences": [...], "subject_claims": [[k, v]...],
    #        "budgets": [{"scope", "limit", "period"}]}
    Column("body", Text, nullable=False),
    Column("max_ttl", Integer, nullable=False),
    Column("max_depth", Integer, nullable=False),
    Column("revision_number", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_delegation_policies_agent_id", "agent_id"),
)

budget_usage = Table(
    "budget_usage",
    metadata,
    Column(
        "policy_id",
        _Key,
        ForeignKey("delegation_policies.policy_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("agent_id", _Str, nullable=False),
    Column("scope", _Str, nullable=False),
    Column("window_start", BigInteger, nullable=False),
    Column("used", Integer, nullable=False),
    Column("refused", Integer, nullable=False),
    PrimaryKeyConstraint("policy_id", "agent_id", "scope", "window_start"),
    Index("ix_budget_usage_window_start", "window_start"),
)


def _step_1_initial(conn: Connection) -> None:
    """Create every table of version 1, each in its version-1 shape."""
    _entries_v1.create(conn)
    _authorities_v1.create(conn)
    later = {"registration_entries", "authorities", "schema_version"}
    metadata.create_all(
        conn,
        tables=[t for t in metadata.sorted_tables if t.name in _V1_TABLES and t.name not in later],
    )


def _step_2_authority_owner(conn: Connection) -> None:
    """Add ``authorities.owner`` (``""`` for existing rows: adopted by their key's holder)."""
    collate = ' COLLATE "C"' if conn.dialect.name == "postgresql" else ""
    conn.execute(
        text(f"ALTER TABLE authorities ADD COLUMN owner TEXT{collate} NOT NULL DEFAULT ''")
    )


def _step_3_federation_relationships(conn: Connection) -> None:
    """Create ``federation_relationships``."""
    federation_relationships.create(conn)


def _step_4_entry_owner(conn: Connection) -> None:
    """Add ``registration_entries.owner`` and ``.purpose`` (``""`` for existing rows)."""
    collate = ' COLLATE "C"' if conn.dialect.name == "postgresql" else ""
    for column in ("owner", "purpose"):
        conn.execute(
            text(
                f"ALTER TABLE registration_entries ADD COLUMN {column} TEXT{collate} "
                "NOT NULL DEFAULT ''"
            )
        )
    conn.execute(text("CREATE INDEX ix_registration_entries_owner ON registration_entries (owner)"))


def _step_5_delegation(conn: Connection) -> None:
    """Create ``delegation_policies`` and ``budget_usage``."""
    delegation_policies.create(conn)
    budget_usage.create(conn)


def _step_6_revocation(conn: Connection) -> None:
    """Add the revocation tables: issued X.509-SVIDs, revoked entries, CRLs."""
    metadata.create_all(conn, tables=list(_REVOCATION_TABLES))


def _step_7_delegated_tokens(conn: Connection) -> None:
    """Add ``delegated_tokens``: issued access tokens, revocable by jti, entry and chain."""
    delegated_tokens.create(conn)


def _step_8_audit_records(conn: Connection) -> None:
    """Create ``audit_records`` (the hash-chained audit trail) and its indexes."""
    audit_records.create(conn)


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (
    _step_1_initial,
    _step_2_authority_owner,
    _step_3_federation_relationships,
    _step_4_entry_owner,
    _step_5_delegation,
    _step_6_revocation,
    _step_7_delegated_tokens,
    _step_8_audit_records,
)
"""Ordered steps; step ``n`` (1-based) takes the schema from version ``n - 1`` to ``n``."""

SCHEMA_VERSION = len(MIGRATIONS)

# Arbitrary constant for pg_advisory_xact_lock: serialises concurrent migrations.
_PG_MIGRATION_LOCK = 0x637265646F01


def current_version(conn: Connection) -> int:
    """Return the schema version recorded in the database (0 for an empty database)."""
    if not conn.dialect.has_table(conn, schema_version.name):
        return 0
    version = conn.execute(select(schema_version.c.version)).scalar()
    return int(version) if version is not None else 0


def migrate(conn: Connection) -> int:
    """Bring the schema up to ``SCHEMA_VERSION`` inside the caller's write transaction.

    Returns the version found before migrating. Raises :class:`SchemaTooNew` when the
    database is newer than this code.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    schema_version.create(conn, checkfirst=True)
    found = current_version(conn)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(found, SCHEMA_VERSION)
    for step in MIGRATIONS[found:]:
        step(conn)
    if found < SCHEMA_VERSION:
        conn.execute(schema_version.delete())
        conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
    return found
