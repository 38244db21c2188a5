"""``credo-agent``: run the node agent, check its health, and call the Workload API.

::

    credo-agent run [--config FILE] [--server-address HOST:PORT ...]
                    [--join-token-file FILE | --join-token -] ...   (or $CREDO_JOIN_TOKEN)
    credo-agent healthcheck [--admin-socket PATH] [--ready]
    credo-agent api ...            (node_agent.cli.api)
    credo-agent audit show|verify  (node_agent.cli.audit: the local log of SVID deliveries)

Every failure is one ``Error: ...`` line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from credo._cli import CliError, CliGroup, read_secret
from credo._paths import UnsafePath
from node_agent.cli.audit import audit
from node_agent.config import LOG_FORMATS, LOG_LEVELS, load_config
from node_agent.paths import (
    ADMIN_SOCKET_HELP,
    WORKLOAD_SOCKET_HELP,
    check_socket_to_dial,
    default_agent_admin_socket,
)
from node_agent.workload_api.admin import check_health

__all__ = ["cli", "main"]

_DEFAULT_ADMIN_SOCKET = str(default_agent_admin_socket())
JOIN_TOKEN_ENV = "CREDO_JOIN_TOKEN"

# Every scalar AgentConfig setting as (flag, setting, click type, help); defaults live in
# AgentConfig. Plugin tables ([agent.node_attestor.*], [agent.workload_attestor.*]) are
# config-file only.
SETTING_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--trust-domain", "trust_domain", str, "Trust domain name [default: example.org]."),
    (
        "--trust-bundle",
        "trust_bundle",
        str,
        "PEM bootstrap bundle to verify the server (credo-server bundle show --format pem).",
    ),
    (
        "--trust-bundle-url",
        "trust_bundle_url",
        str,
        "Fetch the bootstrap bundle over HTTPS (web PKI) from URL instead, e.g. the server's "
        "bundle endpoint https://<server>:<port>/bundle.",
    ),
    (
        "--trust-bundle-format",
        "trust_bundle_format",
        click.Choice(("pem", "spiffe")),
        "What --trust-bundle-url serves: pem, or spiffe (the bundle endpoint) [default: pem].",
    ),
    (
        "--socket",
        "socket_path",
        str,
        f"Workload API socket [default: {WORKLOAD_SOCKET_HELP}].",
    ),
    (
        "--admin-socket",
        "admin_socket",
        str,
        f"Admin (health) socket [default: {ADMIN_SOCKET_HELP}].",
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
        "Deprecated: set workload_size_limit in [agent.workload_attestor.unix]. Largest binary "
        "hashed for unix:sha256, bytes; 0 = no limit, <0 = never [default: 64 MiB].",
    ),
    (
        "--sync-backoff-min",
        "sync_backoff_min",
        float,
        "Backoff of sync reconnects and every retry to the server: start, s [default: 0.2].",
    ),
    (
        "--sync-backoff-max",
        "sync_backoff_max",
        float,
        "Backoff of sync reconnects and every retry to the server: cap, s [default: 30].",
    ),
    (
        "--metrics-address",
        "metrics_address",
        str,
        "Prometheus endpoint host:port (port 0: any free one) [default: disabled].",
    ),
    (
        "--svid-wait-timeout",
        "svid_wait_timeout",
        float,
        "How long a new workload waits for its SVIDs to be signed, s [default: 5].",
    ),
    (
        "--nice",
        "nice",
        click.IntRange(-20, 19),
        "Nice value of the agent (and of its session's autogroup when it leads its "
        "session) where it may set it (root) [default: -10].",
    ),
)


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    help="TOML config file ([agent] table or top level, plugin tables "
    "[agent.node_attestor.<name>] and [agent.workload_attestor.<name>]); flags override it.",
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
@click.option(
    "--join-token",
    "join_token",
    default=None,
    metavar="TOKEN",
    help="Join token for the first node attestation; '-' reads it from stdin. A token on "
    f"the command line is visible to every local user in `ps`: prefer --join-token-file or "
    f"${JOIN_TOKEN_ENV}.",
)
@click.option(
    "--join-token-file",
    default=None,
    metavar="FILE",
    help=f"Read the join token from FILE ('-': stdin). Without either flag, ${JOIN_TOKEN_ENV} "
    "is used if set.",
)
@_setting_options
def run(
    config_file: str | None,
    server_addresses: tuple[str, ...],
    join_token: str | None,
    join_token_file: str | None,
    **flags: Any,
) -> None:
    """Run the agent: attest, sync entries, and serve the Workload API until SIGTERM."""
    overrides = {name: value for name, value in flags.items() if value is not None}
    if server_addresses:
        overrides["server_addresses"] = server_addresses
    token = read_secret(join_token, join_token_file, flag="join-token", env=JOIN_TOKEN_ENV)
    if token is not None:
        overrides["join_token"] = token
    config = load_config(Path(config_file) if config_file else None, overrides)
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
@click.option(
    "--ready",
    is_flag=True,
    help="Check readiness instead of liveness: also that the first entry sync has completed "
    "and the agent SVID is valid.",
)
def healthcheck(admin_socket: str, timeout: float, ready: bool) -> None:
    """Check that the agent is live (default) or ready (--ready); exit 1 with why if not.

    Live: the agent answers on its admin socket, and its Workload API answers a real call
    the agent makes through its own public socket (relay, internal socket, attestation).
    Ready: live, the first entry sync from the server has completed, and the agent SVID
    has not expired. An agent cut off from its server stays ready while it serves its
    cache. Run it as the agent's user (or root): the admin socket is private to it. A
    socket under a directory another user owns is refused before connecting.
    """
    try:
        check_socket_to_dial(admin_socket, "admin socket directory")
    except UnsafePath as err:
        raise CliError(str(err)) from None
    check_health(admin_socket, timeout, ready=ready)
    click.echo("agent is ready" if ready else "agent is healthy")


def _mount_api() -> None:
    """Mount ``credo-agent api`` (node_agent.cli.api) when it is importable."""
    try:
        from node_agent.cli.api import api
    except ImportError:  # pragma: no cover - only while that module is being written
        return
    cli.add_command(api)


_mount_api()
cli.add_command(audit)


def main() -> None:
    """Console-script entry point (``credo-agent``)."""
    cli(prog_name="credo-agent")


if __name__ == "__main__":
    main()
