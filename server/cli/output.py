"""How the CLI prints: SPIRE-style ``Label : value`` blocks for text, the API's fields for JSON.

JSON output uses the admin API's snake_case field names (an entry has ``id``,
``spiffe_id``, ``parent_id``, ``selectors`` as ``{"type", "value"}`` objects, ...), with
integers as JSON numbers and bytes as standard base64.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from credo._proto.credo.server.v1 import admin_pb2, types_pb2
from credo.bundle import Bundle
from credo.durations import format_duration
from credo.errors import BundleError
from credo.keys import PublicKey
from credo.spiffe_id import TrustDomain

__all__ = [
    "BUNDLE_FORMATS",
    "OUTPUT_FORMATS",
    "blocks",
    "bundle_from_proto",
    "emit",
    "format_time",
    "format_ttl",
    "message_to_dict",
    "render_agent",
    "render_authority_state",
    "render_bundle",
    "render_entry",
]

OUTPUT_FORMATS = ("text", "json")
BUNDLE_FORMATS = ("pem", "spiffe")

_INTEGERS = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _value_to_json(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_dict(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if field.type in _INTEGERS:
        return int(value)
    return value


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field of ``message`` by its proto name; an unset sub-message is ``None``."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [_value_to_json(field, item) for item in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value_to_json(field, value)
    return out


def emit(output: str, data: Any, text: str) -> None:
    """Print ``data`` as JSON when ``output`` is ``json``, else ``text``."""
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif text:
        click.echo(text.rstrip("\n"))


def format_time(seconds: int) -> str:
    """Unix seconds as RFC 3339 UTC; 0 is ``never``; beyond what a date can say, the number.

    Any stored value prints: a row written before the server bounded ``expires_at`` must
    not stop ``entry show`` from listing every other entry.
    """
    if not seconds:
        return "never"
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{seconds} (unix seconds, out of range)"


def format_ttl(seconds: int) -> str:
    """A TTL in seconds; 0 means the server's default."""
    if not seconds:
        return "default"
    return f"{format_duration(seconds)} ({seconds}s)"


def blocks(rows: Sequence[tuple[str, str]]) -> str:
    """``Label : value`` lines with the colons aligned, as SPIRE prints them."""
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"{label.ljust(width)} : {value}".rstrip() for label, value in rows)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def render_entry(entry: types_pb2.RegistrationEntry) -> str:
    """One registration entry as a block of ``Label : value`` lines."""
    rows: list[tuple[str, str]] = [
        ("Entry ID", entry.id),
        ("SPIFFE ID", entry.spiffe_id),
        ("Parent ID", entry.parent_id),
        ("Revision", str(entry.revision_number)),
        ("X509-SVID TTL", format_ttl(entry.x509_svid_ttl)),
        ("JWT-SVID TTL", format_ttl(entry.jwt_svid_ttl)),
        ("Expires at", format_time(entry.expires_at)),
    ]
    rows += [("Selector", f"{s.type}:{s.value}") for s in entry.selectors]
    rows += [("DNS name", name) for name in entry.dns_names]
    rows += [("FederatesWith", td) for td in entry.federates_with]
    if entry.node_alias:
        rows.append(("Node alias", "true"))
    if entry.admin:
        rows.append(("Admin", "true"))
    if entry.downstream:
        rows.append(("Downstream", "true"))
    if entry.hint:
        rows.append(("Hint", entry.hint))
    if entry.owner:
        rows.append(("Owner", entry.owner))
    if entry.purpose:
        rows.append(("Purpose", entry.purpose))
    if entry.created_at:
        rows.append(("Created at", format_time(entry.created_at)))
    return blocks(rows)


def render_entries(entries: Iterable[types_pb2.RegistrationEntry]) -> str:
    """Entry blocks separated by blank lines."""
    return "\n\n".join(render_entry(e) for e in entries)


def render_agent(agent: types_pb2.AttestedNode) -> str:
    """One attested node as a block of ``Label : value`` lines."""
    rows: list[tuple[str, str]] = [
        ("SPIFFE ID", agent.spiffe_id),
        ("Attestation type", agent.attestation_type),
        ("Expiration time", format_time(agent.cert_not_after)),
        ("Serial number", agent.cert_serial),
        ("Banned", _flag(agent.banned)),
    ]
    if agent.new_cert_serial:
        rows.append(("New serial number", agent.new_cert_serial))
    rows += [("Selector", f"{s.type}:{s.value}") for s in agent.selectors]
    if agent.created_at:
        rows.append(("Attested at", format_time(agent.created_at)))
    return blocks(rows)


def render_authority(info: admin_pb2.AuthorityInfo) -> str:
    """One local authority (CA or JWT key) as indented lines."""
    rows = [
        ("Authority ID", info.authority_id),
        ("Expires at", format_time(info.expires_at)),
        ("Status", info.status),
        ("Tainted", _flag(info.tainted)),
    ]
    return "\n".join("  " + line for line in blocks(rows).splitlines())


def render_authority_state(kind: str, state: admin_pb2.AuthorityState) -> str:
    """The active, prepared and old authority of one kind."""
    label = "X.509" if kind == "x509" else "JWT"
    parts = []
    for slot in ("active", "prepared", "old"):
        parts.append(f"{slot.capitalize()} {label} authority:")
        if state.HasField(slot):
            parts.append(render_authority(getattr(state, slot)))
        else:
            parts.append(f"  No {slot} {label} authority found")
        parts.append("")
    return "\n".join(parts)


def bundle_from_proto(message: types_pb2.Bundle) -> Bundle:
    """The :class:`credo.bundle.Bundle` an admin API ``Bundle`` message describes."""
    try:
        certs = [x509.load_der_x509_certificate(a.asn1) for a in message.x509_authorities]
    except ValueError as exc:
        raise BundleError(f"the server sent an unreadable X.509 authority: {exc}") from None
    keys: dict[str, PublicKey] = {}
    wit_keys: dict[str, PublicKey] = {}
    for kind, authorities, out in (
        ("JWT", message.jwt_authorities, keys),
        ("WIT", message.wit_authorities, wit_keys),
    ):
        for authority in authorities:
            try:
                key = load_der_public_key(authority.public_key)
            except ValueError as exc:
                raise BundleError(
                    f"{kind} authority {authority.key_id!r} is unreadable: {exc}"
                ) from None
            if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise BundleError(f"{kind} authority {authority.key_id!r} is not an EC or RSA key")
            out[authority.key_id] = key
    return Bundle(
        TrustDomain.parse(message.trust_domain),
        tuple(certs),
        keys,
        int(message.sequence_number),
        int(message.refresh_hint) or None,
        wit_keys,
    )


def render_bundle(message: types_pb2.Bundle, bundle_format: str) -> str:
    """A bundle as PEM (its X.509 authorities) or as a SPIFFE bundle (JWKS JSON)."""
    bundle = bundle_from_proto(message)
    if bundle_format == "spiffe":
        return json.dumps(json.loads(bundle.marshal()), indent=2)
    return bundle.marshal_pem().decode("ascii")


def render_revocation(reply: admin_pb2.RevocationResponse, what: str) -> str:
    """What a revocation call did, for people: the target, then each credential it newly
    revoked (X.509-SVIDs by serial, JWT-/WIT-SVIDs and delegated tokens by ``jti``)."""
    n, m, k = len(reply.revoked), len(reply.revoked_jwts), len(reply.revoked_tokens)
    if n == m == k == 0 and not reply.entry_newly_revoked:
        head = f"{what} was already revoked; nothing more to revoke"
    else:
        head = (
            f"{what} revoked; {n} X.509-SVID{'' if n == 1 else 's'}, {m} JWT-/WIT-SVID"
            f"{'' if m == 1 else 's'}, {k} delegated token{'' if k == 1 else 's'} revoked"
        )
    lines = [head]
    for svid in reply.revoked:
        lines.append(
            f"  serial {svid.serial}  {svid.spiffe_id}  expires {format_time(svid.expires_at)}"
        )
    for jwt in reply.revoked_jwts:
        lines.append(f"  jti {jwt.jti}  {jwt.spiffe_id}  expires {format_time(jwt.expires_at)}")
    for token in reply.revoked_tokens:
        lines.append(
            f"  delegated token {token.jti}  {token.client_id} for {token.subject}  "
            f"expires {format_time(token.expires_at)}"
        )
    return "\n".join(lines)
