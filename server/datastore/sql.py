"""``SqlDataStore``: the datastore on SQLite or PostgreSQL, through SQLAlchemy Core.

Concurrency model
-----------------
Every public call is one transaction on a connection from the engine's pool, so the
store is safe to share between threads (and, on SQLite, between processes on the same
file). On SQLite, write transactions start with ``BEGIN IMMEDIATE`` (writers queue on
the busy timeout instead of failing on a lock upgrade) and the file runs in WAL mode
with ``synchronous=NORMAL`` and foreign keys on. On PostgreSQL, reads run at
REPEATABLE READ so a list sees one snapshot across its per-table queries, and writes
run at READ COMMITTED with UNIQUE indexes doing the duplicate detection.

Events
------
Each mutation of an entry, node or bundle writes its ``events`` row in the same
transaction. Event ids must become visible in id order (a poller resumes "after id N"),
so on PostgreSQL the event insert takes a transaction-scoped advisory lock first: event
writers commit one at a time, in the order they took their ids. SQLite already runs one
writer at a time.

Audit records
-------------
Every mutation also adds its audit record (:mod:`server.audit`) to the transaction, by
the actor of the current call; other code adds its own with ``audit.record(tx, ...)``
inside a transaction, or :meth:`SqlDataStore.append_audit_records`. Just before commit
the transaction takes the audit lock (a transaction-scoped advisory lock on PostgreSQL;
SQLite's one writer), reads the chain head and appends its records after it, so any
number of servers on one database write one chain with no fork (``seq`` is also the
primary key). Lock order is always bundle, then events, then audit.
"""

from __future__ import annotations

import base64
import binascii
import gc
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    Engine,
    Select,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    make_url,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import ArgumentError, IntegrityError
from sqlalchemy.pool import StaticPool

from credo.selector import Selector
from server import audit
from server.audit import AuditRecord, PendingRecord
from server.datastore import schema
from server.datastore.errors import (
    AlreadyExists,
    DataStoreError,
    InvalidRequest,
    NotFound,
    UnsupportedDatabase,
)
from server.datastore.issued import DELEGATED_TOKENS, JWT_SVIDS, X509_SVIDS, IssuedKind
from server.datastore.models import (
    AttestedNode,
    Authority,
    Budget,
    BudgetUse,
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
from server.datastore.protocol import BundleBuilder, DataStore
from server.datastore.schema import (
    audit_records,
    authorities,
    budget_usage,
    bundles,
    crls,
    delegated_tokens,
    delegation_policies,
    entries,
    entry_dns_names,
    entry_federates_with,
    entry_selectors,
    events,
    federation_relationships,
    issued_jwt_svids,
    issued_x509_svids,
    join_tokens,
    node_selectors,
    nodes,
    revoked_entries,
)

__all__ = ["Listener", "SqlDataStore"]

_R = TypeVar("_R", IssuedX509Svid, IssuedJwtSvid, DelegatedToken)

log = logging.getLogger(__name__)

Listener = Callable[[list[Event]], None]
"""Called after a commit with the events that transaction wrote, in id order."""

_CHUNK = 1000  # ids per IN (...) list; well under SQLite's and PostgreSQL's parameter limits
_PG_EVENT_LOCK = 0x637265646F02  # pg_advisory_xact_lock key serialising event writers
_PG_BUNDLE_LOCK = 0x637265646F03  # pg_advisory_xact_lock key serialising update_bundle
_PG_AUDIT_LOCK = 0x637265646F04  # pg_advisory_xact_lock key serialising audit appends
_AUTHORITY_KINDS = frozenset({"x509", "jwt", "wit"})
_AUTHORITY_STATUSES = frozenset({"prepared", "active", "old"})


def _revoked_statement(table: Any, key: str) -> Select[Any]:
    """``revoked_at`` of the credential whose ``key`` is ``:ident``, and whether the entry
    it was issued for is revoked."""
    entry_revoked = exists().where(revoked_entries.c.entry_id == table.c.entry_id)
    return select(table.c.revoked_at, entry_revoked).where(table.c[key] == bindparam("ident"))


# Built once: the token endpoint runs these on every exchange (the audit ones every audited
# write), and building a statement and its cache key costs more than running it on SQLite.
_X509_REVOKED = _revoked_statement(issued_x509_svids, "serial")
_JWT_REVOKED = _revoked_statement(issued_jwt_svids, "jti")
_TOKEN_REVOKED = select(delegated_tokens.c.revoked_at).where(
    delegated_tokens.c.jti == bindparam("ident")
)
_LIVE_ENTRY = select(entries.c.entry_id).where(
    entries.c.spiffe_id == bindparam("spiffe_id"),
    ~exists().where(revoked_entries.c.entry_id == entries.c.entry_id),
)
_LIVE_ENTRY_PG = (
    select(entries.c.entry_id)
    .where(entries.c.spiffe_id == bindparam("spiffe_id"))
    .with_for_update(read=True)
)
_AUDIT_HEAD = (
    select(audit_records.c.seq, audit_records.c.hash).order_by(audit_records.c.seq.desc()).limit(1)
)
_INSERT_AUDIT = insert(audit_records)
_INSERT_TOKENS = insert(delegated_tokens)
_REVOKED_AMONG = select(revoked_entries.c.entry_id).where(
    revoked_entries.c.entry_id.in_(bindparam("ids", expanding=True))
)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _selector_json(selectors: Iterable[Selector]) -> str:
    return json.dumps([[s.type, s.value] for s in selectors], separators=(",", ":"))


def _selectors_key(selectors: Iterable[Selector]) -> str:
    return hashlib.sha256(_selector_json(selectors).encode()).hexdigest()


def _unique_key(entry: RegistrationEntry) -> str:
    """Hash of what makes two entries duplicates: SPIFFE ID, parent ID, selector set."""
    blob = json.dumps(
        [entry.spiffe_id, entry.parent_id, [[s.type, s.value] for s in entry.selectors]],
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _encode_token(kind: str, key: str) -> str:
    """Make an opaque page token: the listing's kind and the last key it returned."""
    return base64.urlsafe_b64encode(f"{kind}:{key}".encode()).decode().rstrip("=")


def _decode_token(kind: str, token: str) -> str:
    """Return the key inside a token made by ``_encode_token(kind, ...)``."""
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        found_kind, sep, key = raw.decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"invalid page token {token[:40]!r}") from exc
    if not sep or found_kind != kind or not key:
        raise InvalidRequest(f"invalid page token {token[:40]!r}")
    return key


def _check_page_size(page_size: int) -> None:
    if page_size < 0:
        raise InvalidRequest(f"page size must be 0 (everything) or positive, not {page_size}")


def _violates(exc: IntegrityError, name: str) -> bool:
    """True when the integrity error names the constraint or column ``name``."""
    return name in str(exc.orig)


def _normalize_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise UnsupportedDatabase(f"invalid datastore url {url!r}: {exc}") from exc
    driver = parsed.drivername
    if driver in ("sqlite", "sqlite+pysqlite"):
        return parsed
    if driver in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    raise UnsupportedDatabase(
        f"unsupported datastore url scheme {driver!r}: expected 'sqlite:///path/file.db' "
        "or 'postgresql://user@host:port/db'"
    )


class _Tx:
    """One open transaction: its connection, clock reading, events and audit records."""

    __slots__ = ("audit", "audited", "conn", "events", "now")

    def __init__(self, conn: Connection, now: int) -> None:
        self.conn = conn
        self.now = now
        self.events: list[Event] = []
        self.audit: list[PendingRecord] = []  # chained and written just before commit
        self.audited: list[AuditRecord] = []


def _entry_owner(entry: RegistrationEntry) -> str:
    """The entry's accountable person, once entries carry one (empty until then)."""
    return str(getattr(entry, "owner", "") or "")


def _entry_details(entry: RegistrationEntry) -> dict[str, Any]:
    details: dict[str, Any] = {
        "parent_id": entry.parent_id,
        "selectors": [str(s) for s in entry.selectors],
        "revision": entry.revision_number,
    }
    if entry.dns_names:
        details["dns_names"] = list(entry.dns_names)
    if entry.x509_svid_ttl:
        details["x509_svid_ttl"] = entry.x509_svid_ttl
    if entry.jwt_svid_ttl:
        details["jwt_svid_ttl"] = entry.jwt_svid_ttl
    if entry.expires_at:
        details["expires_at"] = entry.expires_at
    for flag in ("admin", "downstream", "node_alias"):
        if getattr(entry, flag):
            details[flag] = True
    if entry.federates_with:
        details["federates_with"] = list(entry.federates_with)
    if entry.hint:
        details["hint"] = entry.hint
    return details


def _audit_entries(tx: _Tx, action: str, stored: Iterable[RegistrationEntry]) -> None:
    for entry in stored:
        audit.record(
            tx,
            action,
            subject=entry.spiffe_id,
            target=entry.id,
            owner=_entry_owner(entry),
            details=_entry_details(entry),
        )


def token_fingerprint(token: str) -> str:
    """A short, non-reversible label for a join token (what records and logs show)."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


class SqlDataStore:
    """The :class:`~server.datastore.protocol.DataStore` on SQLite or PostgreSQL.

    Build it with :meth:`open`, which also runs migrations. All methods are
    synchronous, thread-safe, and each runs in exactly one transaction: a call that
    raises has changed nothing.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        """Wrap an engine configured by :meth:`open`; prefer :meth:`open`."""
        self._engine = engine
        self._clock = clock
        self._is_pg = engine.dialect.name == "postgresql"
        # A :memory: SQLite database lives on one shared connection: serialise its use.
        self._serial: threading.Lock | None = (
            threading.Lock() if isinstance(engine.pool, StaticPool) else None
        )
        self._listeners: list[Listener] = []
        self._guard = threading.Lock()  # protects _listeners, _next_error, _closed
        self._next_error: BaseException | None = None
        self._closed = False
        # Every SQL statement sent to the database, counted where it is sent (the fleet
        # benchmark's db_statements_per_s_idle; the server's credo_datastore_statements_total):
        # the statements executed (SQLite's BEGIN among them), and what the driver sends on
        # its own: COMMIT and ROLLBACK, and on PostgreSQL the BEGIN psycopg sends before a
        # transaction's first statement and the pool's pre-ping (a ``SELECT 1``).
        self._statements = 0
        self._writes = 0
        self._statements_lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._count_statement)
        event.listen(engine, "commit", self._count_transaction_control)
        event.listen(engine, "rollback", self._count_transaction_control)
        # One held connection, outside any transaction, for the one-statement reads made
        # every second (the change feed's poll): on PostgreSQL a pooled connection would
        # cost a pre-ping and a BEGIN and COMMIT around each.
        self._single: Connection | None = None
        self._single_lock = threading.Lock()
        if self._is_pg:
            event.listen(engine, "begin", self._count_transaction_control)
            ping = engine.dialect.do_ping

            def counted_ping(dbapi_conn: Any) -> bool:
                self._count_statement()
                return ping(dbapi_conn)

            engine.dialect.do_ping = counted_ping  # type: ignore[method-assign,assignment]

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_ms: int = 5000,
        pool_size: int = 10,
    ) -> SqlDataStore:
        """Connect to ``url``, migrate the schema, and return the store.

        ``url`` is ``sqlite:///relative/file.db``, ``sqlite:////absolute/file.db``,
        ``sqlite:///:memory:`` or ``postgresql://user@host:port/db`` (psycopg 3 is used).
        ``clock`` returns unix seconds (tests pass a fake one). Raises
        :class:`UnsupportedDatabase` for other URLs and :class:`SchemaTooNew` when the
        database was migrated by a newer Credo.
        """
        parsed = _normalize_url(url)
        engine: Engine
        if parsed.get_backend_name() == "sqlite":
            memory = parsed.database in (None, "", ":memory:")
            engine = create_engine(
                parsed,
                hide_parameters=True,  # parameters (join tokens) never reach logs or errors
                connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
                **({"poolclass": StaticPool} if memory else {"pool_size": pool_size}),
            )
            _configure_sqlite(engine, busy_timeout_ms)
        else:
            engine = create_engine(
                parsed,
                pool_size=pool_size,
                max_overflow=2 * pool_size,
                pool_pre_ping=True,
                hide_parameters=True,  # parameters (join tokens) never reach logs or errors
            )
        store = cls(engine, clock=clock)
        try:
            with store._transaction(write=True, inject=False) as tx:
                schema.migrate(tx.conn)
        except BaseException:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        """Close every pooled connection; later calls raise :class:`DataStoreError`."""
        with self._guard:
            self._closed = True
        with self._single_lock:
            if self._single is not None:
                self._single.close()
                self._single = None
        self._engine.dispose()

    def __enter__(self) -> SqlDataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count_statement(self, *_: Any) -> None:
        with self._statements_lock:
            self._statements += 1

    def _count_transaction_control(self, conn: Connection) -> None:
        # Outside a transaction (see _single_statement) no BEGIN, COMMIT or ROLLBACK is sent.
        if not conn.get_execution_options().get("credo_autocommit", False):
            self._count_statement()

    @property
    def statements_executed(self) -> int:
        """SQL statements sent to the database since the store was opened (migrations too)."""
        return self._statements

    @property
    def writes_committed(self) -> int:
        """Write transactions committed through this store (what a reader that caches a
        table compares, with the change feed for other servers' writes)."""
        return self._writes

    # ------------------------------------------------------------------ test and feed hooks

    def set_next_error(self, exc: BaseException | None) -> None:
        """Make the next datastore call raise ``exc`` before touching the database."""
        with self._guard:
            self._next_error = exc

    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(events)`` after each commit that wrote events; return a remover.

        The callback runs on the committing thread, outside the transaction; batches
        from different threads may arrive out of order, so order by ``Event.id``. An
        exception from a callback is logged and does not undo or fail the write.
        """
        with self._guard:
            self._listeners.append(callback)

        def remove() -> None:
            with self._guard:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    # ------------------------------------------------------------------ registration entries

    def create_registration_entry(self, entry: RegistrationEntry) -> RegistrationEntry:
        """Store a new entry (assigning an id when empty) and return it as stored.

        Raises :class:`AlreadyExists` when the id is taken or an entry with the same
        SPIFFE ID, parent ID and selector set exists.
        """
        return self._create_entries([entry], batch=False)[0]

    def create_registration_entries(
        self, entries_: Sequence[RegistrationEntry]
    ) -> list[RegistrationEntry]:
        """Store many entries in one transaction: all of them, or none.

        The raised error's ``index`` is the position of the first item that failed.
        """
        return self._create_entries(entries_, batch=True)

    def _create_entries(
        self, entries_: Sequence[RegistrationEntry], *, batch: bool
    ) -> list[RegistrationEntry]:
        now = int(self._clock())
        prepared = [
            self._prepare_new_entry(e, i if batch else None, now) for i, e in enumerate(entries_)
        ]
        if not prepared:
            return []
        seen_ids: dict[str, int] = {}
        seen_keys: dict[str, int] = {}
        for i, (entry, key) in enumerate(prepared):
            if entry.id in seen_ids:
                raise AlreadyExists(f"registration entry {entry.id!r} appears twice", index=i)
            if key in seen_keys:
                raise AlreadyExists(
                    f"registration entry for {entry.spiffe_id!r} duplicates item {seen_keys[key]}",
                    index=i,
                )
            seen_ids[entry.id] = i
            seen_keys[key] = i
        try:
            with self._transaction(write=True) as tx:
                self._raise_entry_conflict(tx.conn, prepared, batch=batch)
                self._insert_entries(tx.conn, prepared)
                self._emit(tx, [(EventKind.ENTRY_CREATED, e.id) for e, _ in prepared])
                _audit_entries(tx, "entry.create", (e for e, _ in prepared))
        except IntegrityError as exc:
            # A concurrent writer won a race the pre-check could not see.
            with self._transaction(write=False, inject=False) as tx:
                self._raise_entry_conflict(tx.conn, prepared, batch=batch)
            raise AlreadyExists(f"registration entry already exists: {exc.orig}") from exc
        return [e for e, _ in prepared]

    def fetch_registration_entry(self, entry_id: str) -> RegistrationEntry | None:
        """Return the entry with ``entry_id``, or ``None``."""
        return self.fetch_registration_entries([entry_id]).get(entry_id)

    def fetch_registration_entries(self, ids: Iterable[str]) -> dict[str, RegistrationEntry]:
        """Return the entries among ``ids`` that exist, keyed by id."""
        wanted = list(dict.fromkeys(ids))
        found: dict[str, RegistrationEntry] = {}
        with self._transaction(write=False) as tx:
            for chunk in _chunks(wanted):
                for entry in self._load_entries(tx.conn, [entries.c.entry_id.in_(chunk)]):
                    found[entry.id] = entry
        return found

    def list_registration_entries(
        self, request: ListRegistrationEntriesRequest | None = None
    ) -> ListRegistrationEntriesResponse:
        """Return entries matching every given filter, ordered by id, one page at a time."""
        request = request or ListRegistrationEntriesRequest()
        _check_page_size(request.page_size)
        conds = self._entry_filters(request)
        if request.page_token:
            conds.append(entries.c.entry_id > _decode_token("entries", request.page_token))
        limit = request.page_size or None
        with self._transaction(write=False) as tx:
            page = self._load_entries(tx.conn, conds, limit=limit + 1 if limit else None)
        if limit and len(page) > limit:
            page = page[:limit]
            return ListRegistrationEntriesResponse(page, _encode_token("entries", page[-1].id))
        return ListRegistrationEntriesResponse(page, "")

    def update_registration_entry(self, entry: RegistrationEntry) -> RegistrationEntry:
        """Replace every field of the entry with ``entry.id``; bump its revision number.

        Raises :class:`NotFound` if there is no such entry and :class:`AlreadyExists`
        if the change would duplicate another entry.
        """
        return self._update_entries([entry], batch=False)[0]

    def update_registration_entries(
        self, entries_: Sequence[RegistrationEntry]
    ) -> list[RegistrationEntry]:
        """Update many entries in one transaction: all of them, or none.

        Each entry's revision number goes up by one and one ``ENTRY_UPDATED`` event is
        written per entry; listeners hear of them only after the commit. The raised
        error's ``index`` is the position of the first item that failed: an id given
        twice is :class:`InvalidRequest`, an unknown id :class:`NotFound`, an update that
        would duplicate another entry (or another item) :class:`AlreadyExists`.
        Items are applied in order, so an item may not take the SPIFFE ID, parent ID
        and selector set that a later item moves away from.
        """
        return self._update_entries(entries_, batch=True)

    def _update_entries(
        self, entries_: Sequence[RegistrationEntry], *, batch: bool
    ) -> list[RegistrationEntry]:
        def index(i: int) -> int | None:
            return i if batch else None

        keys: list[str] = []
        for i, entry in enumerate(entries_):
            try:
                _validate_entry(entry)
            except InvalidRequest as exc:
                raise InvalidRequest(str(exc), index=index(i)) from exc
            keys.append(_unique_key(entry))
        if not keys:
            return []
        seen_ids: dict[str, int] = {}
        seen_keys: dict[str, int] = {}
        for i, (entry, key) in enumerate(zip(entries_, keys, strict=True)):
            if entry.id in seen_ids:
                raise InvalidRequest(f"registration entry {entry.id!r} appears twice", index=i)
            if key in seen_keys:
                raise AlreadyExists(
                    f"registration entry for {entry.spiffe_id!r} duplicates item {seen_keys[key]}",
                    index=i,
                )
            seen_ids[entry.id] = i
            seen_keys[key] = i
        stored: list[RegistrationEntry] = []
        with self._transaction(write=True) as tx:
            if self._is_pg and len(entries_) > 1:
                # Lock the rows in id order so overlapping batches cannot deadlock.
                for chunk in _chunks(sorted(seen_ids)):
                    tx.conn.execute(
                        select(entries.c.entry_id)
                        .where(entries.c.entry_id.in_(chunk))
                        .order_by(entries.c.entry_id)
                        .with_for_update()
                    )
            for i, (entry, key) in enumerate(zip(entries_, keys, strict=True)):
                try:
                    row = tx.conn.execute(
                        update(entries)
                        .where(entries.c.entry_id == entry.id)
                        .values(
                            revision_number=entries.c.revision_number + 1,
                            **_entry_values(entry, key, include_id=False),
                        )
                        .returning(entries.c.revision_number, entries.c.created_at)
                    ).first()
                except IntegrityError as exc:
                    # Raised inside the transaction: it rolls back every earlier item.
                    if _violates(exc, "unique_key"):
                        raise AlreadyExists(
                            f"registration entry for {entry.spiffe_id!r} under "
                            f"{entry.parent_id!r} with the same selectors already exists",
                            index=index(i),
                        ) from exc
                    raise
                if row is None:
                    raise NotFound(f"registration entry {entry.id!r} not found", index=index(i))
                stored.append(replace(entry, revision_number=row[0], created_at=row[1]))
            for chunk in _chunks([e.id for e in stored]):
                for table in (entry_selectors, entry_dns_names, entry_federates_with):
                    tx.conn.execute(delete(table).where(table.c.entry_id.in_(chunk)))
            self._insert_entry_children(tx.conn, stored)
            self._emit(tx, [(EventKind.ENTRY_UPDATED, e.id) for e in stored])
            _audit_entries(tx, "entry.update", stored)
        return stored

    def delete_registration_entry(self, entry_id: str) -> RegistrationEntry:
        """Delete the entry and return it as it was; :class:`NotFound` if absent."""
        return self._delete_entries([entry_id], batch=False)[0]

    def delete_registration_entries(self, ids: Sequence[str]) -> list[RegistrationEntry]:
        """Delete every entry in ``ids`` in one transaction: all of them, or none.

        Raises :class:`NotFound` (with ``index``) if any id is absent.
        """
        return self._delete_entries(ids, batch=True)

    def _delete_entries(self, ids: Sequence[str], *, batch: bool) -> list[RegistrationEntry]:
        seen: dict[str, int] = {}
        for i, entry_id in enumerate(ids):
            if entry_id in seen:
                raise InvalidRequest(f"registration entry {entry_id!r} appears twice", index=i)
            seen[entry_id] = i
        with self._transaction(write=True) as tx:
            found: dict[str, RegistrationEntry] = {}
            for chunk in _chunks(list(ids)):
                for entry in self._load_entries(tx.conn, [entries.c.entry_id.in_(chunk)]):
                    found[entry.id] = entry
            for i, entry_id in enumerate(ids):
                if entry_id not in found:
                    raise NotFound(
                        f"registration entry {entry_id!r} not found", index=i if batch else None
                    )
            deleted = 0
            for chunk in _chunks(list(ids)):
                deleted += tx.conn.execute(
                    delete(entries).where(entries.c.entry_id.in_(chunk))
                ).rowcount
            if deleted != len(ids):  # a concurrent delete got there first
                raise NotFound("registration entry was deleted concurrently; nothing deleted")
            self._emit(tx, [(EventKind.ENTRY_DELETED, entry_id) for entry_id in ids])
            _audit_entries(tx, "entry.delete", (found[entry_id] for entry_id in ids))
        return [found[entry_id] for entry_id in ids]

    def count_registration_entries(self) -> int:
        """Return how many registration entries exist."""
        with self._transaction(write=False) as tx:
            return int(tx.conn.execute(select(func.count()).select_from(entries)).scalar_one())

    def prune_registration_entries(self, expires_before: int) -> int:
        """Delete entries whose ``expires_at`` is set and earlier than ``expires_before``."""
        with self._transaction(write=True) as tx:
            expired = self._load_entries(
                tx.conn, [entries.c.expires_at != 0, entries.c.expires_at < expires_before]
            )
            gone = (
                tx.conn.execute(
                    delete(entries)
                    .where(entries.c.expires_at != 0, entries.c.expires_at < expires_before)
                    .returning(entries.c.entry_id)
                )
                .scalars()
                .all()
            )
            self._emit(tx, [(EventKind.ENTRY_DELETED, entry_id) for entry_id in sorted(gone)])
            removed = set(gone)
            _audit_entries(tx, "entry.prune", (e for e in expired if e.id in removed))
        return len(gone)

    # ------------------------------------------------------------------ attested nodes

    def create_attested_node(self, node: AttestedNode) -> AttestedNode:
        """Record a newly attested node; :class:`AlreadyExists` if its ID is recorded."""
        _require(node.spiffe_id, "attested node SPIFFE ID")
        try:
            with self._transaction(write=True) as tx:
                stored = replace(node, created_at=tx.now, updated_at=tx.now)
                tx.conn.execute(insert(nodes).values(**_node_values(stored)))
                self._insert_node_selectors(tx.conn, stored.spiffe_id, stored.selectors)
                self._emit(tx, [(EventKind.NODE_CREATED, stored.spiffe_id)])
                audit.record(
                    tx,
                    "agent.attest",
                    subject=stored.spiffe_id,
                    target=stored.cert_serial,
                    details=_node_details(stored),
                )
        except IntegrityError as exc:
            raise AlreadyExists(f"attested node {node.spiffe_id!r} already exists") from exc
        return stored

    def fetch_attested_node(self, spiffe_id: str) -> AttestedNode | None:
        """Return the node with ``spiffe_id``, or ``None``."""
        with self._transaction(write=False) as tx:
            found = self._load_nodes(tx.conn, [nodes.c.spiffe_id == spiffe_id])
        return found[0] if found else None

    def list_attested_nodes(
        self, request: ListAttestedNodesRequest | None = None
    ) -> ListAttestedNodesResponse:
        """Return nodes matching every given filter, ordered by SPIFFE ID, page by page."""
        request = request or ListAttestedNodesRequest()
        _check_page_size(request.page_size)
        conds: list[ColumnElement[bool]] = []
        if request.by_attestation_type is not None:
            conds.append(nodes.c.attestation_type == request.by_attestation_type)
        if request.by_banned is not None:
            conds.append(nodes.c.banned == request.by_banned)
        if request.by_expires_before is not None:
            conds.append(nodes.c.cert_not_after < request.by_expires_before)
        if request.page_token:
            conds.append(nodes.c.spiffe_id > _decode_token("nodes", request.page_token))
        limit = request.page_size or None
        with self._transaction(write=False) as tx:
            page = self._load_nodes(tx.conn, conds, limit=limit + 1 if limit else None)
        if limit and len(page) > limit:
            page = page[:limit]
            return ListAttestedNodesResponse(page, _encode_token("nodes", page[-1].spiffe_id))
        return ListAttestedNodesResponse(page, "")

    def update_attested_node(self, node: AttestedNode) -> AttestedNode:
        """Replace every field of the node (``created_at`` kept); :class:`NotFound` if absent.

        A ban is sticky: writing back a copy read before a concurrent ban (a renewal)
        does not lift it; only deleting the node (eviction) does.
        """
        with self._transaction(write=True) as tx:
            was_banned = tx.conn.execute(
                select(nodes.c.banned).where(nodes.c.spiffe_id == node.spiffe_id)
            ).scalar()
            values = _node_values(replace(node, updated_at=tx.now))
            del values["created_at"]
            if not node.banned:
                del values["banned"]
            row = tx.conn.execute(
                update(nodes)
                .where(nodes.c.spiffe_id == node.spiffe_id)
                .values(**values)
                .returning(nodes.c.created_at, nodes.c.banned)
            ).first()
            if row is None:
                raise NotFound(f"attested node {node.spiffe_id!r} not found")
            created, banned = row[0], bool(row[1])
            tx.conn.execute(
                delete(node_selectors).where(node_selectors.c.spiffe_id == node.spiffe_id)
            )
            self._insert_node_selectors(tx.conn, node.spiffe_id, node.selectors)
            self._emit(tx, [(EventKind.NODE_UPDATED, node.spiffe_id)])
            action = "agent.ban" if banned and not was_banned else "agent.update"
            audit.record(
                tx,
                action,
                subject=node.spiffe_id,
                target=node.new_cert_serial or node.cert_serial,
                details=_node_details(replace(node, banned=banned)),
            )
        return replace(node, created_at=created, updated_at=tx.now, banned=banned)

    def set_node_selectors(self, spiffe_id: str, selectors: Iterable[Selector]) -> AttestedNode:
        """Replace the node's selectors and return the node; :class:`NotFound` if absent."""
        with self._transaction(write=True) as tx:
            found = tx.conn.execute(
                update(nodes)
                .where(nodes.c.spiffe_id == spiffe_id)
                .values(updated_at=tx.now)
                .returning(nodes.c.spiffe_id)
            ).scalar()
            if found is None:
                raise NotFound(f"attested node {spiffe_id!r} not found")
            tx.conn.execute(delete(node_selectors).where(node_selectors.c.spiffe_id == spiffe_id))
            self._insert_node_selectors(tx.conn, spiffe_id, tuple(sorted(set(selectors))))
            self._emit(tx, [(EventKind.NODE_UPDATED, spiffe_id)])
            stored = self._load_nodes(tx.conn, [nodes.c.spiffe_id == spiffe_id])[0]
            audit.record(tx, "agent.selectors", subject=spiffe_id, details=_node_details(stored))
            return stored

    def delete_attested_node(self, spiffe_id: str) -> AttestedNode:
        """Delete the node and return it as it was; :class:`NotFound` if absent."""
        with self._transaction(write=True) as tx:
            found = self._load_nodes(tx.conn, [nodes.c.spiffe_id == spiffe_id])
            if not found:
                raise NotFound(f"attested node {spiffe_id!r} not found")
            gone = tx.conn.execute(delete(nodes).where(nodes.c.spiffe_id == spiffe_id)).rowcount
            if gone != 1:
                raise NotFound(f"attested node {spiffe_id!r} not found")
            self._emit(tx, [(EventKind.NODE_DELETED, spiffe_id)])
            audit.record(
                tx,
                "agent.evict",
                subject=spiffe_id,
                target=found[0].cert_serial,
                details=_node_details(found[0]),
            )
        return found[0]

    def count_attested_nodes(self) -> int:
        """Return how many attested nodes exist."""
        with self._single_statement() as conn:  # the agents gauge: each metrics scrape
            return int(conn.execute(select(func.count()).select_from(nodes)).scalar_one())

    def prune_attested_nodes(self, expires_before: int) -> int:
        """Delete non-banned nodes whose ``cert_not_after`` is before ``expires_before``.

        Banned nodes are kept: their row is what keeps them out.
        """
        with self._transaction(write=True) as tx:
            gone = (
                tx.conn.execute(
                    delete(nodes)
                    .where(nodes.c.cert_not_after < expires_before, nodes.c.banned.is_(False))
                    .returning(nodes.c.spiffe_id)
                )
                .scalars()
                .all()
            )
            self._emit(tx, [(EventKind.NODE_DELETED, spiffe_id) for spiffe_id in sorted(gone)])
            for spiffe_id in sorted(gone):
                audit.record(tx, "agent.prune", subject=spiffe_id)
        return len(gone)

    # ------------------------------------------------------------------ join tokens
    # Error messages never include the token: it is a secret.

    def create_join_token(self, token: JoinToken) -> JoinToken:
        """Store a join token; :class:`AlreadyExists` if the same token is stored."""
        _require(token.token, "join token")
        try:
            with self._transaction(write=True) as tx:
                tx.conn.execute(
                    insert(join_tokens).values(
                        token=token.token, expires_at=token.expires_at, spiffe_id=token.spiffe_id
                    )
                )
                audit.record(
                    tx,
                    "join_token.create",
                    subject=token.spiffe_id,
                    target=token_fingerprint(token.token),
                    details={"expires_at": token.expires_at},
                )
        except IntegrityError as exc:
            raise AlreadyExists("join token already exists") from exc
        return token

    def fetch_join_token(self, token: str) -> JoinToken | None:
        """Return the join token, or ``None``."""
        with self._transaction(write=False) as tx:
            row = tx.conn.execute(
                select(
                    join_tokens.c.token, join_tokens.c.expires_at, join_tokens.c.spiffe_id
                ).where(join_tokens.c.token == token)
            ).first()
        return JoinToken(row[0], row[1], row[2]) if row else None

    def consume_join_token(self, token: str) -> JoinToken | None:
        """Atomically delete the token and return it; ``None`` if it was not there.

        Of any number of concurrent callers (threads or processes) exactly one gets the
        token. Expiry is not checked here: the caller compares ``expires_at`` to now.
        """
        with self._transaction(write=True) as tx:
            row = tx.conn.execute(
                delete(join_tokens)
                .where(join_tokens.c.token == token)
                .returning(join_tokens.c.token, join_tokens.c.expires_at, join_tokens.c.spiffe_id)
            ).first()
            if row is not None:
                audit.record(
                    tx, "join_token.consume", subject=row[2], target=token_fingerprint(row[0])
                )
        return JoinToken(row[0], row[1], row[2]) if row else None

    def delete_join_token(self, token: str) -> JoinToken:
        """Delete the token and return it; :class:`NotFound` if absent."""
        found = self.consume_join_token(token)
        if found is None:
            raise NotFound("join token not found")
        return found

    def count_join_tokens(self) -> int:
        """Return how many join tokens exist."""
        with self._transaction(write=False) as tx:
            return int(tx.conn.execute(select(func.count()).select_from(join_tokens)).scalar_one())

    def prune_join_tokens(self, expires_before: int) -> int:
        """Delete tokens whose ``expires_at`` is before ``expires_before``; return how many."""
        with self._transaction(write=True) as tx:
            return int(
                tx.conn.execute(
                    delete(join_tokens).where(join_tokens.c.expires_at < expires_before)
                ).rowcount
            )

    # ------------------------------------------------------------------ bundles

    def fetch_bundle(self, trust_domain: str) -> bytes | None:
        """Return the stored bundle bytes for ``trust_domain``, or ``None``."""
        with self._transaction(write=False) as tx:
            data = tx.conn.execute(
                select(bundles.c.data).where(bundles.c.trust_domain == trust_domain)
            ).scalar()
        return bytes(data) if data is not None else None

    def set_bundle(self, trust_domain: str, data: bytes) -> None:
        """Create or replace the bundle for ``trust_domain``."""
        _require(trust_domain, "trust domain")
        with self._transaction(write=True) as tx:
            self._upsert_bundle(tx, trust_domain, data)
            audit.record(
                tx,
                "bundle.set",
                target=trust_domain,
                details={"sha256": hashlib.sha256(data).hexdigest()},
            )

    def update_bundle(self, trust_domain: str, build: BundleBuilder) -> bytes | None:
        """Read-modify-write the bundle of ``trust_domain`` in one locked transaction.

        ``build(current, authorities)`` gets the stored bundle bytes (``None``: none yet)
        and every authority row (all owners, oldest first), both read after taking the
        bundle lock, so it sees every earlier ``update_bundle`` and authority change; it
        returns the new bytes, or ``None`` to leave the bundle as it is. Concurrent callers
        (threads, or servers sharing the database) run one after another: on PostgreSQL
        through a transaction-scoped advisory lock plus ``SELECT ... FOR UPDATE`` on the
        row, on SQLite through ``BEGIN IMMEDIATE``. So a sequence number derived from
        ``current`` is never handed out twice. Returns the bundle stored afterwards.
        """
        _require(trust_domain, "trust domain")
        with self._transaction(write=True) as tx:
            if self._is_pg:
                tx.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_BUNDLE_LOCK})
            query = select(bundles.c.data).where(bundles.c.trust_domain == trust_domain)
            if self._is_pg:
                query = query.with_for_update()
            raw = tx.conn.execute(query).scalar()
            current = bytes(raw) if raw is not None else None
            rows = self._load_authorities(tx.conn, None)
            data = build(current, rows)
            if data is None or data == current:
                return current
            self._upsert_bundle(tx, trust_domain, data)
            audit.record(
                tx,
                "bundle.update",
                target=trust_domain,
                details={"sha256": hashlib.sha256(data).hexdigest()},
            )
            return data

    def _upsert_bundle(self, tx: _Tx, trust_domain: str, data: bytes) -> None:
        values = {"trust_domain": trust_domain, "data": data, "updated_at": tx.now}
        dialect = pg_dialect if self._is_pg else sqlite_dialect
        stmt = dialect.insert(bundles).values(**values)
        tx.conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[bundles.c.trust_domain],
                set_={"data": stmt.excluded.data, "updated_at": stmt.excluded.updated_at},
            )
        )
        self._emit(tx, [(EventKind.BUNDLE_UPDATED, trust_domain)])

    def list_bundles(self) -> dict[str, bytes]:
        """Return every stored bundle keyed by trust domain name."""
        with self._transaction(write=False) as tx:
            rows = tx.conn.execute(
                select(bundles.c.trust_domain, bundles.c.data).order_by(bundles.c.trust_domain)
            ).all()
        return {td: bytes(data) for td, data in rows}

    def delete_bundle(self, trust_domain: str) -> None:
        """Delete the bundle for ``trust_domain``; :class:`NotFound` if absent."""
        with self._transaction(write=True) as tx:
            gone = tx.conn.execute(
                delete(bundles).where(bundles.c.trust_domain == trust_domain)
            ).rowcount
            if gone == 0:
                raise NotFound(f"bundle for trust domain {trust_domain!r} not found")
            self._emit(tx, [(EventKind.BUNDLE_DELETED, trust_domain)])
            audit.record(tx, "bundle.delete", target=trust_domain)

    # ------------------------------------------------------- federation relationships

    _FED_COLUMNS = (
        "trust_domain",
        "bundle_endpoint_url",
        "bundle_endpoint_profile",
        "endpoint_spiffe_id",
        "created_at",
        "last_refresh_at",
        "last_error",
    )

    @staticmethod
    def _relationship(row: Any) -> FederationRelationship:
        return FederationRelationship(*row)

    def create_federation_relationship(
        self, relationship: FederationRelationship
    ) -> FederationRelationship:
        """Store a relationship; :class:`AlreadyExists` if its trust domain has one."""
        _require(relationship.trust_domain, "trust domain")
        try:
            with self._transaction(write=True) as tx:
                stored = replace(relationship, created_at=relationship.created_at or tx.now)
                tx.conn.execute(
                    insert(federation_relationships).values(
                        {c: getattr(stored, c) for c in self._FED_COLUMNS}
                    )
                )
                audit.record(
                    tx,
                    "federation.create",
                    target=stored.trust_domain,
                    details=_federation_details(stored),
                )
        except IntegrityError as exc:
            raise AlreadyExists(
                f"a federation relationship with {relationship.trust_domain!r} already exists"
            ) from exc
        return stored

    def fetch_federation_relationship(self, trust_domain: str) -> FederationRelationship | None:
        """The relationship with ``trust_domain``, or ``None``."""
        t = federation_relationships
        with self._transaction(write=False) as tx:
            row = tx.conn.execute(
                select(*(t.c[c] for c in self._FED_COLUMNS)).where(t.c.trust_domain == trust_domain)
            ).first()
        return self._relationship(row) if row else None

    def list_federation_relationships(self) -> list[FederationRelationship]:
        """Every relationship, by trust domain."""
        t = federation_relationships
        with self._single_statement() as conn:  # the refresher reloads them every few seconds
            rows = conn.execute(
                select(*(t.c[c] for c in self._FED_COLUMNS)).order_by(t.c.trust_domain)
            ).all()
        return [self._relationship(r) for r in rows]

    def update_federation_relationship(
        self, relationship: FederationRelationship
    ) -> FederationRelationship:
        """Replace the stored relationship of the same trust domain (``created_at`` kept);
        :class:`NotFound` if there is none."""
        t = federation_relationships
        values = {c: getattr(relationship, c) for c in self._FED_COLUMNS if c != "created_at"}
        where = t.c.trust_domain == relationship.trust_domain
        with self._transaction(write=True) as tx:
            before = tx.conn.execute(select(*(t.c[c] for c in self._FED_COLUMNS)).where(where))
            old = before.first()
            gone = tx.conn.execute(update(t).where(where).values(values)).rowcount
            if gone == 0 or old is None:
                raise NotFound(
                    f"no federation relationship with trust domain {relationship.trust_domain!r}"
                )
            row = tx.conn.execute(select(*(t.c[c] for c in self._FED_COLUMNS)).where(where)).first()
            after = self._relationship(row)
            # A refresh only notes its time and error: not a change anyone made.
            if _federation_details(self._relationship(old)) != _federation_details(after):
                audit.record(
                    tx,
                    "federation.update",
                    target=after.trust_domain,
                    details=_federation_details(after),
                )
        return after

    def delete_federation_relationship(self, trust_domain: str) -> FederationRelationship:
        """Delete the relationship and the trust domain's federated bundle (nothing then
        trusts it any more); :class:`NotFound` if there is no relationship."""
        t = federation_relationships
        with self._transaction(write=True) as tx:
            row = tx.conn.execute(
                select(*(t.c[c] for c in self._FED_COLUMNS)).where(t.c.trust_domain == trust_domain)
            ).first()
            if row is None:
                raise NotFound(f"no federation relationship with trust domain {trust_domain!r}")
            tx.conn.execute(delete(t).where(t.c.trust_domain == trust_domain))
            gone = tx.conn.execute(
                delete(bundles).where(bundles.c.trust_domain == trust_domain)
            ).rowcount
            if gone:
                self._emit(tx, [(EventKind.BUNDLE_DELETED, trust_domain)])
            audit.record(
                tx,
                "federation.delete",
                target=trust_domain,
                details={
                    **_federation_details(self._relationship(row)),
                    "bundle_deleted": gone > 0,
                },
            )
        return self._relationship(row)

    # ------------------------------------------------------------------ authorities

    def create_authority(self, authority: Authority) -> Authority:
        """Journal a new CA or JWT key; ``created_at`` of 0 becomes now.

        Raises :class:`AlreadyExists` if the authority id is taken.
        """
        _validate_authority(authority)
        try:
            with self._transaction(write=True) as tx:
                stored = (
                    authority if authority.created_at else replace(authority, created_at=tx.now)
                )
                tx.conn.execute(insert(authorities).values(**_authority_values(stored)))
                audit.record(
                    tx,
                    "authority.prepare",
                    target=stored.authority_id,
                    details=_authority_details(stored),
                )
        except IntegrityError as exc:
            raise AlreadyExists(f"authority {authority.authority_id!r} already exists") from exc
        return stored

    def fetch_authority(self, authority_id: str) -> Authority | None:
        """Return the authority with ``authority_id``, or ``None``."""
        with self._transaction(write=False) as tx:
            found = self._load_authorities(tx.conn, authorities.c.authority_id == authority_id)
        return found[0] if found else None

    def list_authorities(
        self, kind: str | None = None, owner: str | None = None
    ) -> list[Authority]:
        """Return the authorities of ``kind`` and ``owner`` (``None``: any), oldest first."""
        conds = []
        if kind is not None:
            conds.append(authorities.c.kind == kind)
        if owner is not None:
            conds.append(authorities.c.owner == owner)
        # One statement: the rotation check reads the journal every few seconds, and every
        # agent call checks its SVID's authority against it.
        with self._single_statement() as conn:
            return self._load_authorities(conn, and_(*conds) if conds else None)

    def update_authority(self, authority: Authority) -> Authority:
        """Replace the authority's fields (``created_at`` of 0 keeps the stored one)."""
        _validate_authority(authority)
        with self._transaction(write=True) as tx:
            before = self._load_authorities(
                tx.conn, authorities.c.authority_id == authority.authority_id
            )
            values = _authority_values(authority)
            if not authority.created_at:
                del values["created_at"]
            created = tx.conn.execute(
                update(authorities)
                .where(authorities.c.authority_id == authority.authority_id)
                .values(**values)
                .returning(authorities.c.created_at)
            ).scalar()
            if created is None:
                raise NotFound(f"authority {authority.authority_id!r} not found")
            action = _authority_change(before[0] if before else None, authority)
            audit.record(
                tx, action, target=authority.authority_id, details=_authority_details(authority)
            )
        return replace(authority, created_at=created)

    def delete_authority(self, authority_id: str) -> Authority:
        """Delete the authority and return it; :class:`NotFound` if absent."""
        with self._transaction(write=True) as tx:
            found = self._load_authorities(tx.conn, authorities.c.authority_id == authority_id)
            if not found:
                raise NotFound(f"authority {authority_id!r} not found")
            tx.conn.execute(delete(authorities).where(authorities.c.authority_id == authority_id))
            audit.record(
                tx,
                "authority.revoke" if found[0].tainted else "authority.prune",
                target=authority_id,
                details=_authority_details(found[0]),
            )
        return found[0]

    # ------------------------------------------------------------------ issued X.509-SVIDs

    def create_issued_x509_svids(
        self,
        svids: Sequence[IssuedX509Svid],
        *,
        audit: Callable[[frozenset[str]], Sequence[PendingRecord]] | None = None,
    ) -> frozenset[str]:
        """Record signed SVIDs, except those of revoked entries: return those entries' ids.

        The caller must not hand out an SVID whose entry id comes back: its entry was
        revoked after it was authorized. The entries' rows are share-locked first, so a
        concurrent :meth:`revoke_registration_entry` either sees these rows (and revokes
        them) or is seen here.

        ``audit``, given those entries' ids, returns the batch's audit records: they are
        chained and written in the same transaction (both are written, or neither).
        """
        if not svids:
            return frozenset()
        entry_ids = sorted({s.entry_id for s in svids if s.entry_id})
        with self._transaction(write=True) as tx:
            revoked: set[str] = set()
            for chunk in _chunks(entry_ids):
                if self._is_pg:
                    tx.conn.execute(
                        select(entries.c.entry_id)
                        .where(entries.c.entry_id.in_(chunk))
                        .order_by(entries.c.entry_id)
                        .with_for_update(read=True)
                    )
                revoked.update(
                    tx.conn.execute(
                        select(revoked_entries.c.entry_id).where(
                            revoked_entries.c.entry_id.in_(chunk)
                        )
                    ).scalars()
                )
            rows = [
                {**_issued_values(s), "issued_at": s.issued_at or tx.now}
                for s in svids
                if s.entry_id not in revoked
            ]
            for chunk in _chunks(rows):
                tx.conn.execute(insert(issued_x509_svids), list(chunk))
            refused = frozenset(revoked)
            if audit is not None:
                tx.audit.extend(audit(refused))
        return refused

    def credential_revoked(self, kind: str, ident: str) -> bool:
        """Whether a credential is revoked, in one statement: ``kind`` ``"serial"`` (an
        X509-SVID, lowercase hex) or ``"jti"`` (a JWT-SVID), true too when the entry it
        was issued for is revoked; ``"token"`` a delegated access token by ``jti``. An
        unrecorded credential is not revoked."""
        with self._transaction(write=False) as tx:
            return self._revoked_in(tx.conn, kind, ident)

    @staticmethod
    def _revoked_in(conn: Connection, kind: str, ident: str) -> bool:
        stmt = {"serial": _X509_REVOKED, "jti": _JWT_REVOKED, "token": _TOKEN_REVOKED}.get(kind)
        if stmt is None:
            raise InvalidRequest(f"unknown credential kind {kind!r}")
        row = conn.execute(stmt, {"ident": ident}).first()
        return row is not None and any(bool(value) for value in row)

    def fetch_issued_x509_svid(self, serial: str) -> IssuedX509Svid | None:
        """The recorded SVID with this serial (lowercase hex), or None."""
        with self._transaction(write=False) as tx:
            found = X509_SVIDS.load(tx.conn, issued_x509_svids.c.serial == serial)
        return found[0] if found else None

    def list_issued_x509_svids(
        self,
        *,
        entry_id: str | None = None,
        agent_id: str | None = None,
        authority_id: str | None = None,
        revoked: bool | None = None,
        expires_after: int | None = None,
    ) -> list[IssuedX509Svid]:
        """Recorded SVIDs matching every given filter, ordered by serial."""
        c = issued_x509_svids.c
        conds: list[ColumnElement[bool]] = []
        if entry_id is not None:
            conds.append(c.entry_id == entry_id)
        if agent_id is not None:
            conds.append(c.agent_id == agent_id)
        if authority_id is not None:
            conds.append(c.authority_id == authority_id)
        if revoked is not None:
            conds.append(c.revoked_at != 0 if revoked else c.revoked_at == 0)
        if expires_after is not None:
            conds.append(c.expires_at > expires_after)
        with self._transaction(write=False) as tx:
            return X509_SVIDS.load(tx.conn, and_(true(), *conds))

    def prune_issued_x509_svids(self, expires_before: int) -> int:
        """Forget SVIDs that expired before ``expires_before`` (nothing verifies them)."""
        with self._transaction(write=True) as tx:
            return int(
                tx.conn.execute(
                    delete(issued_x509_svids).where(issued_x509_svids.c.expires_at < expires_before)
                ).rowcount
            )

    # ------------------------------------------------------------------ revocation

    def revoke_x509_svid(self, serial: str, reason: str) -> Revocation:
        """Revoke one recorded SVID; :class:`NotFound` if the serial was never recorded.

        Idempotent: an SVID already revoked keeps its first time and reason, and the
        result then lists nothing.
        """
        with self._transaction(write=True) as tx:
            svid, revoked = self._revoke_one(tx, X509_SVIDS, serial, reason)
            audit.record(
                tx,
                "x509_svid.revoke",
                subject=svid.spiffe_id,
                target=serial,
                owner=self._entry_owner(tx.conn, svid.entry_id),
                details=_revocation_details(reason, revoked, [], entry_id=svid.entry_id),
            )
        return Revocation(tuple(revoked))

    def revoke_registration_entry(
        self, entry_id: str, reason: str, *, cascade: bool = False
    ) -> Revocation:
        """The kill switch: no SVID may be issued for the entry any more, and every
        unexpired SVID issued for it is revoked. :class:`NotFound` if the entry is absent.

        Idempotent: revoking a revoked entry changes nothing and lists nothing.
        """
        with self._transaction(write=True) as tx:
            stmt = select(entries.c.entry_id, entries.c.spiffe_id, entries.c.owner).where(
                entries.c.entry_id == entry_id
            )
            if self._is_pg:
                stmt = stmt.with_for_update()
            row = tx.conn.execute(stmt).first()
            if row is None:
                raise NotFound(f"registration entry {entry_id!r} not found")
            spiffe_id = str(row[1])
            already = tx.conn.execute(
                select(revoked_entries.c.entry_id).where(revoked_entries.c.entry_id == entry_id)
            ).first()
            if already is None:
                tx.conn.execute(
                    insert(revoked_entries).values(
                        entry_id=entry_id, revoked_at=tx.now, reason=reason
                    )
                )
                self._emit(tx, [(EventKind.ENTRY_REVOKED, entry_id)])
            c = issued_x509_svids.c
            revoked = self._revoke(
                tx, X509_SVIDS, and_(c.entry_id == entry_id, c.expires_at > tx.now), reason
            )
            j = issued_jwt_svids.c
            jwts = self._revoke(
                tx, JWT_SVIDS, and_(j.entry_id == entry_id, j.expires_at > tx.now), reason
            )
            d = delegated_tokens.c
            mine = d.client_id == spiffe_id
            if cascade:
                mine = or_(mine, d.actors.contains(spiffe_id + " ", autoescape=True))
            tokens = self._revoke(tx, DELEGATED_TOKENS, and_(mine, d.expires_at > tx.now), reason)
            audit.record(
                tx,
                "entry.revoke",
                subject=spiffe_id,
                target=entry_id,
                owner=str(row[2]),
                details={
                    **_revocation_details(reason, revoked, jwts),
                    "revoked_tokens": [t.jti for t in tokens],
                    "newly_revoked": already is None,
                },
            )
        return Revocation(
            tuple(revoked),
            entry_newly_revoked=already is None,
            revoked_jwts=tuple(jwts),
            revoked_tokens=tuple(tokens),
        )

    def list_revoked_entry_ids(self) -> set[str]:
        """Ids of every revoked registration entry."""
        with self._transaction(write=False) as tx:
            return set(tx.conn.execute(select(revoked_entries.c.entry_id)).scalars())

    def fetch_entry_revocation(self, entry_id: str) -> tuple[int, str] | None:
        """(revoked at, reason) of a revoked entry, or None when it is not revoked."""
        with self._transaction(write=False) as tx:
            row = tx.conn.execute(
                select(revoked_entries.c.revoked_at, revoked_entries.c.reason).where(
                    revoked_entries.c.entry_id == entry_id
                )
            ).first()
        return None if row is None else (int(row[0]), str(row[1]))

    def ban_attested_node(self, spiffe_id: str, reason: str) -> tuple[AttestedNode, Revocation]:
        """Ban the node and revoke every unexpired SVID it obtained (its own included).

        :class:`NotFound` if the node is absent. Idempotent.
        """
        with self._transaction(write=True) as tx:
            found = tx.conn.execute(
                update(nodes)
                .where(nodes.c.spiffe_id == spiffe_id)
                .values(banned=True, updated_at=tx.now)
                .returning(nodes.c.spiffe_id)
            ).first()
            if found is None:
                raise NotFound(f"attested node {spiffe_id!r} not found")
            self._emit(tx, [(EventKind.NODE_UPDATED, spiffe_id)])
            c = issued_x509_svids.c
            revoked = self._revoke(
                tx, X509_SVIDS, and_(c.agent_id == spiffe_id, c.expires_at > tx.now), reason
            )
            j = issued_jwt_svids.c
            jwts = self._revoke(
                tx, JWT_SVIDS, and_(j.agent_id == spiffe_id, j.expires_at > tx.now), reason
            )
            tokens = self._revoke_agent_tokens(tx, spiffe_id, reason)
            node = self._load_nodes(tx.conn, [nodes.c.spiffe_id == spiffe_id])[0]
            audit.record(
                tx,
                "agent.ban",
                subject=spiffe_id,
                target=node.new_cert_serial or node.cert_serial,
                details={
                    **_node_details(node),
                    **_revocation_details(reason, revoked, jwts),
                    "revoked_tokens": [t.jti for t in tokens],
                },
            )
        return node, Revocation(
            tuple(revoked), revoked_jwts=tuple(jwts), revoked_tokens=tuple(tokens)
        )

    def _revoke_agent_tokens(self, tx: _Tx, agent_id: str, reason: str) -> list[DelegatedToken]:
        """Revoke the unexpired delegated tokens issued to the agent itself or to an identity
        it obtained an unexpired SVID for (X.509, JWT or WIT). A token does not record the
        node its client was on, so an identity served by several agents loses its tokens on
        all of them: its workloads elsewhere exchange again with their own SVIDs."""
        c, j = issued_x509_svids.c, issued_jwt_svids.c
        held = {agent_id}
        held.update(
            tx.conn.execute(
                select(c.spiffe_id).where(c.agent_id == agent_id, c.expires_at > tx.now).distinct()
            ).scalars()
        )
        held.update(
            tx.conn.execute(
                select(j.spiffe_id).where(j.agent_id == agent_id, j.expires_at > tx.now).distinct()
            ).scalars()
        )
        d = delegated_tokens.c
        return self._revoke(
            tx,
            DELEGATED_TOKENS,
            and_(d.client_id.in_(sorted(held)), d.expires_at > tx.now),
            reason,
        )

    @staticmethod
    def _entry_owner(conn: Connection, entry_id: str) -> str:
        """The owner of the entry ``entry_id`` (``""`` if none, or no such entry)."""
        if not entry_id:
            return ""
        owner = conn.execute(select(entries.c.owner).where(entries.c.entry_id == entry_id)).scalar()
        return str(owner or "")

    def _revoke(
        self, tx: _Tx, kind: IssuedKind[_R], cond: ColumnElement[bool], reason: str
    ) -> list[_R]:
        """Mark the matching unrevoked credentials of ``kind`` revoked, with their events."""
        revoked = kind.revoke(tx.conn, tx.now, cond, reason)
        if revoked:
            self._emit(tx, kind.events(revoked))
        return revoked

    def _revoke_one(
        self, tx: _Tx, kind: IssuedKind[_R], key: str, reason: str
    ) -> tuple[_R, list[_R]]:
        """The credential of ``kind`` named ``key`` and what revoking it revoked (nothing
        when it already was); :class:`NotFound` if it was never recorded."""
        cond = kind.table.c[kind.key] == key
        found = kind.load(tx.conn, cond)
        if not found:
            raise NotFound(f"no {kind.noun} with {kind.key} {key!r} was issued")
        return found[0], self._revoke(tx, kind, cond, reason)

    # ------------------------------------------------------------------ issued JWT-SVIDs

    def create_issued_jwt_svid(self, svid: IssuedJwtSvid) -> bool:
        """Record a signed JWT-SVID; False (not recorded) when its entry is revoked.

        The caller must not hand out a token for which this returns False.
        """
        with self._transaction(write=True) as tx:
            if svid.entry_id:
                stmt = select(entries.c.entry_id).where(entries.c.entry_id == svid.entry_id)
                if self._is_pg:
                    stmt = stmt.with_for_update(read=True)
                tx.conn.execute(stmt)
                revoked = tx.conn.execute(
                    select(revoked_entries.c.entry_id).where(
                        revoked_entries.c.entry_id == svid.entry_id
                    )
                ).first()
                if revoked is not None:
                    return False
            stored = replace(svid, issued_at=svid.issued_at or tx.now)
            tx.conn.execute(
                insert(issued_jwt_svids).values(
                    jti=stored.jti,
                    entry_id=stored.entry_id,
                    spiffe_id=stored.spiffe_id,
                    agent_id=stored.agent_id,
                    expires_at=stored.expires_at,
                    issued_at=stored.issued_at,
                    revoked_at=stored.revoked_at,
                    reason=stored.reason,
                )
            )
        return True

    def fetch_issued_jwt_svid(self, jti: str) -> IssuedJwtSvid | None:
        """The recorded JWT-SVID with this ``jti``, or None."""
        with self._transaction(write=False) as tx:
            found = JWT_SVIDS.load(tx.conn, issued_jwt_svids.c.jti == jti)
        return found[0] if found else None

    def list_revoked_jwt_svids(self, expires_after: int) -> list[IssuedJwtSvid]:
        """Revoked JWTs that expire after ``expires_after`` (the revocation list): JWT-SVIDs
        and delegated access tokens (as records with the client as ``spiffe_id``)."""
        j = issued_jwt_svids.c
        d = delegated_tokens.c
        with self._transaction(write=False) as tx:
            svids = JWT_SVIDS.load(tx.conn, and_(j.revoked_at != 0, j.expires_at > expires_after))
            tokens = DELEGATED_TOKENS.load(
                tx.conn, and_(d.revoked_at != 0, d.expires_at > expires_after)
            )
        return svids + [
            IssuedJwtSvid(
                jti=t.jti,
                spiffe_id=t.client_id,
                expires_at=t.expires_at,
                issued_at=t.issued_at,
                revoked_at=t.revoked_at,
                reason=t.reason,
            )
            for t in tokens
        ]

    def revoke_jwt_svid(self, jti: str, reason: str) -> Revocation:
        """Revoke one recorded JWT-SVID; :class:`NotFound` if the jti was never recorded.

        Idempotent: an already revoked one keeps its first time and reason.
        """
        with self._transaction(write=True) as tx:
            svid, jwts = self._revoke_one(tx, JWT_SVIDS, jti, reason)
            audit.record(
                tx,
                "jwt_svid.revoke",
                subject=svid.spiffe_id,
                target=jti,
                owner=self._entry_owner(tx.conn, svid.entry_id),
                details=_revocation_details(reason, [], jwts, entry_id=svid.entry_id),
            )
        return Revocation(revoked_jwts=tuple(jwts))

    def prune_issued_jwt_svids(self, expires_before: int) -> int:
        """Forget JWT-SVIDs that expired before ``expires_before``."""
        with self._transaction(write=True) as tx:
            return int(
                tx.conn.execute(
                    delete(issued_jwt_svids).where(issued_jwt_svids.c.expires_at < expires_before)
                ).rowcount
            )

    # ------------------------------------------------------------------ delegated tokens

    def create_delegated_token(self, token: DelegatedToken) -> bool:
        """Record an access token the token endpoint is about to hand out; False (not
        recorded) when its client has no unrevoked registration entry (revoked meanwhile).

        The caller must not hand out a token for which this returns False.
        """
        with self._transaction(write=True) as tx:
            if not self._has_live_entry(tx.conn, token.client_id):
                return False
            self._insert_token(tx, token)
        return True

    def record_token_grants(self, grants: Sequence[TokenGrant]) -> list[GrantOutcome]:
        """Record granted token exchanges, all in one transaction (group commit).

        For each grant, in order: refused (``recorded`` False) when its client has no
        unrevoked registration entry, when the credential it authenticated with
        (``client_credential``) is revoked, or when one of its budgets has no unit left in its
        window (then none of its units is taken and that budget's ``refused`` counter goes
        up); else one unit of every budget is taken, the token recorded and its audit
        record chained, in the same transaction. Safe against concurrent callers on every
        backend: each budget unit is taken by one conditional upsert (``INSERT ... ON
        CONFLICT DO UPDATE ... WHERE used < limit``), so two servers racing for the last
        unit cannot both win. The caller must hand out only the tokens whose outcome is
        ``recorded``.
        """
        outcomes: list[GrantOutcome] = []
        if not grants:
            return outcomes
        with self._transaction(write=True) as tx:
            live: dict[str, bool] = {}
            tokens: list[dict[str, Any]] = []
            for grant in grants:
                client = grant.token.client_id
                if client not in live:
                    live[client] = self._has_live_entry(tx.conn, client)
                if not live[client]:
                    outcomes.append(GrantOutcome(recorded=False))
                    continue
                if grant.client_credential is not None and self._revoked_in(
                    tx.conn, *grant.client_credential
                ):
                    outcomes.append(GrantOutcome(recorded=False, revoked_credential=True))
                    continue
                exhausted = self._take_units(tx.conn, grant)
                if exhausted is not None:
                    outcomes.append(GrantOutcome(recorded=False, exhausted=exhausted))
                    continue
                tokens.append(_token_values(grant.token, tx.now))
                tx.audit.append(grant.audit)
                outcomes.append(GrantOutcome(recorded=True))
            for chunk in _chunks(tokens):
                tx.conn.execute(_INSERT_TOKENS, list(chunk))
        return outcomes

    def _take_units(self, conn: Connection, grant: TokenGrant) -> Budget | None:
        """One unit of each of the grant's budgets, or none and the exhausted budget."""
        if not grant.budgets:
            return None
        agent = grant.token.client_id
        savepoint = conn.begin_nested()
        for budget in grant.budgets:
            window = grant.now - grant.now % budget.period
            if not self._take_unit(conn, grant.policy_id, agent, budget, window):
                savepoint.rollback()
                self._count_refusal(conn, grant.policy_id, agent, budget.scope, window)
                return budget
        savepoint.commit()
        return None

    def _has_live_entry(self, conn: Connection, spiffe_id: str) -> bool:
        """Whether ``spiffe_id`` has a registration entry that is not revoked (PostgreSQL:
        the entries stay locked for share until the transaction ends)."""
        if not self._is_pg:
            return conn.execute(_LIVE_ENTRY, {"spiffe_id": spiffe_id}).first() is not None
        ids = set(conn.execute(_LIVE_ENTRY_PG, {"spiffe_id": spiffe_id}).scalars())
        if ids:
            ids -= set(conn.execute(_REVOKED_AMONG, {"ids": sorted(ids)}).scalars())
        return bool(ids)

    @staticmethod
    def _insert_token(tx: _Tx, token: DelegatedToken) -> None:
        tx.conn.execute(_INSERT_TOKENS, [_token_values(token, tx.now)])

    def fetch_delegated_token(self, jti: str) -> DelegatedToken | None:
        """The recorded access token with this ``jti``, or None."""
        with self._transaction(write=False) as tx:
            found = DELEGATED_TOKENS.load(tx.conn, delegated_tokens.c.jti == jti)
        return found[0] if found else None

    def revoke_delegated_token(self, jti: str, reason: str, *, cascade: bool = False) -> Revocation:
        """Revoke one recorded access token (and, with ``cascade``, every unexpired token
        whose actor chain contains its client); :class:`NotFound` if never recorded.

        Idempotent: an already revoked one keeps its first time and reason.
        """
        d = delegated_tokens.c
        with self._transaction(write=True) as tx:
            token, tokens = self._revoke_one(tx, DELEGATED_TOKENS, jti, reason)
            if cascade:
                tokens += self._revoke(
                    tx,
                    DELEGATED_TOKENS,
                    and_(
                        d.actors.contains(token.client_id + " ", autoescape=True),
                        d.expires_at > tx.now,
                    ),
                    reason,
                )
            audit.record(
                tx,
                "token.revoke",
                subject=token.client_id,
                target=jti,
                details={
                    "reason": reason,
                    "sub": token.subject,
                    "revoked_tokens": [t.jti for t in tokens],
                    "cascade": cascade,
                },
            )
        return Revocation(revoked_tokens=tuple(tokens))

    def prune_delegated_tokens(self, expires_before: int) -> int:
        """Forget access tokens that expired before ``expires_before``."""
        with self._transaction(write=True) as tx:
            return int(
                tx.conn.execute(
                    delete(delegated_tokens).where(delegated_tokens.c.expires_at < expires_before)
                ).rowcount
            )

    # ------------------------------------------------------------------ CRLs

    def set_crl(self, crl: Crl) -> Crl:
        """Store the authority's current CRL (replacing the previous one)."""
        with self._transaction(write=True) as tx:
            tx.conn.execute(delete(crls).where(crls.c.authority_id == crl.authority_id))
            stored = replace(crl, updated_at=tx.now)
            tx.conn.execute(
                insert(crls).values(
                    authority_id=stored.authority_id,
                    number=stored.number,
                    data=stored.data,
                    next_update=stored.next_update,
                    updated_at=stored.updated_at,
                )
            )
            self._emit(tx, [(EventKind.CRL_UPDATED, crl.authority_id)])
        return stored

    def fetch_crl(self, authority_id: str) -> Crl | None:
        """The authority's current CRL, or None."""
        found = [c for c in self._load_crls(crls.c.authority_id == authority_id)]
        return found[0] if found else None

    def list_crls(self) -> list[Crl]:
        """Every stored CRL, ordered by authority id."""
        return self._load_crls(None)

    def prune_crls(self) -> int:
        """Delete the CRLs of authorities no longer in the journal."""
        with self._transaction(write=True) as tx:
            known = select(authorities.c.authority_id).scalar_subquery()
            gone = list(
                tx.conn.execute(
                    select(crls.c.authority_id).where(crls.c.authority_id.not_in(known))
                ).scalars()
            )
            if not gone:
                return 0
            tx.conn.execute(delete(crls).where(crls.c.authority_id.in_(gone)))
            self._emit(tx, [(EventKind.CRL_UPDATED, a) for a in gone])
        return len(gone)

    def _load_crls(self, cond: ColumnElement[bool] | None) -> list[Crl]:
        c = crls.c
        stmt = select(c.authority_id, c.number, c.data, c.next_update, c.updated_at)
        if cond is not None:
            stmt = stmt.where(cond)
        with self._transaction(write=False) as tx:
            return [
                Crl(r[0], int(r[1]), bytes(r[2]), int(r[3]), int(r[4]))
                for r in tx.conn.execute(stmt.order_by(c.authority_id))
            ]

    # ------------------------------------------------------------------ events

    def list_events(self, after_id: int, limit: int = 1000) -> list[Event]:
        """Return up to ``limit`` events with ids above ``after_id``, in id order."""
        if limit <= 0:
            raise InvalidRequest(f"event limit must be positive, not {limit}")
        # One statement, no transaction: the change feed polls this every second.
        with self._single_statement() as conn:
            rows = conn.execute(
                select(events.c.id, events.c.kind, events.c.subject, events.c.created_at)
                .where(events.c.id > after_id)
                .order_by(events.c.id)
                .limit(limit)
            ).all()
        return [Event(row[0], EventKind(row[1]), row[2], row[3]) for row in rows]

    def fetch_latest_event_id(self) -> int:
        """Return the highest event id (0 when no event was ever written)."""
        with self._single_statement() as conn:
            return int(conn.execute(select(func.max(events.c.id))).scalar() or 0)

    def fetch_oldest_event_id(self) -> int:
        """Return the lowest event id still stored (0 when there is none).

        A reader that has seen every event up to ``n`` can resume with
        ``list_events(n)`` only if ``n + 1 >= fetch_oldest_event_id()``; otherwise events
        it missed were pruned and it must start over from a full listing.
        """
        with self._transaction(write=False) as tx:
            return int(tx.conn.execute(select(func.min(events.c.id))).scalar() or 0)

    def prune_events(self, older_than: int) -> int:
        """Delete events created before ``older_than``, always keeping the newest one.

        Keeping the newest event keeps ``fetch_latest_event_id`` meaningful.
        """
        with self._transaction(write=True) as tx:
            newest = select(func.max(events.c.id)).scalar_subquery()
            return int(
                tx.conn.execute(
                    delete(events).where(events.c.created_at < older_than, events.c.id < newest)
                ).rowcount
            )

    # ------------------------------------------------------------------ audit records

    def append_audit_records(self, pending: Sequence[PendingRecord]) -> list[AuditRecord]:
        """Chain and store records of decisions that change nothing else (an issuance).

        One transaction for the batch; returns the records as stored.
        """
        if not pending:
            return []
        with self._transaction(write=True) as tx:
            tx.audit.extend(pending)
        return list(tx.audited)

    def list_audit_records(
        self, request: ListAuditRecordsRequest | None = None
    ) -> list[AuditRecord]:
        """Return the records matching every filter of ``request``, in ``seq`` order."""
        request = request or ListAuditRecordsRequest()
        if request.limit < 0:
            raise InvalidRequest(f"limit must be 0 (everything) or positive, not {request.limit}")
        a = audit_records.c
        conds: list[ColumnElement[bool]] = [a.seq > request.after_seq]
        if request.by_spiffe_id is not None:
            conds.append(or_(a.subject == request.by_spiffe_id, a.actor == request.by_spiffe_id))
        if request.by_owner is not None:
            conds.append(a.owner == request.by_owner)
        if request.by_action:
            if request.by_action.endswith("."):
                conds.append(a.action.startswith(request.by_action, autoescape=True))
            else:
                conds.append(a.action == request.by_action)
        if request.since_ms is not None:
            conds.append(a.time_ms >= request.since_ms)
        if request.until_ms is not None:
            conds.append(a.time_ms < request.until_ms)
        stmt = select(*_AUDIT_COLUMNS).where(*conds).order_by(a.seq)
        if request.limit:
            stmt = stmt.limit(request.limit)
        with self._transaction(write=False) as tx:
            return [_audit_record(row) for row in tx.conn.execute(stmt)]

    def prune_audit_records(self, before_seq: int) -> int:
        """Delete the records before ``before_seq``; the rest stays verifiable.

        Writes an ``audit.prune`` record naming the first record kept and its
        ``prev_hash`` (what :func:`server.audit.verify_trail` anchors the rest on).
        Raises :class:`NotFound` if record ``before_seq`` does not exist.
        """
        if before_seq < 2:
            raise InvalidRequest(f"prune before record 2 or later, not {before_seq}")
        a = audit_records.c
        with self._transaction(write=True) as tx:
            if self._is_pg:  # no append may interleave with the cut
                tx.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
            kept = tx.conn.execute(select(a.prev_hash).where(a.seq == before_seq)).scalar()
            if kept is None:
                raise NotFound(f"audit record {before_seq} not found")
            gone = int(tx.conn.execute(delete(audit_records).where(a.seq < before_seq)).rowcount)
            audit.record(
                tx,
                "audit.prune",
                target=str(before_seq - 1),
                details={
                    "first_kept": before_seq,
                    "first_kept_prev_hash": kept,
                    "pruned": gone,
                },
            )
        return gone

    def fetch_audit_head(self) -> AuditRecord | None:
        """The newest record (the chain head), or ``None`` when there is none."""
        with self._transaction(write=False) as tx:
            row = tx.conn.execute(
                select(*_AUDIT_COLUMNS).order_by(audit_records.c.seq.desc()).limit(1)
            ).first()
        return _audit_record(row) if row is not None else None

    # ------------------------------------------------------------------ delegation policies

    def create_delegation_policy(self, policy: DelegationPolicy) -> DelegationPolicy:
        """Store a new policy (assigning an id when empty); :class:`AlreadyExists` if taken."""
        _validate_policy(policy)
        with self._transaction(write=True) as tx:
            stored = replace(
                policy, id=policy.id or str(uuid.uuid4()), revision_number=0, created_at=tx.now
            )
            try:
                tx.conn.execute(insert(delegation_policies).values(**_policy_values(stored)))
            except IntegrityError as exc:
                raise AlreadyExists(f"delegation policy {stored.id!r} already exists") from exc
            audit.record(
                tx,
                "delegation_policy.create",
                subject=_policy_subject(stored),
                target=stored.id,
                details=_policy_details(stored),
            )
        return stored

    def fetch_delegation_policy(self, policy_id: str) -> DelegationPolicy | None:
        """Return the policy with ``policy_id``, or ``None``."""
        with self._transaction(write=False) as tx:
            found = _load_policies(tx.conn, delegation_policies.c.policy_id == policy_id)
        return found[0] if found else None

    def list_delegation_policies(
        self, *, by_agent_ids: Sequence[str] | None = None
    ) -> list[DelegationPolicy]:
        """Every policy ordered by id, or those whose ``agent_id`` is one of ``by_agent_ids``."""
        cond = None
        if by_agent_ids is not None:
            cond = delegation_policies.c.agent_id.in_(list(by_agent_ids))
        with self._transaction(write=False) as tx:
            return _load_policies(tx.conn, cond)

    def update_delegation_policy(self, policy: DelegationPolicy) -> DelegationPolicy:
        """Replace every field of the policy with ``policy.id``; bump its revision number."""
        _validate_policy(policy)
        values = _policy_values(policy)
        for owned in ("policy_id", "revision_number", "created_at"):
            del values[owned]
        with self._transaction(write=True) as tx:
            row = tx.conn.execute(
                update(delegation_policies)
                .where(delegation_policies.c.policy_id == policy.id)
                .values(revision_number=delegation_policies.c.revision_number + 1, **values)
                .returning(delegation_policies.c.revision_number, delegation_policies.c.created_at)
            ).first()
            if row is None:
                raise NotFound(f"delegation policy {policy.id!r} not found")
            stored = replace(policy, revision_number=row[0], created_at=row[1])
            audit.record(
                tx,
                "delegation_policy.update",
                subject=_policy_subject(stored),
                target=stored.id,
                details=_policy_details(stored),
            )
        return stored

    def delete_delegation_policy(self, policy_id: str) -> DelegationPolicy:
        """Delete the policy (and its budget counters); :class:`NotFound` if absent."""
        with self._transaction(write=True) as tx:
            found = _load_policies(tx.conn, delegation_policies.c.policy_id == policy_id)
            if not found:
                raise NotFound(f"delegation policy {policy_id!r} not found")
            tx.conn.execute(delete(budget_usage).where(budget_usage.c.policy_id == policy_id))
            tx.conn.execute(
                delete(delegation_policies).where(delegation_policies.c.policy_id == policy_id)
            )
            audit.record(
                tx,
                "delegation_policy.delete",
                subject=_policy_subject(found[0]),
                target=policy_id,
                details=_policy_details(found[0]),
            )
        return found[0]

    def _upsert(self) -> Any:
        return (pg_dialect if self._is_pg else sqlite_dialect).insert(budget_usage)

    def _take_unit(
        self, conn: Connection, policy_id: str, agent_id: str, budget: Budget, window: int
    ) -> bool:
        stmt = self._upsert().values(
            policy_id=policy_id,
            agent_id=agent_id,
            scope=budget.scope,
            window_start=window,
            used=1,
            refused=0,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["policy_id", "agent_id", "scope", "window_start"],
            set_={"used": budget_usage.c.used + 1},
            where=budget_usage.c.used < budget.limit,
        ).returning(budget_usage.c.used)
        row = conn.execute(stmt).first()
        return row is not None and int(row[0]) <= budget.limit

    def _count_refusal(
        self, conn: Connection, policy_id: str, agent_id: str, scope: str, window: int
    ) -> None:
        stmt = self._upsert().values(
            policy_id=policy_id,
            agent_id=agent_id,
            scope=scope,
            window_start=window,
            used=0,
            refused=1,
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["policy_id", "agent_id", "scope", "window_start"],
                set_={"refused": budget_usage.c.refused + 1},
            )
        )

    def list_budget_use(self, policy_id: str, now: int) -> list[BudgetUse]:
        """The counters of the policy's budgets in their current windows, every agent."""
        policy = self.fetch_delegation_policy(policy_id)
        if policy is None:
            raise NotFound(f"delegation policy {policy_id!r} not found")
        c = budget_usage.c
        out: list[BudgetUse] = []
        with self._transaction(write=False) as tx:
            for budget in policy.budgets:
                window = now - now % budget.period
                rows = tx.conn.execute(
                    select(c.agent_id, c.used, c.refused)
                    .where(
                        c.policy_id == policy_id, c.scope == budget.scope, c.window_start == window
                    )
                    .order_by(c.agent_id)
                ).all()
                out.extend(
                    BudgetUse(policy_id, r[0], budget.scope, window, int(r[1]), int(r[2]))
                    for r in rows
                )
        return out

    def prune_budget_use(self, window_before: int) -> int:
        """Delete counters of windows that started before ``window_before``."""
        with self._transaction(write=True) as tx:
            return int(
                tx.conn.execute(
                    delete(budget_usage).where(budget_usage.c.window_start < window_before)
                ).rowcount
            )

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _transaction(self, *, write: bool, inject: bool = True) -> Iterator[_Tx]:
        """Run the body in one transaction; after commit, hand its events to listeners."""
        with self._guard:
            if self._closed:
                raise DataStoreError("datastore is closed")
            injected, self._next_error = (self._next_error, None) if inject else (None, None)
        if injected is not None:
            raise injected
        with self._serial or nullcontext(), self._engine.connect() as conn:
            if write:
                conn.execution_options(credo_write=True)
            elif self._is_pg:
                conn.execution_options(isolation_level="REPEATABLE READ")
            tx = _Tx(conn, int(self._clock()))
            with conn.begin():
                yield tx
                if tx.audit:
                    self._append_audit(tx)
        if write:
            with self._statements_lock:
                self._writes += 1
        if tx.events:
            self._notify(tx.events)

    @contextmanager
    def _single_statement(self) -> Iterator[Connection]:
        """A connection outside any transaction, for a read that is one statement.

        One statement is atomic by itself (a snapshot of its own), so reads of that kind
        made every second need no transaction: only the statement goes to the database,
        not a BEGIN and a COMMIT around it (nor, on PostgreSQL, the pool's pre-ping: the
        connection is held, and replaced when it fails).
        """
        with self._guard:
            if self._closed:
                raise DataStoreError("datastore is closed")
            injected, self._next_error = self._next_error, None
        if injected is not None:
            raise injected
        if not self._is_pg:
            # SQLite: the connection's BEGIN is ours (_configure_sqlite), so without it the
            # driver runs the statement on its own (autocommit), and no pre-ping is made.
            with self._serial or nullcontext(), self._engine.connect() as conn:
                yield conn.execution_options(credo_autocommit=True)
            return
        if not self._single_lock.acquire(blocking=False):
            # The held connection is busy (calls read concurrently): a pooled one.
            with self._engine.connect() as pooled:
                yield pooled.execution_options(isolation_level="AUTOCOMMIT", credo_autocommit=True)
            return
        try:
            held = self._single
            if held is None or held.closed or held.invalidated:
                held = self._engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT", credo_autocommit=True
                )
                self._single = held
            try:
                yield held
            except BaseException:
                self._single = None
                held.close()
                raise
            held.rollback()  # ends SQLAlchemy's autobegun transaction; nothing is sent
        finally:
            self._single_lock.release()

    def _notify(self, written: list[Event]) -> None:
        with self._guard:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(list(written))
            except Exception:
                # The write is committed; a broken listener must not make it look failed.
                log.exception("datastore listener failed", extra={"listener": repr(listener)})

    def _append_audit(self, tx: _Tx) -> None:
        """Chain the transaction's audit records after the head, under the audit lock."""
        if self._is_pg:
            tx.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
        head = tx.conn.execute(_AUDIT_HEAD).first()
        seq, prev = (int(head[0]), str(head[1])) if head is not None else (0, audit.GENESIS)
        time_ms = int(self._clock() * 1000)
        chained: list[AuditRecord] = []
        for item in tx.audit:
            seq += 1
            rec = audit.chain_record(item, seq=seq, time_ms=time_ms, prev_hash=prev)
            prev = rec.hash
            chained.append(rec)
        for chunk in _chunks(chained):
            tx.conn.execute(_INSERT_AUDIT, [_audit_values(r) for r in chunk])
        tx.audit.clear()
        tx.audited.extend(chained)

    def _emit(self, tx: _Tx, changes: Sequence[tuple[EventKind, str]]) -> None:
        """Write one event row per change, in the caller's transaction."""
        if not changes:
            return
        if self._is_pg:
            tx.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_EVENT_LOCK})
        rows = tx.conn.execute(
            insert(events).returning(events.c.id, events.c.kind, events.c.subject),
            [
                {"kind": kind.value, "subject": subject, "created_at": tx.now}
                for kind, subject in changes
            ],
        ).all()
        written = [Event(row[0], EventKind(row[1]), row[2], tx.now) for row in rows]
        tx.events.extend(sorted(written, key=_event_id))

    @staticmethod
    def _prepare_new_entry(
        entry: RegistrationEntry, index: int | None, now: int
    ) -> tuple[RegistrationEntry, str]:
        """Validate a new entry, stamp its id, revision and creation time; hash its identity."""
        try:
            _validate_entry(entry)
        except InvalidRequest as exc:
            raise InvalidRequest(str(exc), index=index) from exc
        entry = replace(entry, id=entry.id or str(uuid.uuid4()), revision_number=0, created_at=now)
        return entry, _unique_key(entry)

    def _raise_entry_conflict(
        self, conn: Connection, prepared: Sequence[tuple[RegistrationEntry, str]], *, batch: bool
    ) -> None:
        """Raise :class:`AlreadyExists` (with ``index`` in a batch) for the first duplicate."""

        def index(i: int) -> int | None:
            return i if batch else None

        taken_ids: set[str] = set()
        taken_keys: set[str] = set()
        for chunk in _chunks(prepared, _CHUNK // 2):
            ids = [e.id for e, _ in chunk]
            keys = [k for _, k in chunk]
            for entry_id, key in conn.execute(
                select(entries.c.entry_id, entries.c.unique_key).where(
                    or_(entries.c.entry_id.in_(ids), entries.c.unique_key.in_(keys))
                )
            ):
                taken_ids.add(entry_id)
                taken_keys.add(key)
        if not taken_ids:
            return
        for i, (entry, key) in enumerate(prepared):
            if entry.id in taken_ids:
                raise AlreadyExists(
                    f"registration entry {entry.id!r} already exists", index=index(i)
                )
            if key in taken_keys:
                raise AlreadyExists(
                    f"registration entry for {entry.spiffe_id!r} under {entry.parent_id!r} "
                    "with the same selectors already exists",
                    index=index(i),
                )

    def _insert_entries(
        self, conn: Connection, prepared: Sequence[tuple[RegistrationEntry, str]]
    ) -> None:
        conn.execute(insert(entries), [_entry_values(e, k, include_id=True) for e, k in prepared])
        self._insert_entry_children(conn, [e for e, _ in prepared])

    @staticmethod
    def _insert_entry_children(conn: Connection, stored: Sequence[RegistrationEntry]) -> None:
        sel_rows = [
            {"entry_id": e.id, "type": s.type, "value": s.value}
            for e in stored
            for s in e.selectors
        ]
        dns_rows = [
            {"entry_id": e.id, "position": pos, "dns_name": name}
            for e in stored
            for pos, name in enumerate(e.dns_names)
        ]
        fed_rows = [
            {"entry_id": e.id, "trust_domain": td} for e in stored for td in e.federates_with
        ]
        for table, rows in (
            (entry_selectors, sel_rows),
            (entry_dns_names, dns_rows),
            (entry_federates_with, fed_rows),
        ):
            if rows:
                conn.execute(insert(table), rows)

    @staticmethod
    def _entry_filters(request: ListRegistrationEntriesRequest) -> list[ColumnElement[bool]]:
        conds: list[ColumnElement[bool]] = []
        if request.by_spiffe_id is not None:
            conds.append(entries.c.spiffe_id == request.by_spiffe_id)
        if request.by_parent_id is not None:
            conds.append(entries.c.parent_id == request.by_parent_id)
        if request.by_hint is not None:
            conds.append(entries.c.hint == request.by_hint)
        if request.by_downstream is not None:
            conds.append(entries.c.downstream == request.by_downstream)
        if request.by_owner is not None:
            conds.append(entries.c.owner == request.by_owner)
        by = request.by_selectors
        if by is None:
            return conds
        if not by.selectors:
            raise InvalidRequest("selector filter needs at least one selector")
        if by.match is MatchBehavior.EXACT:
            conds.append(entries.c.selectors_key == _selectors_key(by.selectors))
            return conds
        any_given = or_(
            *(
                and_(entry_selectors.c.type == s.type, entry_selectors.c.value == s.value)
                for s in by.selectors
            )
        )
        if by.match is MatchBehavior.ANY:
            conds.append(
                entries.c.entry_id.in_(select(entry_selectors.c.entry_id).where(any_given))
            )
        elif by.match is MatchBehavior.SUPERSET:
            conds.append(
                entries.c.entry_id.in_(
                    select(entry_selectors.c.entry_id)
                    .where(any_given)
                    .group_by(entry_selectors.c.entry_id)
                    .having(func.count() == len(by.selectors))
                )
            )
        else:  # SUBSET: every selector of the entry is among the given ones
            inner = entries.alias("subset_entries")
            conds.append(
                entries.c.entry_id.in_(
                    select(entry_selectors.c.entry_id)
                    .join(inner, inner.c.entry_id == entry_selectors.c.entry_id)
                    .where(any_given, inner.c.selector_count <= len(by.selectors))
                    .group_by(entry_selectors.c.entry_id, inner.c.selector_count)
                    .having(func.count() == inner.c.selector_count)
                )
            )
        return conds

    @staticmethod
    def _load_entries(
        conn: Connection, conds: list[ColumnElement[bool]], *, limit: int | None = None
    ) -> list[RegistrationEntry]:
        """Load matching entries, ordered by id: one query per table (per page of the full
        listing, see :meth:`_load_all_entries`), joined in Python.

        Child rows come back ordered by (entry id, sort key), which is already the order
        the record keeps them in, so records are built without re-normalising.
        """
        c = entries.c
        stmt = select(
            c.entry_id,
            c.spiffe_id,
            c.parent_id,
            c.x509_svid_ttl,
            c.jwt_svid_ttl,
            c.admin,
            c.downstream,
            c.node_alias,
            c.hint,
            c.expires_at,
            c.revision_number,
            c.created_at,
            c.owner,
            c.purpose,
        ).order_by(c.entry_id)
        ids = select(c.entry_id).order_by(c.entry_id)
        if conds:
            stmt = stmt.where(*conds)
            ids = ids.where(*conds)
        if limit is not None:
            stmt = stmt.limit(limit)
            ids = ids.limit(limit)
        if not conds and limit is None:
            return SqlDataStore._load_all_entries(conn, stmt)
        rows = _fetch_rows(conn, stmt)
        if not rows:
            return []
        with _gc_paused() if len(rows) >= _BULK_ROWS else nullcontext():
            return SqlDataStore._assemble_entries(conn, rows, ids, restrict=True)

    @staticmethod
    def _load_all_entries(conn: Connection, stmt: Select[Any]) -> list[RegistrationEntry]:
        """Every entry, read in pages of ``_LOAD_PAGE`` by entry id.

        Only the records are kept for the whole table: the driver's row tuples and the
        child rows of one page are freed before the next is read, so they reuse the same
        memory instead of raising the peak (and the RSS that stays after it) by ~400 bytes
        an entry. Each page's child rows are selected by the page's id range.
        """
        c = entries.c
        built: list[RegistrationEntry] = []
        last = ""  # no entry id is empty
        with _gc_paused():
            while True:
                rows = _fetch_rows(conn, stmt.where(c.entry_id > last).limit(_LOAD_PAGE))
                if not rows:
                    return built
                built.extend(
                    SqlDataStore._assemble_entries(
                        conn, rows, None, restrict=True, id_range=(last, rows[-1][0])
                    )
                )
                if len(rows) < _LOAD_PAGE:
                    return built
                last = rows[-1][0]

    @staticmethod
    def _assemble_entries(
        conn: Connection,
        rows: list[tuple[Any, ...]],
        ids: Select[Any] | None,
        *,
        restrict: bool,
        id_range: tuple[str, str] | None = None,
    ) -> list[RegistrationEntry]:
        """Fetch the child rows of the entries in ``rows`` and build the records.

        The children are those of the entries ``ids`` selects, or with ``id_range``
        ``(after, last)`` those whose entry id is in that range.
        """

        def children(*cols: Any) -> list[tuple[Any, ...]]:
            query = select(*cols).order_by(*cols)
            if id_range is not None:
                query = query.where(cols[0] > id_range[0], cols[0] <= id_range[1])
            elif restrict and ids is not None:
                query = query.where(cols[0].in_(ids.scalar_subquery()))
            return _fetch_rows(conn, query)

        sc, dc, fc = entry_selectors.c, entry_dns_names.c, entry_federates_with.c
        selectors = _group_selectors(children(sc.entry_id, sc.type, sc.value))
        dns = _group_strings(children(dc.entry_id, dc.position, dc.dns_name))
        feds = _group_strings(children(fc.entry_id, fc.trust_domain))
        new, put, none = object.__new__, object.__setattr__, ()
        # Entries share few parents (an agent has hundreds or thousands of entries): one
        # string object per parent ID instead of one per row (~90 bytes an entry at 1M).
        parents: dict[str, str] = {}
        shared = parents.setdefault
        built: list[RegistrationEntry] = []
        for r in rows:
            # Unrolled _restore(): this loop runs a million times for a full listing.
            e = new(RegistrationEntry)
            put(e, "id", r[0])
            put(e, "spiffe_id", r[1])
            put(e, "parent_id", shared(r[2], r[2]))
            put(e, "selectors", selectors.get(r[0], none))
            put(e, "x509_svid_ttl", r[3])
            put(e, "jwt_svid_ttl", r[4])
            put(e, "dns_names", dns.get(r[0], none))
            put(e, "admin", bool(r[5]))
            put(e, "downstream", bool(r[6]))
            put(e, "node_alias", bool(r[7]))
            put(e, "hint", r[8])
            put(e, "expires_at", r[9])
            put(e, "federates_with", feds.get(r[0], none))
            put(e, "revision_number", r[10])
            put(e, "created_at", r[11])
            put(e, "owner", r[12])
            put(e, "purpose", r[13])
            built.append(e)
        return built

    @staticmethod
    def _insert_node_selectors(
        conn: Connection, spiffe_id: str, selectors: Iterable[Selector]
    ) -> None:
        rows = [{"spiffe_id": spiffe_id, "type": s.type, "value": s.value} for s in selectors]
        if rows:
            conn.execute(insert(node_selectors), rows)

    @staticmethod
    def _load_nodes(
        conn: Connection, conds: list[ColumnElement[bool]], *, limit: int | None = None
    ) -> list[AttestedNode]:
        c = nodes.c
        stmt = select(
            c.spiffe_id,
            c.attestation_type,
            c.cert_serial,
            c.cert_not_after,
            c.new_cert_serial,
            c.new_cert_not_after,
            c.banned,
            c.created_at,
            c.updated_at,
        ).order_by(c.spiffe_id)
        ids = select(c.spiffe_id).order_by(c.spiffe_id)
        if conds:
            stmt = stmt.where(*conds)
            ids = ids.where(*conds)
        if limit is not None:
            stmt = stmt.limit(limit)
            ids = ids.limit(limit)
        rows = _fetch_rows(conn, stmt)
        if not rows:
            return []
        s = node_selectors.c
        sel_query = select(s.spiffe_id, s.type, s.value).order_by(s.spiffe_id, s.type, s.value)
        if conds or limit is not None:
            sel_query = sel_query.where(s.spiffe_id.in_(ids.scalar_subquery()))
        selectors = _group_selectors(_fetch_rows(conn, sel_query))
        return [
            _restore(
                AttestedNode,
                spiffe_id=r[0],
                attestation_type=r[1],
                selectors=selectors.get(r[0], ()),
                cert_serial=r[2],
                cert_not_after=r[3],
                new_cert_serial=r[4],
                new_cert_not_after=r[5],
                banned=bool(r[6]),
                created_at=r[7],
                updated_at=r[8],
            )
            for r in rows
        ]

    @staticmethod
    def _load_authorities(conn: Connection, cond: ColumnElement[bool] | None) -> list[Authority]:
        a = authorities.c
        stmt = select(
            a.authority_id,
            a.kind,
            a.status,
            a.tainted,
            a.not_after,
            a.public_data,
            a.created_at,
            a.owner,
        ).order_by(a.created_at, a.seq)
        if cond is not None:
            stmt = stmt.where(cond)
        return [
            Authority(
                authority_id=r[0],
                kind=r[1],
                status=r[2],
                tainted=bool(r[3]),
                not_after=r[4],
                public_data=bytes(r[5]),
                created_at=r[6],
                owner=r[7],
            )
            for r in conn.execute(stmt)
        ]


def _event_id(ev: Event) -> int:
    return ev.id


def _fetch_rows(conn: Connection, stmt: Select[Any]) -> list[tuple[Any, ...]]:
    """Run a SELECT on the connection's DBAPI cursor and return plain tuples.

    The bulk loads (100k entries, 200k selectors) spend most of their time in per-row
    result processing; the driver's own tuples skip it. Only used for columns that need
    no type processing other than ``bool()`` on the caller's side.
    """
    compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    args: Any = (
        tuple(params[name] for name in compiled.positiontup or ())
        if compiled.positional
        else params
    )
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(str(compiled), args)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _group_selectors(rows: list[tuple[Any, ...]]) -> dict[str, tuple[Selector, ...]]:
    """Group ``(owner, type, value)`` rows sorted by owner into per-owner selector tuples.

    Rows come from the database, where only validated selectors are written, so the
    selectors are rebuilt without re-validating; equal selectors share one object.
    """
    new, put = object.__new__, object.__setattr__
    by_type: dict[str, dict[str, Selector]] = {}
    grouped: dict[str, tuple[Selector, ...]] = {}
    owner = ""  # no stored owner (entry id, SPIFFE ID) is empty
    run: list[Selector] = []
    for row_owner, kind, value in rows:
        if row_owner != owner:
            if run:
                grouped[owner] = tuple(run)
            owner, run = row_owner, []
        values = by_type.get(kind)
        if values is None:
            values = by_type[kind] = {}
        sel = values.get(value)
        if sel is None:
            sel = values[value] = new(Selector)
            put(sel, "type", kind)
            put(sel, "value", value)
        run.append(sel)
    if run:
        grouped[owner] = tuple(run)
    return grouped


def _group_strings(rows: list[tuple[Any, ...]]) -> dict[str, tuple[str, ...]]:
    """Group ``(owner, ..., text)`` rows sorted by owner into per-owner tuples of text."""
    grouped: dict[str, tuple[str, ...]] = {}
    owner = ""  # no stored owner (entry id, SPIFFE ID) is empty
    run: list[str] = []
    for row in rows:
        if row[0] != owner:
            if run:
                grouped[owner] = tuple(run)
            owner, run = row[0], []
        run.append(row[-1])
    if run:
        grouped[owner] = tuple(run)
    return grouped


_T = TypeVar("_T")

_BULK_ROWS = 5000  # loads at least this big pause the cyclic garbage collector
_LOAD_PAGE = 50_000  # entries a page when every entry is read (the cache load)
_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_resume = False


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a bulk load builds its records.

    Listing 100k entries allocates about a million container objects, and every
    generation-2 collection during the build walks all of them: measured, it triples
    the time. Reference counting still frees everything; the collector resumes (if it
    was on) when the last concurrent bulk load finishes.
    """
    global _gc_pausers, _gc_resume
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_resume:
                gc.enable()


def _restore(cls: type[_T], **fields: Any) -> _T:
    """Rebuild a frozen record from stored, already-normalised fields.

    Skips ``__init__``/``__post_init__`` (validation and sorting), which dominate the
    cost of loading 100k records; every field must be given.
    """
    record = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(record, name, value)
    return record


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    """Set the pragmas on every new connection and take over BEGIN from the driver."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The sqlite3 module's implicit transactions start too late (and DEFERRED);
        # with isolation_level=None it leaves BEGIN to the "begin" hook below.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("credo_autocommit", False):
            return  # one statement on its own (SqlDataStore._single_statement)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("credo_write", False) else "BEGIN")


def _require(value: str, what: str) -> None:
    if not value:
        raise InvalidRequest(f"{what} is empty")


def _validate_entry(entry: RegistrationEntry) -> None:
    _require(entry.spiffe_id, "registration entry SPIFFE ID")
    _require(entry.parent_id, "registration entry parent ID")
    if entry.x509_svid_ttl < 0 or entry.jwt_svid_ttl < 0:
        raise InvalidRequest("registration entry TTLs must be 0 (server default) or positive")
    if entry.expires_at < 0:
        raise InvalidRequest("registration entry expires_at must be 0 (never) or positive")


def _validate_policy(policy: DelegationPolicy) -> None:
    _require(policy.agent_id, "delegation policy agent ID")
    _require(policy.subject_issuer, "delegation policy subject issuer")
    if not policy.scopes:
        raise InvalidRequest("delegation policy needs at least one scope")
    if not policy.audiences:
        raise InvalidRequest("delegation policy needs at least one audience")
    if policy.max_ttl <= 0 or policy.max_depth <= 0:
        raise InvalidRequest("delegation policy max_ttl and max_depth must be positive")
    for budget in policy.budgets:
        if budget.limit < 0 or budget.period <= 0:
            raise InvalidRequest(f"budget {budget.scope!r}: limit >= 0 and period > 0 expected")


def _policy_values(policy: DelegationPolicy) -> dict[str, Any]:
    body = {
        "scopes": list(policy.scopes),
        "audiences": list(policy.audiences),
        "subject_claims": [list(pair) for pair in policy.subject_claims],
        "budgets": [
            {"scope": b.scope, "limit": b.limit, "period": b.period} for b in policy.budgets
        ],
    }
    return {
        "policy_id": policy.id,
        "agent_id": policy.agent_id,
        "subject_issuer": policy.subject_issuer,
        "body": json.dumps(body, sort_keys=True),
        "max_ttl": policy.max_ttl,
        "max_depth": policy.max_depth,
        "revision_number": policy.revision_number,
        "created_at": policy.created_at,
    }


def _load_policies(conn: Connection, cond: ColumnElement[bool] | None) -> list[DelegationPolicy]:
    c = delegation_policies.c
    stmt = select(
        c.policy_id,
        c.agent_id,
        c.subject_issuer,
        c.body,
        c.max_ttl,
        c.max_depth,
        c.revision_number,
        c.created_at,
    ).order_by(c.policy_id)
    if cond is not None:
        stmt = stmt.where(cond)
    out = []
    for row in conn.execute(stmt):
        body = json.loads(row[3])
        out.append(
            DelegationPolicy(
                id=row[0],
                agent_id=row[1],
                subject_issuer=row[2],
                scopes=tuple(body["scopes"]),
                audiences=tuple(body["audiences"]),
                subject_claims=tuple((k, v) for k, v in body["subject_claims"]),
                budgets=tuple(Budget(b["scope"], b["limit"], b["period"]) for b in body["budgets"]),
                max_ttl=int(row[4]),
                max_depth=int(row[5]),
                revision_number=int(row[6]),
                created_at=int(row[7]),
            )
        )
    return out


def _validate_authority(authority: Authority) -> None:
    _require(authority.authority_id, "authority id")
    if authority.kind not in _AUTHORITY_KINDS:
        raise InvalidRequest(f"authority kind must be 'x509' or 'jwt', not {authority.kind!r}")
    if authority.status not in _AUTHORITY_STATUSES:
        raise InvalidRequest(
            f"authority status must be 'prepared', 'active' or 'old', not {authority.status!r}"
        )


def _entry_values(entry: RegistrationEntry, key: str, *, include_id: bool) -> dict[str, Any]:
    values: dict[str, Any] = {
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "admin": entry.admin,
        "downstream": entry.downstream,
        "node_alias": entry.node_alias,
        "hint": entry.hint,
        "expires_at": entry.expires_at,
        "owner": entry.owner,
        "purpose": entry.purpose,
        "unique_key": key,
        "selectors_key": _selectors_key(entry.selectors),
        "selector_count": len(entry.selectors),
    }
    if include_id:
        values["entry_id"] = entry.id
        values["revision_number"] = entry.revision_number
        values["created_at"] = entry.created_at
    return values


def _node_values(node: AttestedNode) -> dict[str, Any]:
    return {
        "spiffe_id": node.spiffe_id,
        "attestation_type": node.attestation_type,
        "cert_serial": node.cert_serial,
        "cert_not_after": node.cert_not_after,
        "new_cert_serial": node.new_cert_serial,
        "new_cert_not_after": node.new_cert_not_after,
        "banned": node.banned,
        "created_at": node.created_at,
        "updated_at": node.updated_at,
    }


def _node_details(node: AttestedNode) -> dict[str, Any]:
    details: dict[str, Any] = {
        "attestation_type": node.attestation_type,
        "selectors": [str(s) for s in node.selectors],
        "serial": node.cert_serial,
        "not_after": node.cert_not_after,
    }
    if node.new_cert_serial:
        details["new_serial"] = node.new_cert_serial
        details["new_not_after"] = node.new_cert_not_after
    if node.banned:
        details["banned"] = True
    return details


def _federation_details(rel: FederationRelationship) -> dict[str, Any]:
    """What a federation record keeps: the endpoint (not the fetch state)."""
    return {
        "bundle_endpoint_url": rel.bundle_endpoint_url,
        "bundle_endpoint_profile": rel.bundle_endpoint_profile,
        "endpoint_spiffe_id": rel.endpoint_spiffe_id,
    }


def _policy_subject(policy: DelegationPolicy) -> str:
    """The agent a policy is for, as a record's subject (a ``/*`` pattern stays in details)."""
    return "" if policy.agent_id.endswith("/*") else policy.agent_id


def _policy_details(policy: DelegationPolicy) -> dict[str, Any]:
    return {
        "agent_id": policy.agent_id,
        "subject_issuer": policy.subject_issuer,
        "subject_claims": [list(c) for c in policy.subject_claims],
        "scopes": list(policy.scopes),
        "audiences": list(policy.audiences),
        "max_ttl": policy.max_ttl,
        "max_depth": policy.max_depth,
        "budgets": [[b.scope, b.limit, b.period] for b in policy.budgets],
        "revision_number": policy.revision_number,
    }


def _revocation_details(
    reason: str,
    revoked: Sequence[IssuedX509Svid],
    jwts: Sequence[IssuedJwtSvid],
    *,
    entry_id: str = "",
) -> dict[str, Any]:
    """What a revocation record keeps: why, and what it revoked (serials and ``jti``s)."""
    details: dict[str, Any] = {
        "reason": reason,
        "revoked_serials": [s.serial for s in revoked],
        "revoked_jtis": [j.jti for j in jwts],
    }
    if entry_id:
        details["entry_id"] = entry_id
    return details


def _authority_details(authority: Authority) -> dict[str, Any]:
    return {
        "kind": authority.kind,
        "status": authority.status,
        "tainted": authority.tainted,
        "not_after": authority.not_after,
        "owner": authority.owner,
    }


def _authority_change(before: Authority | None, after: Authority) -> str:
    """The audit action of an authority update: what changed from ``before``."""
    if before is None:
        return "authority.update"
    if after.tainted and not before.tainted:
        return "authority.taint"
    if after.status != before.status:
        return {"active": "authority.activate", "old": "authority.deactivate"}.get(
            after.status, "authority.update"
        )
    if after.owner != before.owner:
        return "authority.adopt"
    return "authority.update"


_AUDIT_COLUMNS = (
    audit_records.c.seq,
    audit_records.c.time_ms,
    audit_records.c.actor_kind,
    audit_records.c.actor,
    audit_records.c.action,
    audit_records.c.subject,
    audit_records.c.target,
    audit_records.c.owner,
    audit_records.c.outcome,
    audit_records.c.reason,
    audit_records.c.request_id,
    audit_records.c.details,
    audit_records.c.prev_hash,
    audit_records.c.hash,
)


def _token_values(token: DelegatedToken, now: int) -> dict[str, Any]:
    """The ``delegated_tokens`` row of a token (issued ``now`` unless it says when)."""
    return {
        "jti": token.jti,
        "client_id": token.client_id,
        "subject": token.subject,
        "actors": "".join(a + " " for a in token.actors),
        "expires_at": token.expires_at,
        "issued_at": token.issued_at or now,
        "revoked_at": token.revoked_at,
        "reason": token.reason,
    }


def _audit_values(rec: AuditRecord) -> dict[str, Any]:
    return {
        "seq": rec.seq,
        "time_ms": rec.time_ms,
        "actor_kind": rec.actor.kind,
        "actor": rec.actor.id,
        "action": rec.action,
        "subject": rec.subject,
        "target": rec.target,
        "owner": rec.owner,
        "outcome": rec.outcome,
        "reason": rec.reason,
        "request_id": rec.request_id,
        "details": rec.details,
        "prev_hash": rec.prev_hash,
        "hash": rec.hash,
    }


def _audit_record(row: Any) -> AuditRecord:
    return AuditRecord(
        seq=int(row[0]),
        time_ms=int(row[1]),
        actor=audit.Actor(row[2], row[3]),
        action=row[4],
        subject=row[5],
        target=row[6],
        owner=row[7],
        outcome=row[8],
        reason=row[9],
        request_id=row[10],
        details=row[11],
        prev_hash=row[12],
        hash=row[13],
    )


def _issued_values(svid: IssuedX509Svid) -> dict[str, Any]:
    return {
        "serial": svid.serial,
        "authority_id": svid.authority_id,
        "entry_id": svid.entry_id,
        "spiffe_id": svid.spiffe_id,
        "agent_id": svid.agent_id,
        "expires_at": svid.expires_at,
        "issued_at": svid.issued_at,
        "revoked_at": svid.revoked_at,
        "reason": svid.reason,
    }


def _authority_values(authority: Authority) -> dict[str, Any]:
    return {
        "authority_id": authority.authority_id,
        "kind": authority.kind,
        "status": authority.status,
        "tainted": authority.tainted,
        "not_after": authority.not_after,
        "public_data": authority.public_data,
        "created_at": authority.created_at,
        "owner": authority.owner,
    }


if TYPE_CHECKING:

    def _conforms(store: SqlDataStore) -> DataStore:
        """Let mypy check that SqlDataStore implements the DataStore Protocol."""
        return store
