"""Records the datastore keeps, and the request/response shapes of its list calls.

Records are frozen dataclasses. Collections are tuples; a record normalises what it is
given so that two records describing the same thing compare equal: entry and node
selectors are de-duplicated and sorted, ``federates_with`` is de-duplicated and sorted,
``dns_names`` is de-duplicated keeping its order (the first name becomes the
certificate's common name). Times are integer unix seconds; ``0`` means "unset".
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from credo.selector import Selector

if TYPE_CHECKING:
    from server.audit import PendingRecord

__all__ = [
    "AttestedNode",
    "Authority",
    "AuthorityKind",
    "AuthorityStatus",
    "Budget",
    "BudgetUse",
    "BySelectors",
    "Crl",
    "DelegatedToken",
    "DelegationPolicy",
    "Event",
    "EventKind",
    "FederationRelationship",
    "GrantOutcome",
    "IssuedJwtSvid",
    "IssuedX509Svid",
    "JoinToken",
    "ListAttestedNodesRequest",
    "ListAttestedNodesResponse",
    "ListRegistrationEntriesRequest",
    "ListRegistrationEntriesResponse",
    "MatchBehavior",
    "RegistrationEntry",
    "Revocation",
    "TokenGrant",
]

AuthorityKind = Literal["x509", "jwt", "wit"]
AuthorityStatus = Literal["prepared", "active", "old"]


def _sorted_selectors(selectors: Iterable[Selector]) -> tuple[Selector, ...]:
    return tuple(sorted(set(selectors)))


def _unique_in_order(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True, slots=True)
class RegistrationEntry:
    """Who may get which SPIFFE ID: a workload matching ``selectors`` under ``parent_id``.

    ``id`` is assigned (uuid4) on create when empty. ``revision_number`` and
    ``created_at`` are owned by the datastore: it sets them on create and update and
    ignores what the caller passes. ``x509_svid_ttl``/``jwt_svid_ttl`` of 0 mean the
    server default; ``expires_at`` of 0 means the entry never expires. ``owner`` is the
    accountable person or team (``alice@example.com``), ``purpose`` free text; ``""`` is
    unset.
    """

    spiffe_id: str
    parent_id: str
    selectors: tuple[Selector, ...] = ()
    id: str = ""
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    admin: bool = False
    downstream: bool = False
    node_alias: bool = False
    hint: str = ""
    expires_at: int = 0
    federates_with: tuple[str, ...] = ()
    revision_number: int = 0
    created_at: int = 0
    owner: str = ""
    purpose: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "selectors", _sorted_selectors(self.selectors))
        object.__setattr__(self, "dns_names", _unique_in_order(self.dns_names))
        object.__setattr__(self, "federates_with", tuple(sorted(set(self.federates_with))))


@dataclass(frozen=True, slots=True)
class AttestedNode:
    """An agent that passed node attestation, and the serials of its current SVIDs.

    ``new_cert_serial`` is the serial of an SVID issued but not yet seen in use
    (``""`` if none); ``banned`` nodes are refused on every call and never pruned.
    ``created_at``/``updated_at`` are set by the datastore.
    """

    spiffe_id: str
    attestation_type: str
    selectors: tuple[Selector, ...] = ()
    cert_serial: str = ""
    cert_not_after: int = 0
    new_cert_serial: str = ""
    new_cert_not_after: int = 0
    banned: bool = False
    created_at: int = 0
    updated_at: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "selectors", _sorted_selectors(self.selectors))


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A single-use secret an agent presents to attest.

    ``spiffe_id``, when not empty, is the node-alias SPIFFE ID to create for the agent
    that uses the token.
    """

    token: str
    expires_at: int
    spiffe_id: str = ""


@dataclass(frozen=True, slots=True)
class FederationRelationship:
    """A federated trust domain and where its bundle is fetched (SPIFFE Federation).

    ``bundle_endpoint_profile`` is ``https_spiffe`` (the endpoint presents an X509-SVID for
    ``endpoint_spiffe_id``, verified with the trust domain's last bundle) or ``https_web``
    (a web PKI certificate for the URL's host). ``last_refresh_at`` / ``last_error``
    record the last fetch (0 / "" before the first); ``created_at`` of 0 becomes now.
    """

    trust_domain: str
    bundle_endpoint_url: str
    bundle_endpoint_profile: str
    endpoint_spiffe_id: str = ""
    created_at: int = 0
    last_refresh_at: int = 0
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class Authority:
    """One signing key in the CA's rotation journal (the private key stays on disk).

    ``public_data`` is the CA certificate DER (``kind == "x509"``) or the public key
    DER (``kind == "jwt"`` or ``"wit"``). ``created_at`` of 0 is replaced by the datastore's clock.
    ``owner`` is the server id (``<data-dir>/server_id``) of the server that holds the
    private key; ``""`` marks a row written before schema version 2 (not yet adopted).
    """

    authority_id: str
    kind: AuthorityKind
    status: AuthorityStatus
    not_after: int
    public_data: bytes
    tainted: bool = False
    created_at: int = 0
    owner: str = ""


@dataclass(frozen=True, slots=True)
class IssuedX509Svid:
    """An X.509-SVID the server signed, kept until it expires so that it can be revoked.

    ``serial`` is the certificate's serial number in lowercase hex (as logged);
    ``authority_id`` the issuing X.509 authority (its SubjectKeyIdentifier in hex);
    ``entry_id`` the registration entry it was issued for (``""``: an agent SVID or an
    admin mint); ``agent_id`` the agent that obtained it (an agent SVID's own agent;
    ``""`` for an admin mint). ``revoked_at`` of 0 means not revoked.
    """

    serial: str
    authority_id: str
    spiffe_id: str
    expires_at: int
    entry_id: str = ""
    agent_id: str = ""
    issued_at: int = 0
    revoked_at: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class IssuedJwtSvid:
    """A JWT-SVID the server signed, by its ``jti``, kept until it expires (revocable)."""

    jti: str
    spiffe_id: str
    expires_at: int
    entry_id: str = ""
    agent_id: str = ""
    issued_at: int = 0
    revoked_at: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DelegatedToken:
    """An access token the token endpoint issued (never the token itself), until it expires.

    ``client_id`` is the agent it was issued to, ``subject`` the person, ``actors`` the
    whole actor chain, newest (the client) first."""

    jti: str
    client_id: str
    subject: str
    actors: tuple[str, ...]
    expires_at: int
    issued_at: int = 0
    revoked_at: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Revocation:
    """What one revocation call changed: the SVIDs it revoked now (already revoked ones
    are not repeated), and for an entry whether the entry itself was newly revoked."""

    revoked: tuple[IssuedX509Svid, ...] = ()
    entry_newly_revoked: bool = False
    revoked_jwts: tuple[IssuedJwtSvid, ...] = ()
    revoked_tokens: tuple[DelegatedToken, ...] = ()


@dataclass(frozen=True, slots=True)
class Crl:
    """The current certificate revocation list (DER) of one X.509 authority."""

    authority_id: str
    number: int
    data: bytes
    next_update: int
    updated_at: int = 0


class EventKind(enum.StrEnum):
    """What changed; ``Event.subject`` names the entry id, node SPIFFE ID or trust domain.

    ``x509_svids_revoked`` names the issuing authority (its CRL must be re-signed);
    ``crl_updated`` the authority whose CRL was stored; ``entry_revoked`` the entry;
    ``jwt_svids_revoked`` has the subject ``""`` (the revocation list changed).
    """

    ENTRY_CREATED = "entry_created"
    ENTRY_UPDATED = "entry_updated"
    ENTRY_DELETED = "entry_deleted"
    NODE_CREATED = "node_created"
    NODE_UPDATED = "node_updated"
    NODE_DELETED = "node_deleted"
    BUNDLE_UPDATED = "bundle_updated"
    BUNDLE_DELETED = "bundle_deleted"
    ENTRY_REVOKED = "entry_revoked"
    X509_SVIDS_REVOKED = "x509_svids_revoked"
    CRL_UPDATED = "crl_updated"
    JWT_SVIDS_REVOKED = "jwt_svids_revoked"


@dataclass(frozen=True, slots=True)
class Event:
    """One change, written in the same transaction as the change itself.

    ``id`` grows monotonically, and events become visible in ``id`` order.
    """

    id: int
    kind: EventKind
    subject: str
    created_at: int


class MatchBehavior(enum.Enum):
    """How ``BySelectors`` compares an entry's selectors with the given ones (as SPIRE)."""

    EXACT = "exact"
    """The entry's selectors equal the given set."""
    SUBSET = "subset"
    """The entry's selectors are a subset of the given set (workload/agent matching)."""
    SUPERSET = "superset"
    """The entry's selectors include every given selector."""
    ANY = "any"
    """The entry shares at least one selector with the given set."""


@dataclass(frozen=True, slots=True)
class BySelectors:
    """Selector filter for ``list_registration_entries``; ``selectors`` must not be empty."""

    selectors: tuple[Selector, ...]
    match: MatchBehavior = MatchBehavior.EXACT

    def __post_init__(self) -> None:
        object.__setattr__(self, "selectors", _sorted_selectors(self.selectors))


@dataclass(frozen=True, slots=True)
class ListRegistrationEntriesRequest:
    """Filters (all given ones must hold) and pagination for ``list_registration_entries``.

    ``page_size`` of 0 returns every match; otherwise pass the previous response's
    ``next_page_token`` as ``page_token`` until it comes back empty.
    """

    by_spiffe_id: str | None = None
    by_parent_id: str | None = None
    by_selectors: BySelectors | None = None
    by_hint: str | None = None
    by_downstream: bool | None = None
    by_owner: str | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True, slots=True)
class ListRegistrationEntriesResponse:
    """One page of entries ordered by id; ``next_page_token`` is ``""`` on the last page."""

    entries: list[RegistrationEntry] = field(default_factory=list)
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class ListAttestedNodesRequest:
    """Filters and pagination for ``list_attested_nodes``.

    ``by_expires_before`` keeps nodes whose ``cert_not_after`` is before that time.
    """

    by_attestation_type: str | None = None
    by_banned: bool | None = None
    by_expires_before: int | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True, slots=True)
class ListAttestedNodesResponse:
    """One page of nodes ordered by SPIFFE ID; ``next_page_token`` is ``""`` on the last page."""

    nodes: list[AttestedNode] = field(default_factory=list)
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class ListAuditRecordsRequest:
    """Filters for ``list_audit_records``; every given filter must match.

    ``by_spiffe_id`` matches a record whose subject or actor is that ID;
    ``by_action`` matches the action exactly or, ending in ``.``, as a prefix
    (``entry.``); times are unix milliseconds, ``since`` inclusive, ``until`` exclusive.
    Records come in ``seq`` order after ``after_seq``, at most ``limit`` (0: all).
    """

    by_spiffe_id: str | None = None
    by_owner: str | None = None
    by_action: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    after_seq: int = 0
    limit: int = 0


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``limit`` tokens granting ``scope`` (``*``: any token) per ``period`` seconds.

    Counted per policy and agent identity, in fixed windows aligned to the unix epoch.
    """

    scope: str
    limit: int
    period: int


@dataclass(frozen=True, slots=True)
class DelegationPolicy:
    """Which agents may act for which people, with which scopes and audiences, how long.

    ``agent_id`` is a SPIFFE ID, or a path prefix ending in ``/*`` (every ID below it).
    ``subject_issuer`` names a ``[server.delegation.issuers.<name>]`` table;
    ``subject_claims`` are ``(claim, value)`` pairs the person's token must all carry (a
    list claim carries a value it contains). ``max_ttl`` is seconds; ``max_depth`` the
    longest actor chain. ``id``, ``revision_number`` and ``created_at`` are owned by the
    datastore, as for entries.
    """

    agent_id: str
    subject_issuer: str
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    subject_claims: tuple[tuple[str, str], ...] = ()
    max_ttl: int = 300
    max_depth: int = 1
    budgets: tuple[Budget, ...] = ()
    id: str = ""
    revision_number: int = 0
    created_at: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scopes", tuple(sorted(set(self.scopes))))
        object.__setattr__(self, "audiences", tuple(sorted(set(self.audiences))))
        object.__setattr__(self, "subject_claims", tuple(sorted(set(self.subject_claims))))
        object.__setattr__(
            self, "budgets", tuple(sorted(set(self.budgets), key=lambda b: (b.scope, b.period)))
        )


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """One budget's counters in its current window, for one agent identity."""

    policy_id: str
    agent_id: str
    scope: str
    window_start: int
    used: int
    refused: int


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A granted token exchange to record: the token (never the token itself), one unit of
    each of ``budgets`` of policy ``policy_id`` in their windows at ``now``, and the grant's
    audit record; all of them, or (refused) none but the exhausted budget's refusal counter.
    """

    token: DelegatedToken
    audit: PendingRecord
    policy_id: str = ""
    budgets: tuple[Budget, ...] = ()
    now: int = 0
    client_credential: tuple[str, str] | None = None
    """``(kind, id)`` of the credential the client authenticated with (``"serial"`` of an
    X509-SVID, ``"jti"`` of a JWT-SVID): refused when it is revoked (or its entry is)."""


@dataclass(frozen=True, slots=True)
class GrantOutcome:
    """What recording a :class:`TokenGrant` did: ``recorded``, or refused because the
    ``exhausted`` budget had no unit left, because the client's credential is revoked
    (``revoked_credential``), or (neither) because the client has no unrevoked
    registration entry any more."""

    recorded: bool
    exhausted: Budget | None = None
    revoked_credential: bool = False
