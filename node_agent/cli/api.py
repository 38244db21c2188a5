"""``credo-agent api ...``: call the Workload API as the current process, like ``spire-agent api``.

::

    credo-agent api fetch x509 [--write DIR]
    credo-agent api fetch jwt --audience A [--audience B] [--spiffe-id ID]
    credo-agent api fetch jwt-bundle
    credo-agent api validate jwt --audience A (--svid-file FILE | --svid - | $CREDO_JWT_SVID)
    credo-agent api watch

Errors print one line on stderr and exit 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from credo._cli import CliError, read_secret
from credo._files import write_atomically
from credo.bundle import BundleSet
from credo.errors import CredoError, WorkloadApiError
from credo.token_exchange import TokenExchangeClient
from credo.witsvid import private_key_to_jwk
from credo.workload_client import ENDPOINT_ENV, WorkloadApiClient, X509Context, grpc_target
from node_agent.paths import check_socket_to_dial, workload_socket_to_dial

__all__ = ["api"]


def _default_socket() -> str:
    return f"unix://{workload_socket_to_dial()}"


SVID_ENV = "CREDO_JWT_SVID"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class _Options:
    socket: str
    output: str
    timeout: float


def _common(f: F) -> F:
    """The options every ``api`` command takes."""
    f = click.option(
        "--timeout",
        type=float,
        default=5.0,
        show_default=True,
        help="Seconds to wait for the Workload API.",
    )(f)
    f = click.option(
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Output format.",
    )(f)
    f = click.option(
        "--socket",
        "socket_path",
        envvar=ENDPOINT_ENV,
        default=_default_socket,
        show_default="unix:///run/credo-agent/public/api.sock if it exists, else "
        "unix:///tmp/credo-agent/public/api.sock",
        help=f"Workload API address (unix:///path or tcp://IP:port; env {ENDPOINT_ENV}). "
        "A socket under a directory another user could replace is refused.",
    )(f)
    return f


class _Fail(click.ClickException):
    """One-line error on stderr, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.message}", err=True)


def _unreachable(socket_path: str) -> str | None:
    """Why the Workload API socket cannot be opened, or None when it can."""
    target = grpc_target(socket_path)
    if not target.startswith("unix:"):
        return None  # tcp: gRPC's own words say it
    path = target.removeprefix("unix:")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except FileNotFoundError:
        return f"no Workload API socket at {path}: is credo-agent running?"
    except ConnectionRefusedError:
        return f"nothing listens on the Workload API socket {path}: is credo-agent running?"
    except PermissionError:
        return f"permission denied opening the Workload API socket {path}"
    except OSError as err:
        return f"cannot open the Workload API socket {path}: {err.strerror or err}"
    finally:
        probe.close()
    return None


def _check_socket(socket_path: str) -> None:
    """Refuse a socket someone could have planted: another user owns a directory on the way
    (:func:`~node_agent.paths.check_socket_to_dial`); raises an OSError saying which."""
    target = grpc_target(socket_path)
    if target.startswith("unix:"):
        path = target.removeprefix("unix:")
        check_socket_to_dial(path, "Workload API socket directory", agent_owned=True)


@contextlib.contextmanager
def _client(socket_path: str, timeout: float | None) -> Iterator[WorkloadApiClient]:
    try:
        _check_socket(socket_path)
        with WorkloadApiClient(socket_path, timeout=timeout) as client:
            yield client
    except WorkloadApiError as err:
        if err.code == "UNAVAILABLE":
            why = _unreachable(socket_path)
            if why is None:
                # The agent answered: say what it said, not that it is not running.
                raise _Fail(f"the Workload API at {socket_path}: {err.message}") from None
            raise _Fail(why) from None
        if err.code == "PERMISSION_DENIED":
            raise _Fail(
                f"no identity for this process ({err.message}): is there a registration "
                "entry whose selectors match it?"
            ) from None
        raise _Fail(str(err).replace("\n", " ")) from None
    except CredoError as err:
        raise _Fail(str(err).replace("\n", " ")) from None
    except OSError as err:
        raise _Fail(f"{err.strerror or err}") from None


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _x509_json(ctx: X509Context) -> dict[str, Any]:
    return {
        "svids": [
            {
                "spiffe_id": str(s.spiffe_id),
                "hint": s.hint,
                "expires_at": _iso(s.expires_at),
                "chain_pem": s.marshal_chain_pem().decode(),
            }
            for s in ctx.svids
        ],
        "bundles": {td.id_string(): b.marshal_pem().decode() for td, b in ctx.bundles.items()},
    }


def _print_x509(ctx: X509Context, output: str) -> None:
    if output == "json":
        click.echo(json.dumps(_x509_json(ctx), indent=2))
        return
    click.echo(f"Received {len(ctx.svids)} svid(s)")
    for svid in ctx.svids:
        click.echo("")
        click.echo(f"SPIFFE ID:\t\t{svid.spiffe_id}")
        click.echo(f"SVID Valid After:\t{_iso(svid.leaf.not_valid_before_utc)}")
        click.echo(f"SVID Valid Until:\t{_iso(svid.expires_at)}")
        if svid.hint:
            click.echo(f"Hint:\t\t\t{svid.hint}")
    for td in sorted(ctx.bundles, key=str):
        click.echo(f"Bundle: {td.id_string()} ({len(ctx.bundles[td].x509_authorities)} CA(s))")


def _write_private(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` atomically (temp file + rename) with ``mode``."""
    write_atomically(path, data, mode)


def _write_x509(ctx: X509Context, directory: str) -> list[str]:
    """Write svid.<i>.pem/.key, bundle.<i>.pem and federated_bundle.<i>.<n>.pem."""
    os.makedirs(directory, exist_ok=True)
    written: list[str] = []
    for i, svid in enumerate(ctx.svids):
        own = svid.spiffe_id.trust_domain
        files: list[tuple[str, bytes, int]] = [
            (f"svid.{i}.pem", svid.marshal_chain_pem(), 0o644),
            (f"svid.{i}.key", svid.marshal_key_pem(), 0o600),
        ]
        bundle = ctx.bundles.get_bundle_for_trust_domain(own)
        if bundle is not None:
            files.append((f"bundle.{i}.pem", bundle.marshal_pem(), 0o644))
        federated = sorted((td for td in ctx.bundles if td != own), key=str)
        for n, td in enumerate(federated):
            files.append((f"federated_bundle.{i}.{n}.pem", ctx.bundles[td].marshal_pem(), 0o644))
        for name, data, mode in files:
            path = os.path.join(directory, name)
            _write_private(path, data, mode)
            written.append(path)
    return written


@click.group(name="api")
def api() -> None:
    """Call the Workload API as this process (fetch, validate, watch)."""


@api.group()
def fetch() -> None:
    """Fetch SVIDs or bundles."""


@fetch.command("x509")
@_common
@click.option(
    "--write", "write_dir", type=click.Path(file_okay=False), help="Write PEM files here."
)
def fetch_x509(socket_path: str, output: str, timeout: float, write_dir: str | None) -> None:
    """Fetch this process's X509-SVIDs and bundles."""
    with _client(socket_path, timeout) as client:
        ctx = client.fetch_x509_context()
    _print_x509(ctx, output)
    if write_dir is not None:
        try:
            written = _write_x509(ctx, write_dir)
        except OSError as err:
            raise _Fail(f"cannot write to {write_dir}: {err.strerror or err}") from None
        if output == "text":
            click.echo("")
            for path in written:
                click.echo(f"Wrote {path}")


@fetch.command("jwt")
@_common
@click.option("--audience", "-a", multiple=True, required=True, help="Audience (repeatable).")
@click.option("--spiffe-id", default=None, help="Only this identity's JWT-SVID.")
def fetch_jwt(
    socket_path: str, output: str, timeout: float, audience: tuple[str, ...], spiffe_id: str | None
) -> None:
    """Fetch JWT-SVIDs for an audience (prints the tokens: they are yours)."""
    with _client(socket_path, timeout) as client:
        svids = client.fetch_jwt_svids(list(audience), spiffe_id)
    if output == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "spiffe_id": str(s.spiffe_id),
                        "svid": s.token,
                        "expires_at": _iso(s.expires_at),
                    }
                    for s in svids
                ],
                indent=2,
            )
        )
        return
    for s in svids:
        click.echo(f"token({s.spiffe_id}):\n\t{s.token}")


def _print_jwt_bundles(bundles: BundleSet, output: str) -> None:
    docs = {td.id_string(): json.loads(b.jwt_bundle().marshal()) for td, b in bundles.items()}
    if output == "json":
        click.echo(json.dumps(docs, indent=2))
        return
    for key in sorted(docs):
        click.echo(f"bundle({key}):\n\t{json.dumps(docs[key])}")


@fetch.command("jwt-bundle")
@_common
def fetch_jwt_bundle(socket_path: str, output: str, timeout: float) -> None:
    """Fetch the JWT bundles (JWKS) of the own and federated trust domains."""
    with _client(socket_path, timeout) as client:
        bundles = client.fetch_jwt_bundles()
    _print_jwt_bundles(bundles, output)


@fetch.command("wit")
@_common
@click.option(
    "--write",
    "write_dir",
    type=click.Path(file_okay=False),
    help="Write wit.<i>.jwt and wit.<i>.key.jwk (0600) here.",
)
def fetch_wit(socket_path: str, output: str, timeout: float, write_dir: str | None) -> None:
    """Fetch WIT-SVIDs (prints the tokens, not the keys: use --write for those)."""
    with _client(socket_path, timeout) as client:
        wits = client.fetch_wit_svids()
    if output == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "spiffe_id": str(w.svid.spiffe_id),
                        "wit_svid": w.svid.token,
                        "expires_at": _iso(w.svid.expires_at),
                        "hint": w.hint,
                    }
                    for w in wits
                ],
                indent=2,
            )
        )
    else:
        for w in wits:
            click.echo(f"wit({w.svid.spiffe_id}):\n\t{w.svid.token}")
            click.echo(f"\texpires at {_iso(w.svid.expires_at)}")
    if write_dir is not None:
        try:
            os.makedirs(write_dir, exist_ok=True)
            written = []
            for i, w in enumerate(wits):
                for name, data in (
                    (f"wit.{i}.jwt", w.svid.token.encode()),
                    (f"wit.{i}.key.jwk", private_key_to_jwk(w.private_key).encode()),
                ):
                    path = os.path.join(write_dir, name)
                    _write_private(path, data, 0o600)
                    written.append(path)
        except OSError as err:
            raise _Fail(f"cannot write to {write_dir}: {err.strerror or err}") from None
        if output == "text":
            for path in written:
                click.echo(f"Wrote {path}")


@fetch.command("wit-bundle")
@_common
def fetch_wit_bundle(socket_path: str, output: str, timeout: float) -> None:
    """Fetch the WIT bundles (JWKS of wit-svid keys) of the own and federated trust domains."""
    with _client(socket_path, timeout) as client:
        bundles = client.fetch_wit_bundles()
    docs = {td.id_string(): json.loads(b.wit_bundle().marshal()) for td, b in bundles.items()}
    if output == "json":
        click.echo(json.dumps(docs, indent=2))
        return
    for key in sorted(docs):
        click.echo(f"bundle({key}):\n\t{json.dumps(docs[key])}")


@api.group()
def validate() -> None:
    """Validate SVIDs."""


@validate.command("jwt")
@_common
@click.option("--audience", "-a", required=True, help="The audience the token must name.")
@click.option(
    "--svid",
    default=None,
    metavar="TOKEN",
    help="The JWT-SVID to validate; '-' reads it from stdin. A token on the command line is "
    f"visible to every local user in `ps`: prefer --svid-file, '-' or ${SVID_ENV}.",
)
@click.option(
    "--svid-file",
    default=None,
    metavar="FILE",
    help=f"Read the JWT-SVID from FILE ('-': stdin). Without either flag, ${SVID_ENV} is used.",
)
@click.option(
    "--issuer",
    default=None,
    metavar="URL",
    help="Also require the token's 'iss' to be exactly URL (tokens without 'iss' then fail).",
)
def validate_jwt(
    socket_path: str,
    output: str,
    timeout: float,
    audience: str,
    svid: str | None,
    svid_file: str | None,
    issuer: str | None,
) -> None:
    """Have the Workload API validate a JWT-SVID (from --svid-file, stdin or $CREDO_JWT_SVID)."""
    try:
        token = read_secret(svid, svid_file, flag="svid", env=SVID_ENV)
    except CliError as err:
        raise _Fail(err.message) from None
    if token is None:
        raise _Fail(
            f"no JWT-SVID given: pass --svid-file FILE, --svid - (stdin) or set ${SVID_ENV}"
        )
    svid = token
    with _client(socket_path, timeout) as client:
        parsed = client.validate_jwt_svid(svid, audience, issuer=issuer or None)
    if output == "json":
        click.echo(json.dumps({"spiffe_id": str(parsed.spiffe_id), "claims": dict(parsed.claims)}))
        return
    click.echo("SVID is valid.")
    click.echo(f"SPIFFE ID : {parsed.spiffe_id}")
    click.echo(f"Claims    : {json.dumps(dict(parsed.claims))}")


@api.command("exchange")
@_common
@click.option(
    "--token-endpoint",
    required=True,
    envvar="CREDO_TOKEN_ENDPOINT",
    metavar="URL",
    help="The server's token endpoint, https://<host>:<port>/oauth2/token "
    "(env CREDO_TOKEN_ENDPOINT).",
)
@click.option(
    "--subject-token",
    "subject_token_file",
    required=True,
    metavar="FILE",
    help="The person's token: a file, or '-' for stdin (never on the command line).",
)
@click.option(
    "--subject-token-type",
    type=click.Choice(["id_token", "jwt", "access_token"]),
    default="id_token",
    show_default=True,
    help="What the subject token is (access_token: a token Credo issued, for a chain).",
)
@click.option("--audience", required=True, help="Where the delegated token will be used.")
@click.option("--scope", "scopes", multiple=True, help="Scope to ask for (repeatable).")
@click.option("--spiffe-id", default=None, help="Exchange as this identity of the workload.")
@click.option("--ca-file", default=None, help="Trust anchors for the token endpoint (PEM).")
def exchange(
    socket_path: str,
    output: str,
    timeout: float,
    token_endpoint: str,
    subject_token_file: str,
    subject_token_type: str,
    audience: str,
    scopes: tuple[str, ...],
    spiffe_id: str | None,
    ca_file: str | None,
) -> None:
    """Exchange a person's token for a delegated access token (RFC 8693) and print it."""
    try:
        subject = read_secret(None, subject_token_file, flag="subject-token", env="")
    except CliError as err:
        raise _Fail(err.message) from None
    if not subject:
        raise _Fail("--subject-token: no token given")
    try:
        _check_socket(socket_path)
        context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        client = TokenExchangeClient(
            token_endpoint,
            workload_api=socket_path,
            spiffe_id=spiffe_id,
            ssl_context=context,
            timeout=timeout,
        )
    except (ValueError, OSError) as err:
        raise _Fail(str(err)) from None
    try:
        answer = client.exchange(
            subject,
            audience=audience,
            scope=scopes,
            subject_token_type=f"urn:ietf:params:oauth:token-type:{subject_token_type}",
        )
    except CredoError as err:
        raise _Fail(str(err).replace("\n", " ")) from None
    if output == "json":
        click.echo(
            json.dumps(
                {
                    "access_token": answer.access_token,
                    "issued_token_type": answer.issued_token_type,
                    "token_type": answer.token_type,
                    "expires_in": answer.expires_in,
                    "scope": answer.scope,
                },
                indent=2,
            )
        )
        return
    click.echo(answer.access_token)


@api.command("watch")
@_common
def watch(socket_path: str, output: str, timeout: float) -> None:
    """Print every X.509 context update until interrupted (Ctrl-C)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with _client(socket_path, None) as client:
            for ctx in client.watch_x509_context():
                _print_x509(ctx, output)
                click.echo("", nl=True)
    except KeyboardInterrupt:
        pass
