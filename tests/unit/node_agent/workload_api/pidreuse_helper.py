"""Helper process for the pid-reuse test (not a test module).

Usage: pidreuse_helper.py SOCKET [--no-fork]

Connects to the Workload API socket and prints its pid. Normally it then forks and exits;
the child (which inherited the connected socket) waits until the opener is gone and makes
FetchX509SVID over that very connection, printing the gRPC status name or
``OK:<spiffe id>``. With ``--no-fork`` the opener makes the call itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
import time


def relay_to(conn: socket.socket) -> str:
    """Listen on a private socket and splice its first connection onto ``conn``."""
    path = os.path.join(tempfile.mkdtemp(prefix="relay-", dir="/tmp"), "r.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        local, _ = listener.accept()
        threading.Thread(target=pump, args=(local, conn), daemon=True).start()
        pump(conn, local)

    threading.Thread(target=serve, daemon=True).start()
    return path


def call(conn: socket.socket) -> str:
    import grpc

    from credo._proto import workload_pb2, workload_pb2_grpc

    path = relay_to(conn)
    with grpc.insecure_channel("unix:" + path) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        stream = stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(),
            metadata=(("workload.spiffe.io", "true"),),
            timeout=10,
        )
        try:
            response = next(stream)
        except grpc.RpcError as err:
            return err.code().name
        finally:
            stream.cancel()
        return "OK:" + response.svids[0].spiffe_id


def main() -> None:
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(sys.argv[1])
    print(os.getpid(), flush=True)
    time.sleep(0.3)  # let the agent accept and pin this process
    if "--no-fork" in sys.argv:
        print(call(conn), flush=True)
        return
    opener = os.getpid()
    if os.fork() > 0:
        os._exit(0)
    while os.getppid() == opener:
        time.sleep(0.01)
    time.sleep(0.1)
    print(call(conn), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
