"""``credo-agent audit show|verify``: the agent's local log of SVID deliveries.

Reads the files under ``<data-dir>/audit/`` directly (:mod:`node_agent.audit_log`); the
agent need not be running.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from credo._audit import ChainBroken
from credo._cli import CliError
from node_agent.audit_log import read_records, verify_log
from node_agent.config import AgentConfig

__all__ = ["audit"]

_data_dir = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=str(AgentConfig.data_dir),
    show_default=True,
    help="The agent's data directory (its audit log is in <data-dir>/audit).",
)
_output = click.option(
    "--output", type=click.Choice(["text", "json"]), default="text", show_default=True
)


def _directory(data_dir: Path) -> Path:
    directory = data_dir / "audit"
    if not directory.is_dir():
        raise CliError(f"no audit log in {directory}: is --data-dir the agent's data directory?")
    return directory


@click.group()
def audit() -> None:
    """Show and verify the agent's local audit log of SVID deliveries."""


@audit.command()
@_data_dir
@_output
@click.option("--spiffe-id", help="Only deliveries of this SPIFFE ID.")
@click.option("--serial", help="Only deliveries of the X509-SVID with this serial (hex).")
def show(data_dir: Path, output: str, spiffe_id: str | None, serial: str | None) -> None:
    """Which process (pid, uid, selectors) was handed which SVID, oldest first."""
    try:
        records = read_records(_directory(data_dir))
    except ChainBroken as err:
        raise CliError(f"audit log is damaged: {err.problem}") from None
    if spiffe_id:
        records = [r for r in records if r.subject == spiffe_id]
    if serial:
        records = [r for r in records if r.target == serial.lower()]
    if output == "json":
        click.echo(json.dumps({"records": [r.to_dict() for r in records]}, indent=2))
        return
    click.echo(f"Found {len(records)} deliveries")
    for r in records:
        d = r.details_dict()
        click.echo(
            f"#{r.seq}  {r.time.isoformat(timespec='milliseconds')}  {r.action}  "
            f"{r.subject}  {('serial=' + r.target) if r.target else ''}  "
            f"pid={d.get('pid')} uid={d.get('uid')}"
        )


@audit.command()
@_data_dir
def verify(data_dir: Path) -> None:
    """Recompute the log's hash chain; name the first bad record and exit 1 if broken."""
    try:
        result = verify_log(_directory(data_dir))
    except ChainBroken as broken:
        raise CliError(f"audit log broken at record {broken.seq}: {broken.problem}") from None
    click.echo(
        f"audit log intact: {result.checked} records, head #{result.last_seq} {result.head_hash}"
    )
