"""``credo-server audit show|trace|verify|export|prune``: the hash-chained audit trail.

``show`` lists records by identity, person, action and time; ``trace`` tells the life
of one identity in time order; ``verify`` has the server recompute the whole chain (or,
with ``--file``, checks an export here, without a server); ``export`` writes JSON Lines
that ``verify --file`` checks; ``prune`` deletes old records, leaving the rest
verifiable. A broken chain names the first bad record and exits 1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from credo._proto.credo.server.v1 import admin_pb2
from server.audit import Actor, AuditRecord, ChainBroken, VerifyResult, verify_trail
from server.audit.checkpoint import checkpoint_verifier
from server.audit.records import FORMAT
from server.cli.client import DEFAULT_SOCKET, SOCKET_ENV, AdminClient
from server.cli.errors import CliError
from server.cli.output import emit
from server.cli.params import SPIFFE_ID, TIMESTAMP, admin_options

__all__ = ["audit"]

PAGE_SIZE = 5000
_EXPORT_KIND = "credo-audit-export"


def _record(pb: admin_pb2.AuditRecord) -> AuditRecord:
    return AuditRecord(
        seq=int(pb.seq),
        time_ms=int(pb.time_ms),
        actor=Actor(pb.actor_kind, pb.actor),  # type: ignore[arg-type]
        action=pb.action,
        subject=pb.subject,
        target=pb.target,
        owner=pb.owner,
        outcome=pb.outcome,
        reason=pb.reason,
        request_id=pb.request_id,
        details=pb.details,
        prev_hash=pb.prev_hash,
        hash=pb.hash,
    )


def _fetch(
    client: AdminClient, request: admin_pb2.ListAuditRecordsRequest
) -> Iterator[AuditRecord]:
    """Every record matching ``request``, page after page, in seq order."""
    request.page_size = PAGE_SIZE
    while True:
        reply = client.call(client.audit.ListAuditRecords, request, noun="audit record")
        for pb in reply.records:
            yield _record(pb)
        if not reply.next_after_seq:
            return
        request.after_seq = reply.next_after_seq


def _check_window(since: int | None, until: int | None) -> None:
    if since is not None and since > time.time():
        raise CliError(
            "--since is in the future: no record can be that new (expected a time up to now)"
        )
    if since is not None and until is not None and until <= since:
        raise CliError("--until must be later than --since")


def _actor_text(rec: AuditRecord) -> str:
    return f"{rec.actor.kind} {rec.actor.id}".rstrip()


def _line(rec: AuditRecord) -> str:
    """One record on one line: when, what, outcome, by whom, on what, details."""
    when = rec.time.strftime("%Y-%m-%dT%H:%M:%S.") + f"{rec.time_ms % 1000:03d}Z"
    parts = [f"#{rec.seq}", when, rec.action, rec.outcome, f"by {_actor_text(rec)}"]
    if rec.subject:
        parts.append(f"subject={rec.subject}")
    if rec.target:
        parts.append(f"target={rec.target}")
    if rec.owner:
        parts.append(f"owner={rec.owner}")
    if rec.reason:
        parts.append(f"reason={rec.reason!r}")
    if rec.details not in ("", "{}"):
        parts.append(rec.details)
    return "  ".join(parts)


@click.group()
def audit() -> None:
    """Show, trace, verify, export and prune the tamper-evident audit trail."""


@audit.command()
@admin_options
@click.option("--spiffe-id", type=SPIFFE_ID, help="Records whose subject or actor is this ID.")
@click.option("--person", "owner", help="Records about identities this person owns.")
@click.option("--action", help="An action (entry.create) or a prefix ending in '.' (entry.).")
@click.option("--since", type=TIMESTAMP, help="From this time (RFC 3339 or unix seconds).")
@click.option("--until", type=TIMESTAMP, help="Before this time (RFC 3339 or unix seconds).")
def show(
    socket_path: str,
    output: str,
    spiffe_id: str | None,
    owner: str | None,
    action: str | None,
    since: int | None,
    until: int | None,
) -> None:
    """List audit records, oldest first."""
    _check_window(since, until)
    request = admin_pb2.ListAuditRecordsRequest(
        by_spiffe_id=spiffe_id or "",
        by_owner=owner or "",
        by_action=action or "",
        since_ms=(since or 0) * 1000,
        until_ms=(until or 0) * 1000,
    )
    with AdminClient(socket_path) as client:
        found = list(_fetch(client, request))
    n = len(found)
    text = "\n".join([f"Found {n} audit {'record' if n == 1 else 'records'}", *map(_line, found)])
    emit(output, {"records": [r.to_dict() for r in found]}, text)


def _parents(records: list[AuditRecord]) -> set[str]:
    """The parent IDs (agents) named by the entry records among ``records``."""
    out: set[str] = set()
    for rec in records:
        if rec.action.startswith("entry."):
            parent = rec.details_dict().get("parent_id")
            if isinstance(parent, str) and parent:
                out.add(parent)
    return out


@audit.command()
@admin_options
@click.option("--spiffe-id", type=SPIFFE_ID, required=True, help="The identity to trace.")
def trace(socket_path: str, output: str, spiffe_id: str) -> None:
    """The life of one identity in time order: who registered it, on which node it was
    attested, its credentials (serials, jti, lifetimes), who acted as it, its removal."""
    with AdminClient(socket_path) as client:
        own = list(_fetch(client, admin_pb2.ListAuditRecordsRequest(by_spiffe_id=spiffe_id)))
        found = {r.seq: r for r in own}
        for parent in sorted(_parents(own)):
            request = admin_pb2.ListAuditRecordsRequest(by_spiffe_id=parent, by_action="agent.")
            for rec in _fetch(client, request):
                if rec.subject == parent:
                    found.setdefault(rec.seq, rec)
    ordered = [found[seq] for seq in sorted(found)]
    lines = [f"Trace of {spiffe_id}: {len(ordered)} records"]
    for rec in ordered:
        note = "  (its parent)" if rec.subject != spiffe_id and rec.actor.id != spiffe_id else ""
        lines.append(_line(rec) + note)
    emit(
        output,
        {"spiffe_id": spiffe_id, "records": [r.to_dict() for r in ordered]},
        "\n".join(lines),
    )


def _export_line(rec: AuditRecord) -> str:
    data = rec.to_dict()
    data["details"] = rec.details  # the exact hashed text, so the export verifies
    del data["time"]
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@audit.command()
@click.option(
    "--socket",
    "socket_path",
    envvar=SOCKET_ENV,
    default=DEFAULT_SOCKET,
    show_default=True,
    metavar="PATH",
    help="Path to the server's admin socket (env CREDO_SERVER_SOCKET).",
)
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here (created 0600) instead of standard output.",
)
def export(socket_path: str, path: Path | None) -> None:
    """Write the whole trail as JSON Lines: a header line, then one record per line."""
    with AdminClient(socket_path) as client:
        # Sign the head first, so everything exported is covered by a checkpoint.
        signed = client.call(client.audit.CheckpointAudit, admin_pb2.CheckpointAuditRequest())
        records = [
            r
            for r in _fetch(client, admin_pb2.ListAuditRecordsRequest())
            if r.seq <= signed.seq  # records written since come in the next export
        ]
    header = {
        "kind": _EXPORT_KIND,
        "format": FORMAT,
        "exported_at_ms": int(time.time() * 1000),
        "records": len(records),
        "head_hash": records[-1].hash if records else "",
    }
    lines = [json.dumps(header, sort_keys=True, separators=(",", ":"))]
    lines.extend(_export_line(r) for r in records)
    text = "\n".join(lines) + "\n"
    if path is None:
        click.echo(text, nl=False)
        return
    try:
        with open(path, "x", encoding="utf-8", opener=_private_opener) as f:
            f.write(text)
    except FileExistsError:
        raise CliError(f"{path} exists; choose a new file (an export never overwrites)") from None
    except OSError as err:
        raise CliError(f"cannot write {path}: {err.strerror}") from None
    click.echo(f"Exported {len(records)} audit records to {path}", err=True)


def _private_opener(file: str, flags: int) -> int:
    return os.open(file, flags, 0o600)


def _from_export(number: int, line: str) -> AuditRecord:
    try:
        data: Any = json.loads(line)
        return AuditRecord(
            seq=int(data["seq"]),
            time_ms=int(data["time_ms"]),
            actor=Actor(str(data["actor_kind"]), str(data["actor"])),  # type: ignore[arg-type]
            action=str(data["action"]),
            subject=str(data["subject"]),
            target=str(data["target"]),
            owner=str(data["owner"]),
            outcome=str(data["outcome"]),
            reason=str(data["reason"]),
            request_id=str(data["request_id"]),
            details=str(data["details"]),
            prev_hash=str(data["prev_hash"]),
            hash=str(data["hash"]),
        )
    except (ValueError, KeyError, TypeError):
        raise CliError(
            f"audit export line {number} is not an audit record (damaged or edited): "
            "the export does not verify"
        ) from None


def _verify_file(path: Path, roots: bytes | None) -> VerifyResult:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text: the export does not verify") from None
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from None
    if not lines:
        raise CliError(f"{path} is empty; expected an export from 'credo-server audit export'")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("kind") != _EXPORT_KIND:
        raise CliError(f"{path} line 1 is not an audit export header: the export does not verify")
    if header.get("format") != FORMAT:
        raise CliError(f"{path} is in format {header.get('format')!r}; expected {FORMAT!r}")
    records = [_from_export(i, line) for i, line in enumerate(lines[1:], start=2)]
    result = verify_trail(records, on_checkpoint=checkpoint_verifier(roots))
    if header.get("records") != len(records) or header.get("head_hash", "") != (
        result.head_hash if records else ""
    ):
        raise ChainBroken(
            result.last_seq + 1,
            f"the export's header names {header.get('records')} records ending in "
            f"{str(header.get('head_hash'))[:16]}..., but {len(records)} are here "
            "(records removed from or added to the end)",
            checked=result.checked,
        )
    if roots is not None and result.signed_through < result.last_seq - 1:
        raise ChainBroken(
            result.signed_through + 1,
            "no signed checkpoint covers the records from here on (the export must end "
            "with the checkpoint 'audit export' makes)",
            checked=result.checked,
        )
    return result


@audit.command()
@admin_options
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Check this export (from 'audit export') here, without contacting the server.",
)
@click.option(
    "--bundle",
    "bundle_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --file: the trust domain's X.509 authorities (PEM, from 'bundle show'); "
    "checkpoints must be signed by the trust domain's server.",
)
def verify(socket_path: str, output: str, path: Path | None, bundle_path: Path | None) -> None:
    """Recompute the hash chain; name the first bad record and exit 1 if it is broken."""
    if bundle_path is not None and path is None:
        raise CliError("--bundle checks an export: give --file too")
    if path is not None:
        roots = None
        if bundle_path is not None:
            try:
                roots = bundle_path.read_bytes()
            except OSError as err:
                raise CliError(f"cannot read {bundle_path}: {err.strerror}") from None
        try:
            result = _verify_file(path, roots)
        except ChainBroken as broken:
            _broken(output, broken.seq, broken.problem, broken.checked)
        _intact(
            output,
            result.checked,
            result.last_seq,
            result.head_hash,
            f"{path}: ",
            result.checkpoints,
            result.signed_through,
            signers_checked=roots is not None,
        )
        return
    with AdminClient(socket_path) as client:
        reply = client.call(client.audit.VerifyAudit, admin_pb2.VerifyAuditRequest())
    if not reply.ok:
        _broken(output, int(reply.first_bad_seq), reply.problem, int(reply.checked))
    _intact(
        output,
        int(reply.checked),
        int(reply.last_seq),
        reply.head_hash,
        "",
        int(reply.checkpoints),
        int(reply.signed_through),
    )


def _intact(
    output: str,
    checked: int,
    last_seq: int,
    head: str,
    where: str,
    checkpoints: int,
    signed_through: int,
    *,
    signers_checked: bool = False,
) -> None:
    signed = (
        f"; {checkpoints} signed checkpoints, the newest covering #{signed_through}"
        if checkpoints
        else "; no signed checkpoint yet"
    )
    if checkpoints and not signers_checked and where:
        signed += " (signatures checked; give --bundle to check who signed)"
    emit(
        output,
        {
            "ok": True,
            "checked": checked,
            "last_seq": last_seq,
            "head_hash": head,
            "checkpoints": checkpoints,
            "signed_through": signed_through,
        },
        f"{where}audit chain intact: {checked} records, head #{last_seq} {head}{signed}",
    )


def _broken(output: str, seq: int, problem: str, checked: int) -> None:
    if output == "json":
        click.echo(
            json.dumps(
                {"ok": False, "checked": checked, "first_bad_seq": seq, "problem": problem},
                indent=2,
            )
        )
    raise CliError(f"audit chain broken at record {seq}: {problem}")


@audit.command()
@admin_options
@click.option(
    "--before-seq",
    type=int,
    required=True,
    help="The first record to keep; every older one is deleted (export them first).",
)
def prune(socket_path: str, output: str, before_seq: int) -> None:
    """Delete old records; an audit.prune record keeps the rest verifiable."""
    if before_seq < 2:
        raise CliError(
            f"--before-seq must be 2 or more (the first record to keep), not {before_seq}"
        )
    with AdminClient(socket_path) as client:
        reply = client.call(
            client.audit.PruneAudit,
            admin_pb2.PruneAuditRequest(before_seq=before_seq),
            noun="audit record",
        )
    n = int(reply.pruned)
    emit(output, {"pruned": n}, f"Pruned {n} audit {'record' if n == 1 else 'records'}")
