"""``credo-server``: run the signing server and administer it over its admin socket.

Each command group lives in its own module; this one wires them together and holds the
one place where failures become a single ``Error: ...`` line and exit code 1.
"""

from __future__ import annotations

from typing import Any

import click
import grpc

from credo._cli import CliGroup
from server.cli.agent import agent
from server.cli.audit import audit
from server.cli.bundle import bundle
from server.cli.client import describe_rpc_error
from server.cli.delegation import delegation
from server.cli.entry import entry
from server.cli.errors import CliError
from server.cli.federation import federation
from server.cli.healthcheck import healthcheck
from server.cli.jwt import jwt
from server.cli.localauthority import localauthority
from server.cli.run import run
from server.cli.token import token
from server.cli.wit import wit
from server.cli.x509 import x509

__all__ = ["cli", "main"]


class CredoGroup(CliGroup):
    """The shared one-line error wrapper, plus the admin API's RPC errors described."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as exc:
            socket_path = str(ctx.find_root().params.get("socket_path") or "the admin socket")
            raise CliError(describe_rpc_error(exc, socket_path)) from None


@click.group(cls=CredoGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Credo signing server: issues SPIFFE identities to node agents and their workloads."""


for command in (
    run,
    healthcheck,
    entry,
    token,
    agent,
    bundle,
    federation,
    x509,
    jwt,
    wit,
    localauthority,
    audit,
    delegation,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point (``credo-server``)."""
    cli(prog_name="credo-server")


if __name__ == "__main__":
    main()
