"""Real Credo processes, driven the way users drive them: the one harness for the
integration tests and the benchmarks (``benchmarks/_common.py`` builds on it).

``start_server(tmp_path, **flags)`` runs ``credo-server run`` on a temp data dir, a
temp admin socket and ``--bind-address 127.0.0.1:0``, waits until it serves, and returns a
:class:`ServerProcess`::

    with start_server(tmp_path, x509_svid_ttl="10s") as server:
        server.cli_json("entry", "count")        # runs `credo-server entry count --output json`
        server.address                           # "127.0.0.1:<port>" from <data-dir>/server.addr
        server.restart()                         # SIGTERM, wait, start again with the same flags
        server.kill()                            # SIGKILL (e.g. mid-rotation), then .start()
        server.http_url                          # "https://localhost:<port>" (http.addr), when
                                                 # started with http_bind_address="127.0.0.1:0"
        server.logs                              # everything it wrote to stdout/stderr

Serving means: gRPC health SERVING on the admin socket, ``server.addr`` written, and the
agent port accepting TCP connections (``server.start_seconds`` is how long that took).
Flags are ``ServerConfig`` names (``trust_domain="x.org"`` becomes ``--trust-domain x.org``);
a flag given as ``None`` is left out. Leaving the ``with`` block (or interpreter exit, as a
last resort) stops the process and removes the socket directory.

``start_agent(server, root)`` runs ``credo-agent run`` joined to that server with a fresh
join token (``root`` is a short directory, e.g. from ``short_temp_dir()``; Unix socket paths
are limited to ~107 bytes), waits until its admin health service says SERVING and its
Workload API socket exists (what ``credo-agent healthcheck`` and a workload see), and
returns an :class:`AgentProcess`::

    with start_agent(server, root) as agent:
        create_entry(server, agent.spiffe_id, "spiffe://example.org/web")   # unix:uid:<me>
        wait_for(lambda: agent.fetch_ids(), 20, "the SVID")
        agent.endpoint                           # "unix:///.../public/api.sock"
        agent.stop(); agent.token = None; agent.start()   # resumes with the stored SVID

Both are :class:`ManagedProcess` subclasses: output goes to a log file, ``stop()`` sends
SIGTERM and then SIGKILL, ``kill()`` SIGKILL. With ``die_with_parent=True`` (what the
benchmarks use) the child also gets ``PR_SET_PDEATHSIG``, so it dies even if this process
is killed outright; only start such processes from the main thread, as the signal follows
the thread that spawned the child.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from credo._proto.credo.server.v1 import admin_pb2, admin_pb2_grpc

__all__ = [
    "AgentProcess",
    "ManagedProcess",
    "ServerProcess",
    "agent_id",
    "create_entry",
    "credo_agent_command",
    "credo_server_command",
    "free_port",
    "join_token",
    "one_line_error",
    "run_cli",
    "short_temp_dir",
    "start_agent",
    "start_server",
    "wait_for",
    "write_server_bundle",
]

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
DEFAULT_TRUST_DOMAIN = "example.org"
AGENT_START_TIMEOUT = 60.0
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
"""Channel options for admin calls that move many entries at once."""

_SECRET_FLAGS = frozenset({"--join-token"})
"""Flags whose values stay out of the logs (tests check that no log line holds a token)."""
_RUNNING: dict[ManagedProcess, None] = {}  # started and not yet stopped, in start order


# --- commands and small helpers -----------------------------------------------------------


def _console_script(name: str, module: str) -> list[str]:
    """The installed console script ``name`` (next to this Python), or ``python -m``."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-m", module]


def credo_server_command() -> list[str]:
    """The installed ``credo-server`` console script (next to this Python), or ``-m``."""
    return _console_script("credo-server", "server.cli.main")


def credo_agent_command() -> list[str]:
    """The installed ``credo-agent`` console script (next to this Python), or ``-m``."""
    return _console_script("credo-agent", "node_agent.cli.main")


def run_cli(
    socket: Path | str,
    *args: str,
    output: str | None = "json",
    stdin: str | None = None,
    timeout: float = 60.0,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``credo-server <args> --socket <socket> [--output json]`` as a subprocess."""
    cmd = [*credo_server_command(), *args, "--socket", str(socket)]
    if output is not None:
        cmd += ["--output", output]
    return subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=check
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``Error: ...`` stderr line of a CLI run that failed as it should (exit 1)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def _flag_args(flags: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        if value is True:
            args.append("--" + name.replace("_", "-"))
            continue
        args += ["--" + name.replace("_", "-"), str(value)]
    return args


def _health(socket: Path, timeout: float = 1.0) -> int | None:
    """The health status on ``socket``, or None if nobody answers."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def _serving(socket: Path) -> bool:
    """The gRPC health service on Unix socket ``socket`` says SERVING."""
    return socket.exists() and _health(socket) == health_pb2.HealthCheckResponse.SERVING


def _tcp_accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server that must keep it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.05,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def short_temp_dir(prefix: str = "credo-a-", mode: int = 0o700) -> Path:
    """A fresh directory directly under /tmp (short enough for Unix socket paths).

    ``mode=0o755`` lets other users (e.g. a workload dropped to ``nobody``) reach the
    agent's public socket inside it. The caller may remove it; whatever is left is removed
    when the test process exits.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, mode)
    _SHORT_TEMP_DIRS.append(root)
    return root


_SHORT_TEMP_DIRS: list[Path] = []


@atexit.register
def _remove_short_temp_dirs() -> None:
    for root in _SHORT_TEMP_DIRS:
        shutil.rmtree(root, ignore_errors=True)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child when the thread that spawned it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --- any child process ----------------------------------------------------------------------


class ManagedProcess:
    """A child process writing to ``log_path``; stopped with SIGTERM, then SIGKILL."""

    kind = "process"

    def __init__(self, log_path: Path, *, die_with_parent: bool = False) -> None:
        self.log_path = log_path
        self.die_with_parent = die_with_parent
        self.new_session = False
        """Start it in a session of its own (``setsid``), as a service manager does."""
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, command: Sequence[str], *, stdin: bytes | None = None) -> None:
        """Start ``command`` with its stdout and stderr appended to the log (after a line
        naming the command, with secret flag values masked); ``stdin`` is written to its
        standard input, which is then closed."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        shown = [
            "***" if i and command[i - 1] in _SECRET_FLAGS else arg for i, arg in enumerate(command)
        ]
        with self.log_path.open("ab") as log:
            log.write(f"--- start: {' '.join(shown)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                env=env,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
                start_new_session=self.new_session,
            )
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        _RUNNING[self] = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.kind} was not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise RuntimeError with the log's tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.kind} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}"
            )

    @property
    def logs(self) -> str:
        """Everything the process (and earlier runs of it) wrote to stdout and stderr."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs.splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in ``timeout``. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _RUNNING.pop(self, None)
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _RUNNING.pop(self, None)

    def close(self) -> None:
        """Stop the process (subclasses also remove what they own)."""
        self.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@atexit.register
def _stop_leftovers() -> None:
    """Kill what a test or benchmark left running, newest first (agents before servers)."""
    for process in reversed(list(_RUNNING)):
        process.kill()


# --- the server -----------------------------------------------------------------------------


class ServerProcess(ManagedProcess):
    """A ``credo-server run`` process and where to reach it."""

    kind = "credo-server"

    def __init__(
        self,
        data_dir: Path,
        admin_socket: Path,
        flags: dict[str, Any],
        *,
        owned_dir: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(data_dir.parent / f"{data_dir.name}.log", die_with_parent=die_with_parent)
        self.data_dir = data_dir
        self.admin_socket = admin_socket
        self.flags = flags
        self.start_seconds = 0.0
        """Seconds from spawn to serving, of the last :meth:`start`."""
        self._address: str | None = None
        self._owned_dir = owned_dir  # temp dir holding the socket, removed on close()

    # --- lifecycle -------------------------------------------------------------------

    @property
    def command(self) -> list[str]:
        return [*credo_server_command(), "run", *_flag_args(self.flags)]

    def start(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Start the process and wait until it serves (see the module doc)."""
        if self.running:
            raise RuntimeError("credo-server is already running")
        self._address = None
        addr_file = self.data_dir / "server.addr"
        addr_file.unlink(missing_ok=True)
        (self.data_dir / "http.addr").unlink(missing_ok=True)
        started = time.perf_counter()
        self._spawn(self.command)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None:
                _RUNNING.pop(self, None)
                raise RuntimeError(
                    f"credo-server exited with {code} before it was healthy; log:\n{self.logs}"
                )
            if (
                addr_file.exists()
                and _serving(self.admin_socket)
                and _tcp_accepts(addr_file.read_text().strip())
            ):
                self.start_seconds = time.perf_counter() - started
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"credo-server was not healthy after {timeout}s; log:\n{self.logs}"
                )
            time.sleep(0.02)

    def restart(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Stop cleanly and start again with the same flags and data dir."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the process and remove the socket's temp directory."""
        self.stop()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    # --- what tests look at ----------------------------------------------------------

    @property
    def address(self) -> str:
        """The agent endpoint ``host:port`` the server chose (from ``<data-dir>/server.addr``)."""
        if self._address is None:
            self._address = (self.data_dir / "server.addr").read_text().strip()
        return self._address

    @property
    def http_url(self) -> str:
        """``https://localhost:<port>`` of the HTTP front end (from ``<data-dir>/http.addr``)."""
        port = (self.data_dir / "http.addr").read_text().strip().rpartition(":")[2]
        return f"https://localhost:{port}"

    @property
    def agent_target(self) -> str:
        """``localhost:<port>``: the agent endpoint under a name its TLS certificate carries."""
        return f"localhost:{self.address.rpartition(':')[2]}"

    @property
    def datastore_path(self) -> Path:
        """The SQLite datastore file in the data dir (unless a database URL says otherwise)."""
        return self.data_dir / "datastore.sqlite3"

    def admin_channel(self) -> grpc.Channel:
        """An insecure gRPC channel on the admin socket (close it, or use ``with``)."""
        return grpc.insecure_channel(f"unix:{self.admin_socket}", options=GRPC_OPTIONS)

    def cli(self, *args: str, output: str | None = "json", stdin: str | None = None) -> Any:
        """Run ``credo-server <args>`` against this server; the CompletedProcess."""
        return run_cli(self.admin_socket, *args, output=output, stdin=stdin)

    def cli_json(self, *args: str, stdin: str | None = None) -> Any:
        """Run ``credo-server <args> --output json``; fail with its stderr unless it exits 0."""
        result = self.cli(*args, stdin=stdin)
        if result.returncode != 0:
            raise AssertionError(
                f"credo-server {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return json.loads(result.stdout)

    def entries(self) -> list[Any]:
        """Every registration entry (``ListEntries`` on the admin socket, all pages): for
        checking what the server holds without a CLI process start per look."""
        entries: list[Any] = []
        request = admin_pb2.ListEntriesRequest(page_size=500)
        with self.admin_channel() as channel:
            stub = admin_pb2_grpc.EntriesStub(channel)
            while True:
                reply = stub.ListEntries(request, timeout=30)
                entries.extend(reply.entries)
                if not reply.next_page_token:
                    return entries
                request.page_token = reply.next_page_token

    def entry_count(self) -> int:
        """``CountEntries`` on the admin socket."""
        with self.admin_channel() as channel:
            reply = admin_pb2_grpc.EntriesStub(channel).CountEntries(
                admin_pb2.CountEntriesRequest(), timeout=30
            )
        return int(reply.count)

    def bundle_pem(self) -> str:
        """``credo-server bundle show --format pem``: the bundle's X.509 authorities."""
        result = self.cli("bundle", "show", "--format", "pem", output=None)
        if result.returncode != 0:
            raise AssertionError(f"bundle show exited {result.returncode}: {result.stderr}")
        return str(result.stdout)


def start_server(
    tmp_path: Path,
    *,
    die_with_parent: bool = False,
    timeout: float = START_TIMEOUT,
    **flags: Any,
) -> ServerProcess:
    """Start ``credo-server run`` in ``tmp_path`` and wait until it serves (see module doc)."""
    data_dir = Path(flags.pop("data_dir", None) or tmp_path / "server")
    data_dir.mkdir(parents=True, exist_ok=True)
    owned_dir: Path | None = None
    if flags.get("admin_socket"):
        admin_socket = Path(flags.pop("admin_socket"))
    else:
        # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
        owned_dir = Path(tempfile.mkdtemp(prefix="credo-"))
        admin_socket = owned_dir / "private" / "api.sock"
    all_flags = {
        "data_dir": data_dir,
        "admin_socket": admin_socket,
        "bind_address": "127.0.0.1:0",
        **flags,
    }
    server = ServerProcess(
        data_dir, admin_socket, all_flags, owned_dir=owned_dir, die_with_parent=die_with_parent
    )
    try:
        return server.start(timeout)
    except BaseException:
        server.close()
        raise


def join_token(server: ServerProcess) -> str:
    """A fresh join token from ``credo-server token generate`` (through the CLI: the audit
    trail names the CLI process as the admin who made it, which tests check)."""
    return str(server.cli_json("token", "generate")["token"])


def agent_id(token: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The SPIFFE ID an agent gets by joining with ``token``."""
    return f"spiffe://{trust_domain}/credo/agent/join_token/{token}"


def write_server_bundle(server: ServerProcess, path: Path) -> Path:
    """Write the server's X.509 authorities as PEM to ``path`` (a bootstrap bundle): what
    ``credo-server bundle show --format pem`` prints, from ``GetBundle`` on the admin socket
    (:meth:`ServerProcess.bundle_pem` runs the command)."""
    with server.admin_channel() as channel:
        reply = admin_pb2_grpc.BundlesStub(channel).GetBundle(
            admin_pb2.GetBundleAdminRequest(), timeout=30
        )
    path.write_text(
        "".join(
            x509.load_der_x509_certificate(authority.asn1)
            .public_bytes(serialization.Encoding.PEM)
            .decode()
            for authority in reply.x509_authorities
        )
    )
    return path


def create_entry(
    server: ServerProcess, parent: str, spiffe_id: str, *selectors: str, extra: Sequence[str] = ()
) -> str:
    """``credo-server entry create``; selectors default to ``unix:uid:<this uid>``; the id."""
    args = ["entry", "create", "--parent-id", parent, "--spiffe-id", spiffe_id, *extra]
    for selector in selectors or (f"unix:uid:{os.getuid()}",):
        args += ["--selector", selector]
    out = server.cli_json(*args)
    entry = out["entries"][0] if "entries" in out else out.get("entry", out)
    return str(entry["id"])


# --- the agent ------------------------------------------------------------------------------


class AgentProcess(ManagedProcess):
    """A ``credo-agent run`` process on short temp paths under ``root``."""

    kind = "credo-agent"

    def __init__(
        self,
        root: Path,
        server_address: str,
        bundle: Path | None,
        token: str | None,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        flags: dict[str, Any] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(root / "agent.log", die_with_parent=die_with_parent)
        self.root = root
        self.socket = root / "public" / "api.sock"
        self.admin_socket = root / "private" / "admin.sock"
        self.data_dir = root / "data"
        self.server_address = server_address
        self.bundle = bundle
        self.token = token
        self.trust_domain = trust_domain
        self.flags = dict(flags or {})
        self.start_seconds = 0.0
        """Seconds from spawn to serving, of the last :meth:`start` that waited."""
        self.joined_token = token
        """The token this agent first joined with (its SPIFFE ID stays the same after)."""

    @property
    def endpoint(self) -> str:
        """The Workload API address, ``unix:///<root>/public/api.sock``."""
        return f"unix://{self.socket}"

    @property
    def spiffe_id(self) -> str:
        """The agent's own SPIFFE ID (the parent ID for its workload entries)."""
        if self.joined_token is None:
            raise RuntimeError("the agent was not started with a join token")
        return agent_id(self.joined_token, self.trust_domain)

    def start(
        self,
        *,
        token: str | None = None,
        wait: bool = True,
        timeout: float = AGENT_START_TIMEOUT,
        stdin: bytes | None = None,
    ) -> AgentProcess:
        """Start ``credo-agent run``; with ``wait``, until it serves (see the module doc).

        ``stdin``: written to the agent's standard input, which is then closed.
        """
        cmd = [
            *credo_agent_command(),
            "run",
            "--server-address",
            self.server_address,
            "--trust-domain",
            self.trust_domain,
            *(["--trust-bundle", str(self.bundle)] if self.bundle is not None else []),
            "--socket",
            str(self.socket),
            "--admin-socket",
            str(self.admin_socket),
            "--data-dir",
            str(self.data_dir),
            "--sync-backoff-max",
            "1",
            *_flag_args(self.flags),
        ]
        token = token or self.token
        if token:
            cmd += ["--join-token", token]
            if self.joined_token is None:
                self.joined_token = token
        started = time.perf_counter()
        self._spawn(cmd, stdin=stdin)
        if wait:
            wait_for(self._serving, timeout, "the agent to become healthy", interval=0.02)
            self.start_seconds = time.perf_counter() - started
        return self

    def _serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.logs}")
        return self.socket.exists() and _serving(self.admin_socket)

    def healthy(self) -> bool:
        """``credo-agent healthcheck`` passes; fails the test if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.logs}")
        result = subprocess.run(
            [*credo_agent_command(), "healthcheck", "--admin-socket", str(self.admin_socket)],
            capture_output=True,
            timeout=20,
        )
        return result.returncode == 0

    def client(self) -> Any:
        """A py-spiffe ``WorkloadApiClient`` on this agent's socket."""
        import spiffe

        return spiffe.WorkloadApiClient(socket_path=self.endpoint)

    def fetch_ids(self) -> list[str]:
        """The SPIFFE IDs of this process's X509-SVIDs (via py-spiffe), default first.

        ``[]`` while the agent answers PERMISSION_DENIED (no identity yet), so it can be
        polled with :func:`wait_for`; any other error is raised.
        """
        from spiffe.workloadapi.errors import WorkloadApiError

        with self.client() as client:
            try:
                svids = client.fetch_x509_svids(timeout=30)
            except WorkloadApiError as err:
                cause = err.__cause__
                if isinstance(cause, grpc.Call) and (
                    cause.code() == grpc.StatusCode.PERMISSION_DENIED
                ):
                    return []
                raise
            return [str(svid.spiffe_id) for svid in svids]


def start_agent(
    server: ServerProcess,
    root: Path,
    *,
    token: str | None = None,
    bundle: Path | None = None,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    wait: bool = True,
    die_with_parent: bool = False,
    timeout: float = AGENT_START_TIMEOUT,
    new_session: bool = False,
    **flags: Any,
) -> AgentProcess:
    """Start ``credo-agent run`` in ``root`` joined to ``server`` (see module doc).

    ``token`` defaults to a fresh join token, ``bundle`` to the server's bundle written to
    ``root/bundle.pem``; ``flags`` are extra ``credo-agent run`` flags (``None``: left out).
    ``new_session``: in a session of its own, as a service manager starts it.
    """
    if bundle is None:
        bundle = write_server_bundle(server, root / "bundle.pem")
    agent = AgentProcess(
        root,
        server.address,
        bundle,
        token or join_token(server),
        trust_domain=trust_domain,
        flags=flags,
        die_with_parent=die_with_parent,
    )
    agent.new_session = new_session
    try:
        return agent.start(wait=wait, timeout=timeout)
    except BaseException:
        agent.kill()
        raise
