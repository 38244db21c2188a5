"""The tables of issued credentials that can be revoked, described once.

Issued X.509-SVIDs, JWT-SVIDs and delegated access tokens are each a table whose columns
are the fields of a record (:mod:`server.datastore.models`), with ``expires_at``,
``issued_at``, ``revoked_at`` and ``reason``. An :class:`IssuedKind` says which table,
which record, which column names one credential, and which change events revoking some
emits; :meth:`IssuedKind.load` and :meth:`IssuedKind.revoke` are then the same for all.
Another revocable credential is one more :class:`IssuedKind` (a table of that shape).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Connection, Table, and_, select, update

from server.datastore.models import DelegatedToken, EventKind, IssuedJwtSvid, IssuedX509Svid
from server.datastore.schema import delegated_tokens, issued_jwt_svids, issued_x509_svids

__all__ = ["DELEGATED_TOKENS", "JWT_SVIDS", "X509_SVIDS", "IssuedKind"]

R = TypeVar("R", IssuedX509Svid, IssuedJwtSvid, DelegatedToken)

_INT_COLUMNS = frozenset({"expires_at", "issued_at", "revoked_at"})


@dataclass(frozen=True)
class IssuedKind(Generic[R]):
    """One table of issued, revocable credentials."""

    table: Table
    record: type[R]
    key: str
    """The column naming one credential (``serial``, ``jti``); rows are loaded in its order."""
    noun: str
    """What one credential is called in a :class:`NotFound` message."""
    events: Callable[[Sequence[R]], list[tuple[EventKind, str]]]
    """The change events revoking these credentials emits."""
    decode: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    """Column -> how its stored value becomes the record's (the time columns: ``int``)."""

    def _columns(self) -> list[str]:
        return [f.name for f in fields(self.record)]

    def load(self, conn: Connection, cond: ColumnElement[bool]) -> list[R]:
        """The matching credentials, in key order."""
        names = self._columns()
        c = self.table.c
        stmt = select(*(c[name] for name in names)).where(cond).order_by(c[self.key])
        return [
            self.record(
                **{name: self._decode(name, value) for name, value in zip(names, row, strict=True)}
            )
            for row in conn.execute(stmt)
        ]

    def revoke(self, conn: Connection, now: int, cond: ColumnElement[bool], reason: str) -> list[R]:
        """Mark the matching unrevoked credentials revoked at ``now``; return them as they
        are now. The caller emits :attr:`events` for them in the same transaction."""
        pending = and_(cond, self.table.c.revoked_at == 0)
        targets = self.load(conn, pending)
        if not targets:
            return []
        conn.execute(update(self.table).where(pending).values(revoked_at=now, reason=reason))
        return [replace(t, revoked_at=now, reason=reason) for t in targets]

    def _decode(self, name: str, value: Any) -> Any:
        convert = self.decode.get(name)
        if convert is not None:
            return convert(value)
        return int(value) if name in _INT_COLUMNS else value


def _per_authority(svids: Sequence[IssuedX509Svid]) -> list[tuple[EventKind, str]]:
    """One event per issuing authority: each must re-sign its CRL."""
    return [
        (EventKind.X509_SVIDS_REVOKED, authority_id)
        for authority_id in sorted({s.authority_id for s in svids})
    ]


def _jwts_revoked(_: Sequence[Any]) -> list[tuple[EventKind, str]]:
    """One event: the JWT revocation list changed."""
    return [(EventKind.JWT_SVIDS_REVOKED, "")]


X509_SVIDS: IssuedKind[IssuedX509Svid] = IssuedKind(
    issued_x509_svids, IssuedX509Svid, "serial", "X.509-SVID", _per_authority
)
JWT_SVIDS: IssuedKind[IssuedJwtSvid] = IssuedKind(
    issued_jwt_svids, IssuedJwtSvid, "jti", "JWT-SVID", _jwts_revoked
)
DELEGATED_TOKENS: IssuedKind[DelegatedToken] = IssuedKind(
    delegated_tokens,
    DelegatedToken,
    "jti",
    "delegated token",
    _jwts_revoked,
    decode={"actors": lambda stored: tuple(str(stored).split())},
)
