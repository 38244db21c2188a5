"""RFC 8693 token exchange: from the form fields to the response, or an RFC 6749 error.

One request, in this order (each step raises its :mod:`server.delegation.errors` code):

1. the form: ``grant_type`` is token exchange; every field given at most once;
2. the client: the calling agent's SPIFFE ID, from its X509-SVID (mutual TLS, verified
   against the bundle) or a JWT-SVID ``client_assertion`` whose audience is the token
   endpoint (``urn:ietf:params:oauth:client-assertion-type:jwt-spiffe``); an
   ``actor_token``, when sent, is a JWT-SVID naming the same agent;
3. the subject: a person's token from a trusted subject issuer, or an access token Credo
   issued earlier (a chain link), verified with Credo's own JWT keys;
4. the policy: one of the agent's delegation policies whose subject issuer and subject
   claims fit the person, whose audiences include the requested one, and whose
   ``max_depth`` admits the chain; ``may_act`` of the subject token, when present, must
   name the agent;
5. narrowing: granted scope = the requested scope (or, when none is asked for, everything
   allowed), which must lie within the person's scope (``scope``/``scp`` of the subject
   token, else the policy's), the policy's, and the previous link's; the lifetime is the
   least of the policy's ``max_ttl``, the subject token's and the previous link's
   remaining life;
6. the token: an RFC 9068 JWT (``typ: at+jwt``) signed with the server's active JWT key;
7. the record, in one transaction: one unit of every policy budget for a granted scope
   (or ``*``), all or none; the token's record (so that it can be revoked; refused when
   the client's entries were revoked meanwhile, or the credential it authenticated with:
   step 2's revocation check is made here, in the same transaction, or before answering
   a refusal); the grant's audit record. Concurrent exchanges share that transaction
   (:class:`~server.delegation.groupcommit.GroupCommit`). Only a recorded token is handed
   out.

A refused exchange writes nothing but its audit record and the budget's refusal counter
(and a log line).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Generic, TypeVar

import jwt
from cryptography import x509

from credo._reserved import is_reserved_path
from credo.bundle import Bundle, BundleSet
from credo.errors import JwtSvidError, JwtSvidExpired, X509SvidError
from credo.jwtsvid import JwtSvid
from credo.keys import jwt_algorithm_for
from credo.spiffe_id import SpiffeId, TrustDomain
from credo.x509svid import verify_x509_svid
from server import audit
from server.ca.ca import JwtKey
from server.datastore.models import (
    Budget,
    DelegatedToken,
    DelegationPolicy,
    GrantOutcome,
    TokenGrant,
)
from server.datastore.protocol import DataStore
from server.delegation.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from server.delegation.groupcommit import GroupCommit
from server.delegation.policy import agent_patterns_for, claims_match
from server.delegation.subjects import (
    SubjectIssuers,
    VerifiedSubject,
    check_times,
    unverified_claims,
)

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "GRANT_TYPE",
    "ID_TOKEN_TYPE",
    "JWT_SPIFFE_ASSERTION",
    "JWT_TOKEN_TYPE",
    "TOKEN_PATH",
    "ExchangeResult",
    "Recent",
    "TokenExchange",
    "actor_chain",
]

log = logging.getLogger(__name__)
_K = TypeVar("_K")
_V = TypeVar("_V")

GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_SPIFFE_ASSERTION: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:id_token"
SUBJECT_TOKEN_TYPES: Final = (ID_TOKEN_TYPE, JWT_TOKEN_TYPE, ACCESS_TOKEN_TYPE)
TOKEN_PATH: Final = "/oauth2/token"
AT_JWT: Final = "at+jwt"
SUBJECT_ISSUER_CLAIM: Final = "credo_subject_issuer"
"""Private claim: the ``iss`` of the person's own token, so later chain links match policies."""

_FIELDS: Final = frozenset(
    {
        "grant_type",
        "client_id",
        "client_assertion",
        "client_assertion_type",
        "subject_token",
        "subject_token_type",
        "actor_token",
        "actor_token_type",
        "requested_token_type",
        "audience",
        "resource",
        "scope",
    }
)
_MAX_FIELD = 16 * 1024
_LEEWAY = 30


class Recent(Generic[_K, _V]):
    """``fn(key)`` remembered for ``seconds`` (a bundle, an entry's owner): fewer queries per
    exchange, at the price of seeing a change up to ``seconds`` late."""

    def __init__(self, fn: Callable[[_K], _V], seconds: float) -> None:
        self._fn = fn
        self._seconds = seconds
        self._lock = threading.Lock()
        self._values: dict[_K, tuple[float, _V]] = {}

    def __call__(self, key: _K) -> _V:
        now = time.monotonic()
        with self._lock:
            hit = self._values.get(key)
        if hit is not None and now - hit[0] < self._seconds:
            return hit[1]
        value = self._fn(key)
        with self._lock:
            if len(self._values) > 10_000:
                self._values.clear()
            self._values[key] = (now, value)
        return value


class _RevokedClient(InvalidClient):
    """The client authenticated with a revoked credential (or one of a revoked entry)."""


def _now_s(clock: Callable[[], float]) -> int:
    return int(clock())


def actor_chain(act: Any) -> list[str]:
    """The actors of an ``act`` claim, newest first (``act.sub``, ``act.act.sub``, ...)."""
    out: list[str] = []
    while isinstance(act, Mapping) and len(out) < 64:
        sub = act.get("sub")
        if not isinstance(sub, str):
            break
        out.append(sub)
        act = act.get("act")
    return out


def _nest(actors: Sequence[str]) -> dict[str, Any]:
    """``["B", "A"]`` -> ``{"sub": "B", "act": {"sub": "A"}}``."""
    act: dict[str, Any] | None = None
    for sub in reversed(actors):
        act = {"sub": sub} if act is None else {"sub": sub, "act": act}
    assert act is not None
    return act


def _scopes_of(claims: Mapping[str, Any]) -> frozenset[str] | None:
    """The scopes a token carries (``scope`` string or ``scp`` list/string), or None."""
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            return frozenset(value.split())
        if isinstance(value, list):
            return frozenset(v for v in value if isinstance(v, str))
    return None


@dataclass(frozen=True)
class _Subject:
    """Who the exchange is for: the person and, for a chain link, the chain so far."""

    sub: str
    issuer_iss: str
    issuer_name: str
    claims: Mapping[str, Any]
    scopes: frozenset[str] | None
    expires_at: int
    previous_actors: tuple[str, ...] = ()
    previous_scopes: frozenset[str] | None = None
    chained: bool = False


@dataclass(frozen=True)
class ExchangeResult:
    """A granted exchange: the RFC 8693 response body and what went into the token."""

    response: dict[str, Any]
    claims: dict[str, Any]
    policy_id: str


@dataclass
class TokenExchange:
    """The token exchange grant of Credo's authorization server (see the module docstring).

    ``issuer`` returns the ``iss`` of Credo's tokens (its HTTP front end's URL unless
    configured); ``jwt_key`` the active JWT signing key; ``bundle`` the trust domain's
    bundle; ``owner_of`` the owner of an agent's registration entries (``""`` if they name
    none), or None when the agent has no registration entry at all: an identity whose
    entries were deleted (the kill switch) may not act for anyone, even while its SVID is
    still valid. ``policies_for`` returns the delegation policies whose ``agent_id`` matches
    an agent (its own ID or a prefix of it); by default one datastore query per exchange.
    """

    trust_domain: TrustDomain
    datastore: DataStore
    subjects: SubjectIssuers
    issuer: Callable[[], str]
    jwt_key: Callable[[], JwtKey | None]
    bundle: Callable[[], Bundle]
    owner_of: Callable[[SpiffeId], str | None]
    clock: Callable[[], float] = time.time
    policies_for: Callable[[SpiffeId], Sequence[DelegationPolicy]] | None = None
    _verified: dict[tuple[x509.Certificate, ...], tuple[Bundle, float, SpiffeId]] = field(
        default_factory=dict, init=False, repr=False
    )
    _verified_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    revoked_credential: Callable[[str, str], bool] | None = None
    """``(kind, id)`` -> whether a credential is revoked: kind ``"jti"`` (a JWT-SVID),
    ``"serial"`` (an X509-SVID, lowercase hex; for both, true too when the entry it was
    issued for is revoked) or ``"token"`` (a delegated access token, by ``jti``); by
    default the datastore's ``credential_revoked``, which the recording transaction asks
    too."""
    _recorder: GroupCommit[TokenGrant, GrantOutcome] | None = field(
        default=None, init=False, repr=False
    )
    _revoked: Callable[[str, str], bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._recorder = GroupCommit(self.datastore.record_token_grants)
        self._revoked = self.revoked_credential or self.datastore.credential_revoked

    @property
    def token_endpoint(self) -> str:
        return self.issuer().rstrip("/") + TOKEN_PATH

    # --- step 1 and 2: the form and the client -----------------------------------------

    @staticmethod
    def parse_form(fields: Sequence[tuple[str, str]]) -> dict[str, str]:
        """The form's fields as a dict; InvalidRequest for repeats and oversized values."""
        form: dict[str, str] = {}
        for name, value in fields:
            if name in form:
                raise InvalidRequest(f"{name[:64]} is given more than once")
            if len(value) > _MAX_FIELD:
                raise InvalidRequest(f"{name[:64]} is longer than {_MAX_FIELD} characters")
            form[name] = value
        return form

    def _check_agent(self, spiffe_id: SpiffeId, how: str) -> SpiffeId:
        if spiffe_id.trust_domain != self.trust_domain:
            raise InvalidClient(
                f"{how} names {spiffe_id}, which is not in trust domain {self.trust_domain}"
            )
        if not spiffe_id.path or is_reserved_path(spiffe_id.path):
            raise InvalidClient(f"{how} names {spiffe_id}, which is not a workload")
        return spiffe_id

    def _jwt_svid(self, token: str, what: str) -> SpiffeId:
        spiffe_id, jti = self._jwt_svid_unchecked(token, what)
        self._check_not_revoked("jti", jti, what + " (a JWT-SVID)")
        return spiffe_id

    def _jwt_svid_unchecked(self, token: str, what: str) -> tuple[SpiffeId, str]:
        """The agent a JWT-SVID names and its ``jti``; not yet checked against revocation."""
        audiences = [self.token_endpoint, self.issuer()]
        try:
            typ = jwt.get_unverified_header(token).get("typ")
        except jwt.PyJWTError:
            raise InvalidClient(f"{what} is not a JWT") from None
        if typ == AT_JWT:
            raise InvalidClient(f"{what} is an access token, not a JWT-SVID")
        try:
            svid = JwtSvid.parse_and_validate(
                token,
                BundleSet([self.bundle()]),
                audiences,
                now=datetime.fromtimestamp(self.clock(), UTC),
            )
        except JwtSvidExpired:
            raise InvalidClient(f"{what} (a JWT-SVID) has expired") from None
        except JwtSvidError as exc:
            raise InvalidClient(
                f"{what} is not a JWT-SVID of {self.trust_domain} for audience "
                f"{self.token_endpoint}: {exc}"
            ) from None
        return self._check_agent(svid.spiffe_id, what), str(svid.claims.get("jti", ""))

    def _verify_peer(self, chain: Sequence[x509.Certificate]) -> SpiffeId:
        """``verify_x509_svid`` against the bundle, its signature checks remembered for up
        to a second per certificate chain and bundle (a keep-alive client sends the same
        certificate with every request); the validity times are checked on every call."""
        bundle = self.bundle()
        now = datetime.fromtimestamp(self.clock(), UTC)
        key = tuple(chain)
        mono = time.monotonic()
        with self._verified_lock:
            hit = self._verified.get(key)
        if (
            hit is not None
            and hit[0] is bundle
            and mono - hit[1] < 1.0
            and all(c.not_valid_before_utc <= now <= c.not_valid_after_utc for c in chain)
        ):
            return hit[2]
        spiffe_id = verify_x509_svid(chain, BundleSet([bundle]), now=now)
        with self._verified_lock:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key] = (bundle, mono, spiffe_id)
        return spiffe_id

    def _check_not_revoked(self, kind: str, ident: str, what: str) -> None:
        if ident and self._revoked(kind, ident):
            raise _RevokedClient(f"{what} has been revoked")

    def authenticate(
        self, form: Mapping[str, str], peer_chain: Sequence[x509.Certificate] | None
    ) -> SpiffeId:
        """The calling agent's SPIFFE ID; InvalidClient when it cannot be established."""
        client, credential = self._identify(form, peer_chain)
        if credential is not None:
            self._check_not_revoked(*credential)
        return client

    def _identify(
        self, form: Mapping[str, str], peer_chain: Sequence[x509.Certificate] | None
    ) -> tuple[SpiffeId, tuple[str, str, str] | None]:
        """:meth:`authenticate` but the revocation check: the agent, and ``(kind, id, what)``
        of the credential it authenticated with, to check for revocation."""
        credential: tuple[str, str, str] | None
        assertion = form.get("client_assertion")
        assertion_type = form.get("client_assertion_type")
        if assertion is not None or assertion_type is not None:
            if assertion_type != JWT_SPIFFE_ASSERTION:
                raise InvalidClient(
                    f"client_assertion_type must be {JWT_SPIFFE_ASSERTION} "
                    "(a JWT-SVID as client_assertion)"
                )
            if not assertion:
                raise InvalidClient("client_assertion is empty; expected a JWT-SVID")
            client, jti = self._jwt_svid_unchecked(assertion, "client_assertion")
            credential = ("jti", jti, "client_assertion (a JWT-SVID)") if jti else None
        elif peer_chain:
            try:
                spiffe_id = self._verify_peer(peer_chain)
            except X509SvidError as exc:
                raise InvalidClient(
                    f"the client certificate is not a valid X509-SVID: {exc}"
                ) from None
            client = self._check_agent(spiffe_id, "the client certificate")
            serial = format(peer_chain[0].serial_number, "x")
            credential = ("serial", serial, "the client certificate")
        else:
            raise InvalidClient(
                "the client is not authenticated: use mutual TLS with your X509-SVID, or send "
                f"a JWT-SVID as client_assertion (client_assertion_type={JWT_SPIFFE_ASSERTION}) "
                f"with audience {self.token_endpoint}"
            )
        client_id = form.get("client_id")
        if client_id is not None and client_id != str(client):
            raise InvalidClient(f"client_id {client_id[:200]!r} is not the authenticated {client}")
        return client, credential

    # --- step 3: the subject ---------------------------------------------------------

    def _own_token(self, token: str, claims: Mapping[str, Any]) -> _Subject:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidRequest("subject_token is not a JWT") from None
        if header.get("typ") != AT_JWT:
            raise InvalidGrant("subject_token from this server must be an access token (at+jwt)")
        key = self.bundle().jwt_bundle().get_key(str(header.get("kid", "")))
        if key is None:
            raise InvalidGrant("subject_token is signed with a key this server does not publish")
        try:
            verified = jwt.decode(
                token,
                key,
                algorithms=["ES256", "ES384", "RS256"],
                issuer=self.issuer(),
                options={
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp", "sub", "act"],
                },
            )
        except jwt.PyJWTError as exc:
            raise InvalidGrant(f"subject_token was refused: {exc}") from None
        check_times(verified, self.clock(), _LEEWAY, "subject_token (the previous link's token)")
        if self._revoked("token", str(verified.get("jti", ""))):
            raise InvalidGrant("subject_token (the previous link's token) has been revoked")
        actors = actor_chain(verified.get("act"))
        if not actors:
            raise InvalidGrant("subject_token has no actor chain (act)")
        scopes = _scopes_of(verified) or frozenset()
        return _Subject(
            sub=str(verified["sub"]),
            issuer_iss=str(verified.get(SUBJECT_ISSUER_CLAIM, "")),
            issuer_name=self._issuer_name(str(verified.get(SUBJECT_ISSUER_CLAIM, ""))),
            claims={"sub": verified["sub"]},
            scopes=scopes,
            expires_at=int(verified["exp"]),
            previous_actors=tuple(actors),
            previous_scopes=scopes,
            chained=True,
        )

    def _issuer_name(self, iss: str) -> str:
        return self.subjects.for_iss(iss).name

    def _subject(self, form: Mapping[str, str]) -> _Subject:
        token = form.get("subject_token")
        token_type = form.get("subject_token_type")
        if not token:
            raise InvalidRequest("subject_token is required: the person's token")
        if not token_type:
            raise InvalidRequest(
                f"subject_token_type is required: one of {', '.join(SUBJECT_TOKEN_TYPES)}"
            )
        if token_type not in SUBJECT_TOKEN_TYPES:
            raise InvalidRequest(
                f"subject_token_type {token_type[:100]!r} is not supported; expected one of "
                + ", ".join(SUBJECT_TOKEN_TYPES)
            )
        claims = unverified_claims(token)
        iss = claims.get("iss")
        if iss == self.issuer():
            if token_type == ID_TOKEN_TYPE:
                raise InvalidRequest("a token from this server is an access_token, not id_token")
            return self._own_token(token, claims)
        issuer = self.subjects.for_iss(iss)
        verified: VerifiedSubject = issuer.verify(token)
        if verified.sub.startswith("spiffe://"):
            # Credo signs access tokens and JWT-SVIDs with the same keys; a person named like
            # a workload would make the token readable as a JWT-SVID by validators that do
            # not check typ.
            raise InvalidGrant(
                "subject_token 'sub' is a SPIFFE ID; a person's token must name a person"
            )
        return _Subject(
            sub=verified.sub,
            issuer_iss=issuer.config.issuer,
            issuer_name=issuer.name,
            claims=verified.claims,
            scopes=_scopes_of(verified.claims),
            expires_at=int(verified.claims["exp"]),
            previous_actors=tuple(actor_chain(verified.claims.get("act"))),
        )

    def _check_actor_token(self, form: Mapping[str, str], client: SpiffeId) -> None:
        token = form.get("actor_token")
        token_type = form.get("actor_token_type")
        if token is None:
            if token_type is not None:
                raise InvalidRequest("actor_token_type is given without actor_token")
            return
        if token_type not in (JWT_TOKEN_TYPE, ACCESS_TOKEN_TYPE):
            raise InvalidRequest(f"actor_token_type must be {JWT_TOKEN_TYPE} (a JWT-SVID)")
        actor = self._jwt_svid(token, "actor_token")
        if actor != client:
            raise InvalidRequest(
                f"actor_token names {actor}, but the authenticated client is {client}"
            )

    # --- steps 4 to 7 ------------------------------------------------------------------

    def exchange(
        self,
        fields: Sequence[tuple[str, str]],
        *,
        peer_chain: Sequence[x509.Certificate] | None = None,
    ) -> ExchangeResult:
        """Run one token exchange; raise an :class:`OAuthError` subclass when refused."""
        client: SpiffeId | None = None
        credential: tuple[str, str, str] | None = None
        seen: dict[str, Any] = {}
        try:
            form = self.parse_form(fields)
            grant = form.get("grant_type")
            if not grant:
                raise InvalidRequest(f"grant_type is required ({GRANT_TYPE})")
            if grant != GRANT_TYPE:
                raise UnsupportedGrantType(
                    f"grant_type {grant[:100]!r} is not supported; this endpoint does {GRANT_TYPE}"
                )
            unknown = sorted(set(form) - _FIELDS)
            if unknown:
                raise InvalidRequest(f"unknown parameter {unknown[0][:64]!r}")
            # The client's credential is checked for revocation when the grant is recorded,
            # in the same transaction (or, when the exchange is refused, before answering).
            client, credential = self._identify(form, peer_chain)
            self._check_actor_token(form, client)
            requested = form.get("requested_token_type")
            if requested is not None and requested not in (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
                raise InvalidRequest(
                    f"requested_token_type must be {ACCESS_TOKEN_TYPE} (the default)"
                )
            result, budgets = self._grant(form, client, seen)
            self._record(client, seen, result, budgets, credential)
        except OAuthError as refusal:
            err = refusal
            if credential is not None and not isinstance(err, _RevokedClient):
                try:  # a revoked credential is refused as such, whatever else was wrong
                    self._check_not_revoked(*credential)
                except _RevokedClient as revoked:
                    err = revoked
            if isinstance(err, _RevokedClient):
                client = None  # as any credential that does not authenticate its holder
            if client is not None:  # unauthenticated noise is logged, not audited
                self._audit(client, seen, error=err)
            log.info(
                "refused token exchange",
                extra={
                    "client_id": str(client) if client else "",
                    "error": err.error,
                    "reason": err.description[:300],
                },
            )
            if err is refusal:
                raise
            raise err from None
        log.info(
            "token exchange",
            extra={
                "client_id": str(client),
                "sub": result.claims["sub"],
                "aud": result.claims["aud"],
                "scope": result.claims["scope"],
                "policy_id": result.policy_id,
                "jti": result.claims["jti"],
                "credo_owner": result.claims["credo_owner"],
                "depth": len(actor_chain(result.claims["act"])),
            },
        )
        return result

    def _record(
        self,
        client: SpiffeId,
        seen: Mapping[str, Any],
        result: ExchangeResult,
        budgets: tuple[Budget, ...],
        credential: tuple[str, str, str] | None = None,
    ) -> None:
        """Budgets, the token's record and the grant's audit record, in one transaction
        (shared with concurrent exchanges) that also checks the client's ``credential``
        (kind, id, what) for revocation; raises when refused (nothing of it written)."""
        claims = result.claims
        grant = TokenGrant(
            token=DelegatedToken(
                jti=str(claims["jti"]),
                client_id=str(claims["client_id"]),
                subject=str(claims["sub"]),
                actors=tuple(actor_chain(claims["act"])),
                expires_at=int(claims["exp"]),
                issued_at=int(claims["iat"]),
            ),
            audit=self._audit_record(client, seen, result=result),
            policy_id=result.policy_id,
            budgets=budgets,
            now=int(claims["iat"]),
            client_credential=credential[:2] if credential is not None and credential[1] else None,
        )
        assert self._recorder is not None
        outcome = self._recorder.submit(grant)
        if outcome.recorded:
            return
        if outcome.revoked_credential:
            assert credential is not None
            raise _RevokedClient(f"{credential[2]} has been revoked")
        if outcome.exhausted is None:
            raise InvalidClient(f"{client}'s registration entries were revoked")
        raise self._exhausted(outcome.exhausted, result.policy_id, client, grant.now)

    def _audit(
        self,
        client: SpiffeId | None,
        seen: Mapping[str, Any],
        *,
        result: ExchangeResult | None = None,
        error: OAuthError | None = None,
    ) -> None:
        """Write the ``token.exchange`` record of a refusal (a grant's is written with the
        token's record, :meth:`_record`)."""
        self.datastore.append_audit_records(
            [self._audit_record(client, seen, result=result, error=error)]
        )

    def _audit_record(
        self,
        client: SpiffeId | None,
        seen: Mapping[str, Any],
        *,
        result: ExchangeResult | None = None,
        error: OAuthError | None = None,
    ) -> audit.PendingRecord:
        """One ``token.exchange`` record, granted or refused, written before the answer:
        the agent (actor and subject), the person (``sub``), scopes, audience, policy and
        the new token's ``jti``, the agent's owner. Never a token."""
        details: dict[str, Any] = dict(seen)
        details.pop("owner", None)
        if result is not None:
            claims = result.claims
            details.update(
                scopes=str(claims["scope"]).split(),
                audience=claims["aud"],
                policy_id=result.policy_id,
                jti=claims["jti"],
                expires_at=claims["exp"],
                actors=actor_chain(claims["act"]),
            )
        if error is not None:
            details["error"] = error.error
        agent = str(client) if client is not None else ""
        return audit.pending(
            "token.exchange",
            subject=agent,
            owner=str(seen.get("owner") or ""),
            outcome=audit.ALLOWED if error is None else audit.REFUSED,
            reason=error.description[:300] if error is not None else "",
            details=details,
            actor=audit.Actor("workload", agent) if agent else None,
        )

    def _audience(self, form: Mapping[str, str]) -> str:
        audience = form.get("audience") or form.get("resource")
        if form.get("audience") and form.get("resource") and form["audience"] != form["resource"]:
            raise InvalidTarget("give audience or resource, not two different targets")
        if not audience:
            raise InvalidRequest("audience (or resource) is required: where the token is used")
        return audience

    def _requested_scopes(self, form: Mapping[str, str]) -> frozenset[str] | None:
        text = form.get("scope")
        if text is None or not text.strip():
            return None
        scopes = text.split(" ")
        if any(not s for s in scopes) or any(not s.isprintable() for s in scopes):
            raise InvalidScope("scope must be scope tokens separated by single spaces")
        return frozenset(scopes)

    def _policies(self, client: SpiffeId, subject: _Subject) -> list[DelegationPolicy]:
        patterns = agent_patterns_for(client)
        if self.policies_for is not None:
            found: Sequence[DelegationPolicy] = self.policies_for(client)
        else:
            found = self.datastore.list_delegation_policies(by_agent_ids=patterns)
        # The most specific first: the agent's own ID, then ever shorter prefixes.
        rank = {pattern: i for i, pattern in enumerate(patterns)}
        candidates = sorted(found, key=lambda p: (rank[p.agent_id], p.id))
        # A chain link only carries the person's ``sub``: claims other than sub cannot match.
        fitting = [
            p
            for p in candidates
            if p.subject_issuer == subject.issuer_name
            and claims_match(p.subject_claims, subject.claims)
        ]
        if not fitting:
            raise UnauthorizedClient(
                f"{client} has no delegation policy to act for {subject.sub[:200]!r} of "
                f"subject issuer {subject.issuer_name!r}"
            )
        return fitting

    def _check_policy(
        self,
        policy: DelegationPolicy,
        client: SpiffeId,
        subject: _Subject,
        audience: str,
        requested: frozenset[str] | None,
    ) -> frozenset[str]:
        """The granted scopes under ``policy``; raises the first rule the request breaks."""
        if audience not in policy.audiences:
            raise InvalidTarget(
                f"audience {audience[:200]!r} is not allowed for {client}; the delegation "
                f"policy allows {', '.join(policy.audiences)}"
            )
        depth = len(subject.previous_actors) + 1
        if depth > policy.max_depth:
            raise UnauthorizedClient(
                f"the actor chain would be {depth} deep; the delegation policy for {client} "
                f"allows at most {policy.max_depth}"
            )
        limits: list[tuple[frozenset[str], str]] = [
            (frozenset(policy.scopes), f"the delegation policy for {client}")
        ]
        if subject.scopes is not None and not subject.chained:
            limits.append((subject.scopes, "the person's own scopes (subject_token)"))
        if subject.previous_scopes is not None:
            limits.append((subject.previous_scopes, "the previous link of the chain"))
        allowed = frozenset.intersection(*(scopes for scopes, _ in limits))
        if requested is None:
            if not allowed:
                raise InvalidScope("no scope is allowed by the person, the policy and the chain")
            return allowed
        for scope in sorted(requested):
            for scopes, what in limits:
                if scope not in scopes:
                    raise InvalidScope(f"scope {scope[:100]!r} is not within {what}")
        return requested

    def _grant(
        self, form: Mapping[str, str], client: SpiffeId, seen: dict[str, Any]
    ) -> tuple[ExchangeResult, tuple[Budget, ...]]:
        """The signed token and the policy budgets it takes a unit of (not yet taken)."""
        owner = self.owner_of(client)
        seen["owner"] = owner or ""
        if owner is None:
            raise InvalidClient(
                f"{client} has no registration entry: its identity was revoked (entry "
                "revoked or deleted) or never registered"
            )
        subject = self._subject(form)
        seen.update(sub=subject.sub, subject_issuer=subject.issuer_name)
        if subject.previous_actors:
            seen["previous_actors"] = list(subject.previous_actors)
        now = _now_s(self.clock)
        may_act = subject.claims.get("may_act") if not subject.chained else None
        if may_act is not None:
            allowed_actor = may_act.get("sub") if isinstance(may_act, Mapping) else None
            if allowed_actor != str(client):
                raise InvalidGrant(
                    f"the subject token's may_act names {str(allowed_actor)[:200]!r}, not {client}"
                )
        if str(client) in subject.previous_actors:
            raise InvalidGrant(f"{client} is already in the actor chain")
        audience = self._audience(form)
        seen["audience"] = audience
        requested = self._requested_scopes(form)
        if requested is not None:
            seen["requested_scopes"] = sorted(requested)
        policies = self._policies(client, subject)
        first_error: OAuthError | None = None
        chosen: tuple[DelegationPolicy, frozenset[str]] | None = None
        for policy in policies:
            try:
                chosen = (policy, self._check_policy(policy, client, subject, audience, requested))
                break
            except OAuthError as err:
                first_error = first_error or err
        if chosen is None:
            assert first_error is not None
            raise first_error
        policy, granted = chosen
        seen["policy_id"] = policy.id
        key = self.jwt_key()
        if key is None:
            raise InvalidRequest("the server has no active JWT key yet; retry shortly")
        lifetime = min(
            policy.max_ttl,
            subject.expires_at - now,
            int(key.not_after.timestamp()) - now,
        )
        if lifetime <= 0:
            raise InvalidGrant("subject_token has expired")
        budgets = tuple(b for b in policy.budgets if b.scope == "*" or b.scope in granted)
        claims: dict[str, Any] = {
            "iss": self.issuer(),
            "sub": subject.sub,
            "act": _nest([str(client), *subject.previous_actors]),
            "client_id": str(client),
            "aud": audience,
            "scope": " ".join(sorted(granted)),
            "iat": now,
            "exp": now + lifetime,
            "jti": secrets.token_urlsafe(16),
            "credo_owner": owner,
            SUBJECT_ISSUER_CLAIM: subject.issuer_iss,
        }
        token = jwt.encode(
            claims,
            key.private_key,
            algorithm=jwt_algorithm_for(key.private_key),
            headers={"kid": key.kid, "typ": AT_JWT},
        )
        response = {
            "access_token": token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": claims["scope"],
        }
        return ExchangeResult(response=response, claims=claims, policy_id=policy.id), budgets

    @staticmethod
    def _exhausted(exhausted: Budget, policy_id: str, client: SpiffeId, now: int) -> OAuthError:
        resets = now - now % exhausted.period + exhausted.period
        when = datetime.fromtimestamp(resets, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return UnauthorizedClient(
            f"budget {exhausted.scope}={exhausted.limit}/{exhausted.period}s of delegation "
            f"policy {policy_id} is used up for {client}; it resets at {when} "
            f"(in {resets - now}s)"
        )
