"""``credo-agent``: run the node agent, check its health, and call the Workload API.

::

    credo-agent run [--config FILE] [--server-address HOST:PORT ...] [--join-token T] ...
    credo-agent healthcheck [--admin-socket PATH]
    credo-agent api ...            (node_agent.cli.api)

Every failure is one ``Error: ...`` line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from credo.errors import CredoError
from node_agent.config import LOG_FORMATS, LOG_LEVELS, AgentConfig, load_config

__all__ = ["cli", "main"]

_DEFAULT_ADMIN_SOCKET = str(AgentConfig.admin_socket)

# Every AgentConfig setting as (flag, setting, click type, help); defaults live in AgentConfig.
SETTING_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--trust-domain", "trust_domain", str, "Trust domain name [default: example.org]."),
    (
        "--trust-bundle",
        "trust_bundle",
        str,
        "PEM bootstrap bundle to verify the server (credo-server bundle show --format pem).",
    ),
    ("--join-token", "join_token", str, "Join token for the first node attestation."),
    (
        "--socket",
        "socket_path",
        str,
        "Workload API socket [default: /tmp/credo-agent/public/api.sock].",
    ),
    (
        "--admin-socket",
        "admin_socket",
        str,
        f"Admin (health) socket [default: {_DEFAULT_ADMIN_SOCKET}].",
    ),
    (
        "--data-dir",
        "data_dir",
        str,
        "Where the agent SVID and key are kept [default: ./.credo/agent].",
    ),
    ("--log-level", "log_level", click.Choice(LOG_LEVELS), "Log level [default: info]."),
    ("--log-format", "log_format", click.Choice(LOG_FORMATS), "Log format [default: text]."),
    (
        "--svid-cache-size",
        "svid_cache_max_size",
        int,
        "Most X509-SVIDs kept in the cache (LRU) [default: 1000].",
    ),
    (
        "--workload-size-limit",
        "workload_size_limit",
        int,
        "Largest binary hashed for unix:sha256, bytes; 0 = no limit, <0 = never [default: 64 MiB].",
    ),
    (
        "--sync-backoff-min",
        "sync_backoff_min",
        float,
        "Sync reconnect backoff start, s [default: 0.2].",
    ),
    (
        "--sync-backoff-max",
        "sync_backoff_max",
        float,
        "Sync reconnect backoff cap, s [default: 30].",
    ),
    (
        "--svid-wait-timeout",
        "svid_wait_timeout",
        float,
        "How long a new workload waits for its SVIDs to be signed, s [default: 5].",
    ),
)


class CliError(click.ClickException):
    """A failure to report as one line on stderr with exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class _AgentGroup(click.Group):
    """A click group that reports expected failures as one line, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CredoError as exc:
            raise CliError(str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise
            reason = exc.strerror or str(exc)
            raise CliError(f"{reason}: {exc.filename}" if exc.filename else reason) from None
        except ValueError as exc:
            raise CliError(str(exc)) from None


@click.group(cls=_AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Credo node agent: attests local workloads and serves them SPIFFE identities."""


def _setting_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for flag, name, kind, help_text in reversed(SETTING_FLAGS):
        f = click.option(flag, name, type=kind, default=None, help=help_text)(f)
    return f


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file ([agent] table or top level); flags override it.",
)
@click.option(
    "--server-address",
    "server_addresses",
    multiple=True,
    help="Signing server host:port; repeat for several (the agent fails over).",
)
@click.option(
    "--insecure-bootstrap",
    is_flag=True,
    default=None,
    help="Trust the server certificate unverified for the first attestation (not production).",
)
@_setting_options
def run(config_file: str | None, server_addresses: tuple[str, ...], **flags: Any) -> None:
    """Run the agent: attest, sync entries, and serve the Workload API until SIGTERM."""
    overrides = {name: value for name, value in flags.items() if value is not None}
    if server_addresses:
        overrides["server_addresses"] = server_addresses
    try:
        config = load_config(Path(config_file) if config_file else None, overrides)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    from node_agent.app import run as run_agent

    sys.exit(run_agent(config))


@cli.command()
@click.option(
    "--admin-socket",
    "admin_socket",
    default=_DEFAULT_ADMIN_SOCKET,
    show_default=True,
    help="The agent's admin socket.",
)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait.")
def healthcheck(admin_socket: str, timeout: float) -> None:
    """Check that the agent is up and serving; exit 1 if not."""
    target = f"unix://{Path(admin_socket).expanduser().resolve()}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            raise CliError(
                f"agent is unhealthy: cannot reach its admin socket {admin_socket} ({code})"
            ) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise CliError(f"agent is unhealthy: status {status}")
    click.echo("agent is healthy")


def _mount_api() -> None:
    """Mount ``credo-agent api`` (node_agent.cli.api) when it is importable."""
    try:
        from node_agent.cli.api import api
    except ImportError:  # pragma: no cover - only while that module is being written
        return
    cli.add_command(api)


_mount_api()


def main() -> None:
    """Console-script entry point (``credo-agent``)."""
    cli(prog_name="credo-agent")


if __name__ == "__main__":
    main()
