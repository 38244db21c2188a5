"""Peer credentials (SO_PEERCRED), pid pinning, and the peer-tracking relay in front of grpc.aio."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

import node_agent.workload.peer as peer_module
from node_agent.workload.errors import PeerChanged, PeerUnknown
from node_agent.workload.peer import HolderScans, PeerCredentials, PeerProcess
from node_agent.workload.tracker import PeerTrackingProxy


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short temp directory (Unix socket paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="credo-p-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _creds(pid: int) -> PeerCredentials:
    return PeerCredentials(pid, os.geteuid(), os.getegid())


def _connected_pair(path: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    """A listening Unix socket at ``path``, a client connected to it, and the accepted end."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    server_side, _ = listener.accept()
    return listener, client, server_side


def test_pid_zero_is_refused() -> None:
    """Pid 0 (kernel could not say who connected) is refused."""
    with pytest.raises(PeerUnknown):
        PeerProcess.capture(PeerCredentials(0, 0, 0))


def test_exited_process_is_detected() -> None:
    """A pinned process that exits (zombie or reaped) fails ensure_same_process."""
    proc = subprocess.Popen(["sleep", "30"])
    peer = PeerProcess.capture(_creds(proc.pid))
    try:
        peer.ensure_same_process()
        proc.kill()
        time.sleep(0.1)  # zombie: /proc entry still there, pidfd readable
        with pytest.raises(PeerChanged, match="exited"):
            peer.ensure_same_process()
        proc.wait()
        with pytest.raises(PeerChanged):
            peer.ensure_same_process()
    finally:
        peer.close()
    with pytest.raises(PeerChanged, match="connection closed"):
        peer.ensure_same_process()


def test_capture_of_gone_process_fails() -> None:
    """Pinning a pid that no longer exists raises PeerChanged."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(PeerChanged):
        PeerProcess.capture(_creds(proc.pid))


def test_uid_mismatch_is_refused() -> None:
    """Credentials whose uid differs from the process's effective uid are refused."""
    with pytest.raises(PeerChanged, match="uid"):
        PeerProcess.capture(PeerCredentials(os.getpid(), os.geteuid() + 1, os.getegid()))


def test_exec_of_different_binary_is_detected() -> None:
    """A pinned process that execs another binary fails ensure_same_process."""
    proc = subprocess.Popen(["sh", "-c", "read x; exec sleep 30"], stdin=subprocess.PIPE, text=True)
    try:
        peer = PeerProcess.capture(_creds(proc.pid))
        peer.ensure_same_process()
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 5
        while "sleep" not in os.readlink(f"/proc/{proc.pid}/exe"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(PeerChanged, match="different executable"):
            peer.ensure_same_process()
        peer.close()
    finally:
        proc.kill()
        proc.wait()


# --- the relay ------------------------------------------------------------------------


async def _echo_server(proxy: PeerTrackingProxy | None, address: str) -> aio.Server:
    """A gRPC server whose /T/Who answers the caller's tracked pid and uid."""

    async def who(request: bytes, context: aio.ServicerContext) -> bytes:
        if proxy is None:
            return request
        peer = proxy.lookup(context.peer())
        if peer is None:
            return b"unknown"
        peer.ensure_same_process()
        return f"{peer.pid} {peer.credentials.uid}".encode()

    handler = grpc.method_handlers_generic_handler(
        "T", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    assert server.add_insecure_port(address) != 0
    await server.start()
    return server


class _Running:
    def __init__(self, proxy: PeerTrackingProxy, server: aio.Server) -> None:
        self.proxy, self.server = proxy, server


async def _start(short_dir: str, **settings: Any) -> _Running:
    proxy = PeerTrackingProxy(os.path.join(short_dir, "api.sock"), **settings)
    server = await _echo_server(proxy, proxy.internal_address)
    await proxy.start()
    return _Running(proxy, server)


async def _stop(r: _Running) -> None:
    r.proxy.stop_accepting()
    await r.server.stop(None)
    await r.proxy.stop()


def test_real_client_process_is_attributed(short_dir: str) -> None:
    """A client in another process is attributed to its real pid and uid."""
    client = textwrap.dedent(
        """
        import sys, grpc
        with grpc.insecure_channel("unix:" + sys.argv[1]) as ch:
            print(ch.unary_unary("/T/Who")(b"", timeout=10).decode())
        """
    )

    async def main() -> tuple[int, str]:
        r = await _start(short_dir)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                client,
                r.proxy.public_path,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            return proc.pid, out.decode().strip()
        finally:
            await _stop(r)

    pid, answer = asyncio.run(main())
    assert answer == f"{pid} {os.geteuid()}"


def test_many_concurrent_connections_close_cleanly(short_dir: str) -> None:
    """Many concurrent connections are each attributed, and closing them forgets every peer."""

    async def main() -> None:
        r = await _start(short_dir)
        try:
            channels = [
                aio.insecure_channel(
                    "unix:" + r.proxy.public_path,
                    options=[("grpc.use_local_subchannel_pool", 1)],  # one connection each
                )
                for _ in range(50)
            ]
            answers = await asyncio.gather(
                *(ch.unary_unary("/T/Who")(b"", timeout=10) for ch in channels)
            )
            assert set(answers) == {f"{os.getpid()} {os.geteuid()}".encode()}
            assert len(r.proxy.peers) == 50
            await asyncio.gather(*(ch.close() for ch in channels))
            for _ in range(100):
                if not r.proxy.peers and not r.proxy.connections:
                    break
                await asyncio.sleep(0.02)
            assert r.proxy.peers == {}
            assert r.proxy.connections == set()
            assert os.listdir(r.proxy.private_dir) == ["api.sock"]
        finally:
            await _stop(r)
        assert not os.path.exists(r.proxy.private_dir)

    asyncio.run(main())


def test_connections_per_uid_are_capped_and_freed(short_dir: str) -> None:
    """Past the per-uid cap a new connection is refused; closing one makes room again."""

    async def who(ch: aio.Channel) -> bytes:
        return await ch.unary_unary("/T/Who")(b"", timeout=10)

    def channel(r: _Running) -> aio.Channel:
        return aio.insecure_channel(
            "unix:" + r.proxy.public_path, options=[("grpc.use_local_subchannel_pool", 1)]
        )

    async def main() -> None:
        r = await _start(short_dir, max_connections_per_uid=3)
        try:
            held = [channel(r) for _ in range(3)]
            await asyncio.gather(*(who(ch) for ch in held))
            assert r.proxy.open_by_uid == {os.geteuid(): 3}
            extra = channel(r)
            with pytest.raises(grpc.RpcError) as err:
                await who(extra)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await extra.close()
            await held.pop().close()
            for _ in range(100):
                if r.proxy.open_by_uid.get(os.geteuid()) == 2:
                    break
                await asyncio.sleep(0.02)
            again = channel(r)
            assert await who(again) == f"{os.getpid()} {os.geteuid()}".encode()
            await asyncio.gather(again.close(), *(ch.close() for ch in held))
        finally:
            await _stop(r)

    asyncio.run(main())


def test_large_messages_relay_intact(short_dir: str) -> None:
    """Messages bigger than socket buffers pass through the relay unchanged (back-pressure)."""

    async def main() -> None:
        proxy = PeerTrackingProxy(os.path.join(short_dir, "api.sock"))
        server = await _echo_server(None, proxy.internal_address)
        await proxy.start()
        try:
            async with aio.insecure_channel("unix:" + proxy.public_path) as ch:
                payload = os.urandom(3 * 1024 * 1024)
                assert await ch.unary_unary("/T/Who")(payload, timeout=10) == payload
        finally:
            proxy.stop_accepting()
            await server.stop(None)
            await proxy.stop()

    asyncio.run(main())


def test_stale_socket_replaced_but_regular_file_kept(short_dir: str) -> None:
    """A stale socket file is replaced on start; a regular file at the path is refused."""
    import socket as socket_mod

    path = os.path.join(short_dir, "api.sock")
    stale = socket_mod.socket(socket_mod.AF_UNIX)
    stale.bind(path)
    stale.close()

    async def main() -> None:
        proxy = PeerTrackingProxy(path)
        await proxy.start()
        await proxy.stop()
        with open(path, "w") as f:
            f.write("not a socket")
        other = PeerTrackingProxy(path)
        with pytest.raises(FileExistsError):
            await other.start()
        await other.stop()

    asyncio.run(main())
    assert Path(path).read_text() == "not a socket"


def test_a_uid_connecting_faster_than_its_rate_is_shed_with_one_log_line(
    short_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond the burst, a uid's connections are closed at once and counted; the log gets
    one summary line per interval, not one per refusal."""
    import socket as _socket

    async def main() -> None:
        r = await _start(short_dir, connections_per_second=0.001, connection_burst=3)
        try:
            refused = 0
            for _ in range(30):
                s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                s.connect(r.proxy.public_path)
                s.settimeout(0.5)
                # a shed connection is closed by the agent at once: EOF (or a reset)
                try:
                    if await asyncio.to_thread(s.recv, 1) == b"":
                        refused += 1
                except ConnectionResetError:
                    refused += 1
                except TimeoutError:
                    pass  # relayed to gRPC, which waits for the client's preface
                s.close()
            assert refused >= 27
        finally:
            await _stop(r)

    with caplog.at_level("WARNING", logger="node_agent.workload.tracker"):
        asyncio.run(main())
    lines = [rec for rec in caplog.records if rec.getMessage() == "workload connections refused"]
    # the first refusal, then the rest in the summary flushed at stop
    assert len(lines) == 2
    assert sum(getattr(rec, "count", 0) for rec in lines) >= 27


def test_holder_check_refuses_a_connection_a_child_kept(short_dir: str) -> None:
    """The exec race in miniature: the pinned process passed its connection on (a child
    holds it) and no longer holds it itself; ensure_sole_holder refuses, as it does when
    both hold it."""
    from node_agent.workload.peer import unix_peer_inode

    listener, client, server_side = _connected_pair(os.path.join(short_dir, "h.sock"))
    server_inode = os.fstat(server_side.fileno()).st_ino
    assert unix_peer_inode(server_inode) == os.fstat(client.fileno()).st_ino
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=(client.fileno(),),
    )
    try:
        shared = PeerProcess.capture(_creds(os.getpid()), server_inode=server_inode)
        with pytest.raises(PeerChanged, match="shared with other processes"):
            shared.ensure_sole_holder()
        shared_async = PeerProcess.capture(_creds(os.getpid()), server_inode=server_inode)
        with pytest.raises(PeerChanged, match="shared with other processes"):
            asyncio.run(shared_async.ensure_sole_holder_shared(HolderScans()))
        client.close()
        gone = PeerProcess.capture(_creds(os.getpid()), server_inode=server_inode)
        with pytest.raises(PeerChanged, match="no longer holds"):
            gone.ensure_sole_holder()
        gone_async = PeerProcess.capture(_creds(os.getpid()), server_inode=server_inode)
        with pytest.raises(PeerChanged, match="no longer holds"):
            asyncio.run(gone_async.ensure_sole_holder_shared(HolderScans()))
        for peer in (shared, shared_async, gone, gone_async):
            peer.close()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        server_side.close()
        listener.close()


def test_holder_scans_wait_for_the_requests_already_on_their_way() -> None:
    """A request made a loop turn after the first (another connection's handler, runnable
    when the scan was due) joins the same scan, begun after both."""
    import socket as _socket

    a, b = _socket.socketpair()
    c, d = _socket.socketpair()
    inode_a, inode_c = os.fstat(a.fileno()).st_ino, os.fstat(c.fileno()).st_ino

    async def main() -> None:
        scans = HolderScans()
        first = asyncio.create_task(scans.holders(inode_a))
        await asyncio.sleep(0)  # the first has asked; its scan is due
        second = asyncio.create_task(scans.holders(inode_c))
        assert await asyncio.gather(first, second) == [{os.getpid()}, {os.getpid()}]
        assert scans.scans == 1

    try:
        asyncio.run(main())
    finally:
        for s in (a, b, c, d):
            s.close()


def test_holder_scans_share_one_scan_begun_after_every_request() -> None:
    """Concurrent holder requests are answered by one scan; a request made while a scan
    runs is not answered by it but by the next one, which sees what changed meanwhile."""
    import socket as _socket
    import threading

    a, b = _socket.socketpair()
    c, d = _socket.socketpair()
    inode_a, inode_c = os.fstat(a.fileno()).st_ino, os.fstat(c.fileno()).st_ino
    entered, release = threading.Event(), threading.Event()
    batches: list[set[int]] = []
    real_scan = peer_module.scan_socket_holders

    def gated_scan(inodes: Any, proc_root: str = "/proc") -> dict[int, set[int]]:
        batches.append(set(inodes))
        found = real_scan(inodes, proc_root)
        if len(batches) == 2:  # read /proc, not yet answered
            entered.set()
            release.wait(10)
        return found

    async def main() -> None:
        scans = HolderScans(process=False)  # the gate patches the thread-side scan
        both = await asyncio.gather(scans.holders(inode_a), scans.holders(inode_c))
        assert both == [{os.getpid()}, {os.getpid()}]
        assert scans.scans == 1
        first = asyncio.create_task(scans.holders(inode_a))
        await asyncio.to_thread(entered.wait, 10)  # the second scan has read /proc
        a.close()  # after that scan began: only a later scan can see it
        late = asyncio.create_task(scans.holders(inode_a))
        await asyncio.sleep(0)
        release.set()
        assert await first == {os.getpid()}
        assert await late == set()
        assert scans.scans == 3

    mp = pytest.MonkeyPatch()
    mp.setattr(peer_module, "scan_socket_holders", gated_scan)
    try:
        asyncio.run(main())
    finally:
        mp.undo()
        for s in (a, b, c, d):
            s.close()
    assert batches == [{inode_a, inode_c}, {inode_a}, {inode_a}]


def test_connection_that_sends_nothing_never_reaches_the_grpc_server(short_dir: str) -> None:
    """A caller that connects and closes without speaking (a connection flood) is not
    relayed upstream: only the connection that sends a request costs an internal one."""
    import socket as _socket

    async def main() -> None:
        r = await _start(short_dir)
        try:
            for _ in range(5):
                s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                s.connect(r.proxy.public_path)
                s.close()
            async with aio.insecure_channel("unix:" + r.proxy.public_path) as ch:
                answer = await ch.unary_unary("/T/Who")(b"", timeout=10)
            assert answer == f"{os.getpid()} {os.geteuid()}".encode()
            # the silent connections were handed over before the call's; none was numbered
            assert next(r.proxy.counter) == 1
        finally:
            await _stop(r)

    asyncio.run(main())


def test_holder_scan_process_refuses_a_socket_a_second_process_holds(short_dir: str) -> None:
    """The scan runs in a process of its own (not the agent's), and its answer is as
    fresh as a scan in the agent: a socket another process holds is refused; once that
    process has let go, the next request (a new scan) accepts it."""
    from node_agent.workload.peer import unix_peer_inode

    listener, client, server_side = _connected_pair(os.path.join(short_dir, "p.sock"))
    server_inode = os.fstat(server_side.fileno()).st_ino
    client_inode = unix_peer_inode(server_inode)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=(client.fileno(),),
    )
    scans = HolderScans()

    async def main() -> None:
        shared = PeerProcess.capture(_creds(os.getpid()), server_inode=server_inode)
        try:
            with pytest.raises(
                PeerChanged, match=rf"shared with other processes \(pids \[{child.pid}\]"
            ):
                await shared.ensure_sole_holder_shared(scans)
        finally:
            shared.close()
        scanner = scans._process
        assert scanner is not None and scanner.process.poll() is None
        assert scanner.process.pid not in (os.getpid(), child.pid)
        assert child.stdin is not None
        child.stdin.close()
        await asyncio.to_thread(child.wait, 10)
        assert await scans.holders(client_inode) == {os.getpid()}
        sole = PeerProcess.capture(_creds(os.getpid()), server_inode=server_inode)
        try:
            await sole.ensure_sole_holder_shared(scans)
        finally:
            sole.close()
        assert scans._process is scanner  # the same process answered each scan
        assert scans.scans == 3

    try:
        asyncio.run(main())
        scanner = scans._process
        scans.close()
        assert scanner is not None and scanner.process.poll() is not None  # stopped, reaped
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        server_side.close()
        client.close()
        listener.close()


def test_holder_scans_survive_the_scan_process_dying(caplog: pytest.LogCaptureFixture) -> None:
    """A scan process killed between scans costs nothing but a log line: that batch is
    scanned in the agent (a thread) and the next starts a new process."""
    import socket as _socket

    a, b = _socket.socketpair()
    inode = os.fstat(a.fileno()).st_ino
    scans = HolderScans()

    async def main() -> None:
        assert await scans.holders(inode) == {os.getpid()}
        first = scans._process
        assert first is not None
        first.process.kill()
        await asyncio.to_thread(first.process.wait, 10)
        with caplog.at_level("ERROR", logger="node_agent.workload.peer"):
            assert await scans.holders(inode) == {os.getpid()}
        assert any("holder scan process failed" in r.getMessage() for r in caplog.records)
        assert scans._process is None
        assert await scans.holders(inode) == {os.getpid()}
        assert scans._process is not None and scans._process is not first

    try:
        asyncio.run(main())
    finally:
        scans.close()
        a.close()
        b.close()


def test_holder_scan_replies_past_the_listed_pids_still_refuse() -> None:
    """A socket with more holders than a reply lists is refused all the same: the reply
    keeps the true count, and the pids it leaves out stand in as -1."""
    from node_agent.workload import holders

    many = set(range(1000, 1000 + holders.MAX_PIDS_LISTED + 5))
    messages = list(holders.encode_reply({7: many, 8: {os.getpid()}}))
    assert all(len(m) <= holders.MESSAGE_MAX for m in messages)
    got: dict[int, tuple[int, set[int]]] = {}
    assert [holders.decode_reply(m, got) for m in messages][-1] is True
    assert got[8] == (1, {os.getpid()})
    count, listed = got[7]
    assert count == len(many) and len(listed) == holders.MAX_PIDS_LISTED
    peer = PeerProcess.capture(_creds(os.getpid()))
    try:
        with pytest.raises(PeerChanged, match="and more"):
            peer._judge_holders(listed | {os.getpid(), -1})
    finally:
        peer.close()
    # a reply bigger than one datagram is split
    huge = {inode: many for inode in range(200)}
    parts = list(holders.encode_reply(huge))
    assert len(parts) > 1 and parts[-1][:1] == b"E"
    assert all(len(m) <= holders.MESSAGE_MAX for m in parts)
    got = {}
    for m in parts:
        holders.decode_reply(m, got)
    assert set(got) == set(huge)
