"""``credo-server``: run the signing server and administer it over its admin socket.

Each command group lives in its own module; this one wires them together and holds the
one place where failures become a single ``Error: ...`` line and exit code 1.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

import click
import grpc

from credo._cli import CliGroup
from server.cli.client import describe_rpc_error
from server.cli.errors import CliError

__all__ = ["cli", "main"]


class CredoGroup(CliGroup):
    """The shared one-line error wrapper, plus the admin API's RPC errors described."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as exc:
            socket_path = str(ctx.find_root().params.get("socket_path") or "the admin socket")
            raise CliError(describe_rpc_error(exc, socket_path)) from None


# Each command's module, imported only when that command runs (or help lists it): one
# ``credo-server entry show`` should not pay for importing the server itself.
_COMMANDS: dict[str, str] = {
    "run": "server.cli.run",
    "healthcheck": "server.cli.healthcheck",
    "entry": "server.cli.entry",
    "token": "server.cli.token",
    "agent": "server.cli.agent",
    "bundle": "server.cli.bundle",
    "federation": "server.cli.federation",
    "x509": "server.cli.x509",
    "jwt": "server.cli.jwt",
    "wit": "server.cli.wit",
    "localauthority": "server.cli.localauthority",
    "audit": "server.cli.audit",
    "delegation": "server.cli.delegation",
}


class _LazyCredoGroup(CredoGroup):
    """:class:`CredoGroup` whose commands are loaded from their modules on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = _COMMANDS.get(cmd_name)
        if module is None:
            return None
        command = getattr(import_module(module), cmd_name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyCredoGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Credo signing server: issues SPIFFE identities to node agents and their workloads."""


def main() -> None:
    """Console-script entry point (``credo-server``)."""
    cli(prog_name="credo-server")


if __name__ == "__main__":
    main()
