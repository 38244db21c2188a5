"""The quickstart: a whole Credo deployment on this machine, in a temporary directory.

1. start ``credo-server run`` (SQLite in the temp dir, a free port);
2. generate a join token and start ``credo-agent run`` with it;
3. register an entry for the current user (selector ``unix:uid:<uid>``);
4. fetch an X.509-SVID and a JWT-SVID through the standard Workload API;
5. print who this process now is and when its credentials expire.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TRUST_DOMAIN = "example.org"


def _cli(*args: str) -> str:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"quickstart: `{' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _wait(what: str, check, timeout: float, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(
                    f"quickstart: {p.args[0]} exited with {p.returncode} while waiting for {what}"
                )
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"quickstart: timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="verify and exit instead of running until Ctrl-C"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="credo-quickstart-"))
    server_dir, agent_dir = root / "server", root / "agent"
    admin_sock = root / "server-admin" / "api.sock"
    workload_sock = root / "agent-public" / "api.sock"
    logs = {name: open(root / f"{name}.log", "wb") for name in ("server", "agent")}  # noqa: SIM115
    procs: list[subprocess.Popen[bytes]] = []
    os.environ["CREDO_SERVER_SOCKET"] = str(admin_sock)
    try:
        print(f"• working in {root}")
        server = subprocess.Popen(
            [
                str(BIN / "credo-server"),
                "run",
                "--trust-domain",
                TRUST_DOMAIN,
                "--data-dir",
                str(server_dir),
                "--bind-address",
                "127.0.0.1:0",
                "--admin-socket",
                str(admin_sock),
            ],
            stdout=logs["server"],
            stderr=subprocess.STDOUT,
        )
        procs.append(server)
        addr_file = server_dir / "server.addr"
        _wait("the server", lambda: addr_file.exists() and admin_sock.exists(), 30, procs)
        _wait(
            "the server to be healthy",
            lambda: (
                subprocess.run(
                    [str(BIN / "credo-server"), "healthcheck"], capture_output=True
                ).returncode
                == 0
            ),
            30,
            procs,
        )
        address = addr_file.read_text().strip()
        print(f"• signing server for spiffe://{TRUST_DOMAIN} listening on {address}")

        bundle = root / "bundle.pem"
        bundle.write_text(_cli("credo-server", "bundle", "show", "--format", "pem"))
        token = json.loads(_cli("credo-server", "token", "generate", "--output", "json"))["token"]
        agent_id = f"spiffe://{TRUST_DOMAIN}/credo/agent/join_token/{token}"

        agent = subprocess.Popen(
            [
                str(BIN / "credo-agent"),
                "run",
                "--server-address",
                address,
                "--trust-domain",
                TRUST_DOMAIN,
                "--trust-bundle",
                str(bundle),
                "--join-token",
                token,
                "--data-dir",
                str(agent_dir),
                "--socket",
                str(workload_sock),
                "--admin-socket",
                str(root / "agent-private" / "admin.sock"),
            ],
            stdout=logs["agent"],
            stderr=subprocess.STDOUT,
        )
        procs.append(agent)
        _wait("the agent's Workload API socket", workload_sock.exists, 30, procs)
        print(f"• node agent attested as {agent_id[:60]}…")

        uid = os.getuid()
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/quickstart/uid-{uid}"
        entry = json.loads(
            _cli(
                "credo-server",
                "entry",
                "create",
                "--parent-id",
                agent_id,
                "--spiffe-id",
                spiffe_id,
                "--selector",
                f"unix:uid:{uid}",
                "--output",
                "json",
            )
        )
        entry_id = entry["id"] if "id" in entry else entry["entries"][0]["id"]
        print(f"• registered entry {entry_id}: processes with unix:uid:{uid} are {spiffe_id}")

        from credo.workload_client import WorkloadApiClient

        with WorkloadApiClient(f"unix://{workload_sock}") as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    svid = client.fetch_x509_svid()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            jwt = client.fetch_jwt_svid(audience=["quickstart"])
            validated = client.validate_jwt_svid(jwt.token, "quickstart")

        print()
        print(f"  You are        {svid.spiffe_id}")
        print(
            f"  X.509-SVID     expires {svid.expires_at:%Y-%m-%d %H:%M:%S} UTC "
            f"(serial {svid.leaf.serial_number:x}), renewed automatically at half-life"
        )
        print(f"  JWT-SVID       for audience 'quickstart', expires {jwt.expires_at:%H:%M:%S} UTC")
        print(f"  validated by   the agent: sub={validated.spiffe_id}")
        print()
        print(
            f"  Try: SPIFFE_ENDPOINT_SOCKET=unix://{workload_sock} {BIN}/credo-agent api fetch x509"
        )
        print(f"       CREDO_SERVER_SOCKET={admin_sock} {BIN}/credo-server entry show")
        if args.check:
            print("quickstart: OK")
            return 0
        print("\nRunning; press Ctrl-C to stop.")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while all(p.poll() is None for p in procs):
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping")
            return 0
        raise SystemExit(f"quickstart: a process stopped unexpectedly; see the logs in {root}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for f in logs.values():
            f.close()
        if args.keep or any(p.returncode not in (0, -15, None) for p in procs):
            print(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
