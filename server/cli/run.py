"""``credo-server run``: load the config (defaults, ``--config`` file, flags) and serve."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from server.cli.errors import CliError
from server.config import KEY_TYPES, LOG_FORMATS, LOG_LEVELS, ConfigError, load_config
from server.paths import ADMIN_SOCKET_HELP

__all__ = ["SETTING_FLAGS", "config_from_flags", "run"]

# Every ServerConfig setting as (flag, click type, help); defaults live in ServerConfig.
SETTING_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("--trust-domain", str, "Trust domain name [default: example.org]."),
    (
        "--data-dir",
        str,
        "Directory for keys, the SQLite datastore and server.addr [default: ./.credo/server].",
    ),
    (
        "--bind-address",
        str,
        "Agent endpoint host:port; port 0 picks a free port [default: 0.0.0.0:8081].",
    ),
    (
        "--http-bind-address",
        str,
        "HTTP front end host:port ([server.http] bind_address); port 0 picks a free port, "
        "written to <data-dir>/http.addr [default: no HTTP front end].",
    ),
    ("--admin-socket", str, f"Admin API Unix socket [default: {ADMIN_SOCKET_HELP}]."),
    ("--datastore", str, "Datastore URL [default: SQLite in the data dir]."),
    ("--ca-ttl", str, "CA certificate lifetime [default: 24h]."),
    ("--x509-svid-ttl", str, "Default X.509-SVID lifetime [default: 1h]."),
    ("--jwt-svid-ttl", str, "Default JWT-SVID lifetime [default: 5m]."),
    ("--wit-svid-ttl", str, "WIT-SVID lifetime [default: 1h]."),
    ("--agent-svid-ttl", str, "Agent SVID lifetime [default: the X.509-SVID TTL]."),
    ("--ca-key-type", click.Choice(KEY_TYPES), "CA key type [default: ec-p256]."),
    ("--jwt-key-type", click.Choice(KEY_TYPES), "JWT signing key type [default: ec-p256]."),
    (
        "--jwt-issuer",
        str,
        "The 'iss' of every JWT-SVID and the OIDC discovery issuer, an https URL "
        "[default: none, tokens carry no 'iss'].",
    ),
    (
        "--bundle-refresh-hint",
        str,
        "The bundle's spiffe_refresh_hint, how often federated servers re-fetch it "
        "[default: a tenth of the CA TTL, at most 5m].",
    ),
    ("--upstream-ca-cert", str, "Upstream CA certificate (PEM); the CA becomes its intermediate."),
    ("--upstream-ca-key", str, "Upstream CA private key (PEM)."),
    ("--join-token-ttl", str, "Default join token lifetime [default: 600s]."),
    (
        "--join-token-max-ttl",
        str,
        "Longest join token lifetime `token generate --ttl` may ask for [default: 24h].",
    ),
    (
        "--crl-next-update",
        str,
        "How far ahead CRLs set nextUpdate; re-signed at half of it and on every revocation "
        "[default: 10m].",
    ),
    ("--log-level", click.Choice(LOG_LEVELS), "Log level [default: info]."),
    ("--log-format", click.Choice(LOG_FORMATS), "Log format [default: text]."),
    ("--metrics-address", str, "Prometheus endpoint host:port [default: disabled]."),
    (
        "--attestation-rate-limit",
        float,
        "Node attestations per second per source address [default: 1].",
    ),
    ("--signing-rate-limit", float, "Signing calls per second per agent [default: 500]."),
    (
        "--audit-checkpoint-interval",
        str,
        "How often the audit trail's head is signed into it, if it changed [default: 10m].",
    ),
    (
        "--rotation-check-interval",
        float,
        "Seconds between CA/JWT key rotation checks [default: 5].",
    ),
    (
        "--sync-heartbeat-interval",
        float,
        "Seconds of quiet after which an agent's entry stream carries a heartbeat (the "
        "server's event id and a digest of the agent's entries; 0: none) [default: 5].",
    ),
    (
        "--signing-workers",
        int,
        "Processes that check CSRs and sign large X.509-SVID batches; 0 signs in-process "
        "[default: min(2, CPUs)].",
    ),
    (
        "--require-entry-owner",
        bool,
        "Refuse registration entries without --owner [default: off].",
    ),
)


def _setting_name(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def config_from_flags(config_file: str | None, flags: dict[str, Any]) -> Any:
    """Defaults, then ``config_file``, then every flag that was given; ConfigError -> CliError."""
    overrides = {name: value for name, value in flags.items() if value is not None}
    try:
        return load_config(Path(config_file) if config_file else None, overrides)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _setting_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for flag, kind, help_text in reversed(SETTING_FLAGS):
        if kind is bool:  # an on/off switch: --x / --no-x
            decl = f"{flag}/--no-{flag.removeprefix('--')}"
            f = click.option(decl, _setting_name(flag), default=None, help=help_text)(f)
        else:
            f = click.option(flag, _setting_name(flag), type=kind, default=None, help=help_text)(f)
    return f


@click.command()
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    default=None,
    help="TOML config file; flags given on the command line override it.",
)
@_setting_options
@click.pass_context
def run(ctx: click.Context, /, config_file: str | None, **flags: Any) -> None:
    """Run the signing server until SIGTERM or SIGINT."""
    config = config_from_flags(config_file, flags)
    # The server's imports are heavy (datastore, CA); only `run` pays for them.
    server_app = importlib.import_module("server.app")
    ctx.exit(server_app.run(config))
