"""``credo-server entry create|update|delete|show|count``: registration entries.

Entries come from flags (one entry) or from ``--data FILE`` (a batch, JSON
``{"entries": [{...}]}`` with the API's snake_case field names; ``-`` reads stdin).
Batch calls are all-or-nothing on the server. ``update`` changes only the fields given:
it reads the entry, overlays them, and sends the whole entry back.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from credo._proto.credo.server.v1 import admin_pb2, types_pb2
from credo._reserved import server_spiffe_id
from credo.errors import CredoError
from credo.selector import Selector
from credo.selector_rules import check_selector
from credo.spiffe_id import SpiffeId, TrustDomain
from server.cli.client import AdminClient
from server.cli.errors import CliError
from server.cli.output import emit, message_to_dict, render_entries, render_revocation
from server.cli.params import (
    DURATION,
    INT32_MAX,
    SELECTOR,
    SPIFFE_ID,
    TIMESTAMP,
    TRUST_DOMAIN,
    admin_options,
    parse_timestamp,
)

__all__ = ["MATCH_MODES", "entry", "entry_from_json", "server_id_for"]

F = TypeVar("F", bound=Callable[..., Any])

MATCH_MODES = ("exact", "subset", "superset", "any")
PAGE_SIZE = 500

# Fields of a RegistrationEntry a --data document may set (created_at is read-only
# but accepted, so the output of `entry show --output json` can be fed back).
_JSON_FIELDS = (
    "id",
    "spiffe_id",
    "parent_id",
    "selectors",
    "x509_svid_ttl",
    "jwt_svid_ttl",
    "dns_names",
    "admin",
    "downstream",
    "node_alias",
    "hint",
    "expires_at",
    "federates_with",
    "revision_number",
    "created_at",
    "owner",
    "purpose",
)
_READ_ONLY = frozenset({"created_at"})
# Flag-only parameters (the rest map to entry fields of the same name).
_FLAG_FIELDS = {
    "spiffe_id": "spiffe_id",
    "parent_id": "parent_id",
    "selectors": "selectors",
    "x509_svid_ttl": "x509_svid_ttl",
    "jwt_svid_ttl": "jwt_svid_ttl",
    "dns_names": "dns_names",
    "admin": "admin",
    "downstream": "downstream",
    "node": "node_alias",
    "hint": "hint",
    "expires_at": "expires_at",
    "federates_with": "federates_with",
    "owner": "owner",
    "purpose": "purpose",
}
_FLAG_NAMES = {"selectors": "--selector", "dns_names": "--dns", "entry_id": "--id"}


def server_id_for(spiffe_id: str) -> str:
    """The server's SPIFFE ID in ``spiffe_id``'s trust domain (parent of node-alias entries)."""
    td = SpiffeId.parse(spiffe_id).trust_domain
    return str(server_spiffe_id(td))


# --- building entries ------------------------------------------------------------------


class _Bad(ValueError):
    """A field of a --data entry is wrong; the message names it."""


def _json_string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{name}: expected a string, got {json.dumps(value)}")
    return value


def _json_int(value: Any, name: str, *, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{name}: expected a whole number, got {json.dumps(value)}")
    if not minimum <= value <= maximum:
        raise _Bad(f"{name}: {value} is out of range ({minimum}..{maximum})")
    return value


def _json_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"{name}: expected a list, got {json.dumps(value)}")
    return value


def _json_selector(value: Any, name: str) -> Selector:
    try:
        if isinstance(value, str):
            selector = Selector.parse(value)
            check_selector(selector)
            return selector
        if isinstance(value, dict) and set(value) <= {"type", "value"}:
            selector = Selector(str(value.get("type", "")), str(value.get("value", "")))
            check_selector(selector)
            return selector
    except CredoError as exc:
        raise _Bad(f"{name}: {exc}") from None
    raise _Bad(f'{name}: expected {{"type": ..., "value": ...}} or \'type:value\'')


def _set_field(entry: types_pb2.RegistrationEntry, name: str, value: Any) -> None:
    """Set one field of ``entry`` (replacing a repeated field's whole list)."""
    if name == "selectors":
        del entry.selectors[:]
        entry.selectors.extend(types_pb2.Selector(type=s.type, value=s.value) for s in value)
    elif name in ("dns_names", "federates_with"):
        target = getattr(entry, name)
        del target[:]
        target.extend(value)
    else:
        setattr(entry, name, value)


def entry_from_json(doc: Any, index: int) -> tuple[types_pb2.RegistrationEntry, set[str]]:
    """One ``--data`` entry, checked field by field; returns the entry and the fields given."""
    where = f"entry {index}"
    if not isinstance(doc, dict):
        raise CliError(f"--data: {where}: expected a JSON object")
    unknown = sorted(set(doc) - set(_JSON_FIELDS))
    if unknown:
        raise CliError(
            f"--data: {where}: unknown field {unknown[0]!r}; expected some of "
            + ", ".join(_JSON_FIELDS)
        )
    entry = types_pb2.RegistrationEntry()
    given: set[str] = set()
    try:
        for name, value in doc.items():
            if name in _READ_ONLY:
                continue
            parsed: Any
            if name in ("spiffe_id", "parent_id"):
                text = _json_string(value, name)
                try:
                    parsed = str(SpiffeId.parse(text)) if text else ""
                except CredoError as exc:
                    raise _Bad(f"{name}: {exc}") from None
            elif name in ("id", "hint", "owner", "purpose"):
                parsed = _json_string(value, name)
            elif name == "selectors":
                items = _json_list(value, name)
                parsed = [_json_selector(s, f"selectors[{i}]") for i, s in enumerate(items)]
            elif name == "dns_names":
                items = _json_list(value, name)
                parsed = [_json_string(v, f"{name}[{i}]") for i, v in enumerate(items)]
            elif name == "federates_with":
                items = _json_list(value, name)
                parsed = []
                for i, v in enumerate(items):
                    try:
                        parsed.append(TrustDomain.parse(_json_string(v, f"{name}[{i}]")).name)
                    except CredoError as exc:
                        raise _Bad(f"{name}[{i}]: {exc}") from None
            elif name in ("x509_svid_ttl", "jwt_svid_ttl"):
                parsed = _json_int(value, name, maximum=INT32_MAX)
            elif name == "expires_at":
                if isinstance(value, str):
                    try:
                        parsed = parse_timestamp(value)
                    except ValueError as exc:
                        raise _Bad(f"{name}: {exc}") from None
                else:
                    parsed = _json_int(value, name)
            elif name == "revision_number":
                parsed = _json_int(value, name)
            else:  # admin, downstream, node_alias
                if not isinstance(value, bool):
                    raise _Bad(f"{name}: expected true or false, got {json.dumps(value)}")
                parsed = value
            _set_field(entry, name, parsed)
            given.add(name)
    except _Bad as exc:
        raise CliError(f"--data: {where}: {exc}") from None
    return entry, given


def _read_data(path: str) -> list[Any]:
    """The entries of a ``--data`` document (``-`` is stdin)."""
    if path == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise CliError(f"--data: cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--data: {path} is not valid JSON: {exc}") from None
    items = doc.get("entries") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise CliError('--data: expected {"entries": [...]} with a list of entries')
    if not items:
        raise CliError("--data: the document has no entries")
    return items


def _fields_from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Entry fields given as flags (unset flags are None or empty tuples)."""
    fields: dict[str, Any] = {}
    for param, name in _FLAG_FIELDS.items():
        value = flags.get(param)
        if value is None or value == ():
            continue
        fields[name] = list(value) if isinstance(value, tuple) else value
    return fields


def _apply(
    entry: types_pb2.RegistrationEntry, fields: Mapping[str, Any], *, where: str, flags: bool
) -> None:
    """Overlay ``fields`` on ``entry``; a node-alias entry is parented to the server."""
    for name, value in fields.items():
        _set_field(entry, name, value)
    if fields.get("node_alias") and entry.spiffe_id:
        server_id = server_id_for(entry.spiffe_id)
        given_parent = fields.get("parent_id")
        if given_parent and given_parent != server_id:
            option = "--parent-id" if flags else "parent_id"
            raise CliError(
                f"{where}{option} must not be given for a node-alias entry "
                f"(its parent is the server, {server_id})"
            )
        entry.parent_id = server_id


def _check_complete(entry: types_pb2.RegistrationEntry, *, where: str, flags: bool) -> None:
    def name(field: str, flag: str) -> str:
        return flag if flags else field

    if not entry.spiffe_id:
        raise CliError(f"{where}{name('spiffe_id', '--spiffe-id')} is required")
    if not entry.parent_id:
        raise CliError(
            f"{where}{name('parent_id', '--parent-id')} is required "
            f"(or {name('node_alias', '--node')} for a node-alias entry)"
        )
    if not entry.selectors:
        raise CliError(f"{where}at least one {name('selectors', '--selector')} is required")


def _refuse_mixing(data: str | None, flags: Mapping[str, Any], also: Iterable[str] = ()) -> None:
    if data is None:
        return
    given = [p for p in (*_FLAG_FIELDS, *also) if flags.get(p) not in (None, ())]
    if given:
        option = _FLAG_NAMES.get(given[0], "--" + given[0].replace("_", "-"))
        raise CliError(f"--data cannot be combined with {option}; put the fields in the file")


def _entry_options(f: F) -> F:
    """The options that describe one entry, shared by create and update."""
    options = [
        click.option("--spiffe-id", type=SPIFFE_ID, help="SPIFFE ID the entry issues."),
        click.option("--parent-id", type=SPIFFE_ID, help="SPIFFE ID of the agent (parent)."),
        click.option(
            "--selector",
            "selectors",
            type=SELECTOR,
            multiple=True,
            help="Selector type:value (repeatable), e.g. unix:uid:1000.",
        ),
        click.option("--x509-svid-ttl", type=DURATION, help="X.509-SVID lifetime, e.g. 1h."),
        click.option("--jwt-svid-ttl", type=DURATION, help="JWT-SVID lifetime, e.g. 5m."),
        click.option("--dns", "dns_names", multiple=True, help="DNS name SAN (repeatable)."),
        click.option(
            "--admin/--no-admin",
            default=None,
            help="Not supported (the server refuses --admin); --no-admin clears the flag "
            "from an entry stored with it.",
        ),
        click.option(
            "--downstream/--no-downstream",
            default=None,
            help="Not supported (the server refuses --downstream); --no-downstream clears "
            "the flag from an entry stored with it.",
        ),
        click.option(
            "--node/--no-node",
            default=None,
            help="A node-alias entry: groups agents by selector; parent is the server.",
        ),
        click.option("--hint", help="Hint for workloads that get several identities."),
        click.option(
            "--expires-at", type=TIMESTAMP, help="Entry expiry: RFC 3339 or unix seconds."
        ),
        click.option(
            "--federates-with",
            type=TRUST_DOMAIN,
            multiple=True,
            help="Trust domain whose bundle workloads get (repeatable).",
        ),
        click.option(
            "--owner", help="Accountable person or team, e.g. alice@example.com; '' clears it."
        ),
        click.option("--purpose", help="What the identity is for (free text)."),
        click.option(
            "--data",
            metavar="FILE",
            help='JSON batch {"entries": [...]} with snake_case fields; - for stdin.',
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# --- commands --------------------------------------------------------------------------


@click.group()
def entry() -> None:
    """Create, update, delete and show registration entries."""


def _entries_out(output: str, entries: Iterable[types_pb2.RegistrationEntry]) -> None:
    items = list(entries)
    emit(output, {"entries": [message_to_dict(e) for e in items]}, render_entries(items))


@entry.command()
@admin_options
@_entry_options
def create(socket_path: str, output: str, data: str | None, **flags: Any) -> None:
    """Create registration entries (one from flags, or a batch with --data)."""
    _refuse_mixing(data, flags)
    batch: list[types_pb2.RegistrationEntry] = []
    if data is None:
        new = types_pb2.RegistrationEntry()
        _apply(new, _fields_from_flags(flags), where="", flags=True)
        _check_complete(new, where="", flags=True)
        batch.append(new)
    else:
        for i, doc in enumerate(_read_data(data)):
            parsed, given = entry_from_json(doc, i)
            where = f"--data: entry {i}: "
            new = types_pb2.RegistrationEntry()
            _apply(new, {g: getattr(parsed, g) for g in given}, where=where, flags=False)
            _check_complete(new, where=where, flags=False)
            batch.append(new)
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.entries.BatchCreateEntry,
            admin_pb2.BatchCreateEntryRequest(entries=batch),
            noun="entry",
        )
    _entries_out(output, reply.entries)


@entry.command()
@admin_options
@click.option("--id", "entry_id", help="ID of the entry to update.")
@_entry_options
def update(
    socket_path: str, output: str, entry_id: str | None, data: str | None, **flags: Any
) -> None:
    """Change the given fields of entries (by --id, or a batch with --data)."""
    _refuse_mixing(data, {**flags, "id": entry_id}, also=("id",))
    changes: list[tuple[str, dict[str, Any], str, bool]] = []
    if data is None:
        if not entry_id:
            raise CliError("--id is required (or --data FILE for a batch)")
        fields = _fields_from_flags(flags)
        if not fields:
            raise CliError("nothing to update: give at least one field, e.g. --selector")
        changes.append((entry_id, fields, "", True))
    else:
        for i, doc in enumerate(_read_data(data)):
            partial, given = entry_from_json(doc, i)
            if not partial.id:
                raise CliError(f"--data: entry {i}: id is required to update an entry")
            fields = {g: getattr(partial, g) for g in given if g != "id"}
            changes.append((partial.id, fields, f"--data: entry {i}: ", False))
    with AdminClient(socket_path) as client:
        batch = []
        for target_id, fields, where, from_flags in changes:
            current = client.call(
                client.entries.GetEntry, admin_pb2.GetEntryRequest(id=target_id), noun="entry"
            )
            _apply(current, fields, where=where, flags=from_flags)
            batch.append(current)
        reply = client.call(
            client.entries.BatchUpdateEntry,
            admin_pb2.BatchUpdateEntryRequest(entries=batch),
            noun="entry",
        )
    _entries_out(output, reply.entries)


@entry.command()
@admin_options
@click.option("--id", "entry_ids", multiple=True, required=True, help="Entry ID (repeatable).")
def delete(socket_path: str, output: str, entry_ids: tuple[str, ...]) -> None:
    """Delete registration entries by ID."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.entries.BatchDeleteEntry,
            admin_pb2.BatchDeleteEntryRequest(ids=list(entry_ids)),
            noun="entry",
        )
    deleted = [e.id for e in reply.entries] or list(entry_ids)
    emit(
        output,
        {"entries": [message_to_dict(e) for e in reply.entries]},
        "\n".join(f"Deleted entry {i}" for i in deleted),
    )


@entry.command()
@admin_options
@click.option("--id", "entry_id", required=True, help="ID of the entry to revoke.")
@click.option("--reason", default="", help="Why (kept with the revocation).")
def revoke(socket_path: str, output: str, entry_id: str, reason: str) -> None:
    """The kill switch: never issue for the entry again and revoke every unexpired
    X.509-SVID issued for it (they appear in the CRLs agents deliver to workloads).
    Revoking a revoked entry changes nothing; delete the entry to retire it."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.entries.RevokeEntry,
            admin_pb2.RevokeEntryRequest(id=entry_id, reason=reason),
            noun="entry",
        )
    emit(output, message_to_dict(reply), render_revocation(reply, f"Entry {entry_id}"))


@entry.command()
@admin_options
@click.option("--id", "entry_id", help="Show only this entry.")
@click.option("--spiffe-id", type=SPIFFE_ID, help="Only entries with this SPIFFE ID.")
@click.option("--parent-id", type=SPIFFE_ID, help="Only entries with this parent ID.")
@click.option(
    "--selector", "selectors", type=SELECTOR, multiple=True, help="Selector filter (repeatable)."
)
@click.option(
    "--match",
    type=click.Choice(MATCH_MODES),
    default="superset",
    show_default=True,
    help="How --selector filters match an entry's selectors.",
)
@click.option("--hint", help="Only entries with this hint.")
@click.option("--owner", help="Only entries owned by this person or team.")
def show(
    socket_path: str,
    output: str,
    entry_id: str | None,
    spiffe_id: str | None,
    parent_id: str | None,
    selectors: tuple[Selector, ...],
    match: str,
    hint: str | None,
    owner: str | None,
) -> None:
    """Show registration entries, all of them or those matching the filters."""
    with AdminClient(socket_path) as client:
        if entry_id:
            found = [
                client.call(
                    client.entries.GetEntry, admin_pb2.GetEntryRequest(id=entry_id), noun="entry"
                )
            ]
        else:
            filt = admin_pb2.ListEntriesRequest.Filter(
                by_spiffe_id=spiffe_id or "",
                by_parent_id=parent_id or "",
                by_selectors=[types_pb2.Selector(type=s.type, value=s.value) for s in selectors],
                selector_match=match if selectors else "",
                by_hint=hint or "",
                by_owner=owner or "",
            )
            found = []
            token = ""
            seen: set[str] = set()
            while True:
                reply = client.call(
                    client.entries.ListEntries,
                    admin_pb2.ListEntriesRequest(
                        filter=filt, page_size=PAGE_SIZE, page_token=token
                    ),
                    noun="entry",
                )
                found.extend(reply.entries)
                token = reply.next_page_token
                if not token or token in seen:
                    break
                seen.add(token)
    count = len(found)
    header = f"Found {count} {'entry' if count == 1 else 'entries'}"
    text = header if not found else header + "\n\n" + render_entries(found)
    emit(output, {"entries": [message_to_dict(e) for e in found]}, text)


@entry.command()
@admin_options
def count(socket_path: str, output: str) -> None:
    """Count registration entries."""
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.entries.CountEntries, admin_pb2.CountEntriesRequest(), noun="entry"
        )
    n = int(reply.count)
    emit(output, {"count": n}, f"{n} registration {'entry' if n == 1 else 'entries'}")
