"""The Workload API accept process and its handoff to the agent (the real process and
socket pair, driven through PeerTrackingProxy)."""

from __future__ import annotations

import array
import asyncio
import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc import aio

from node_agent.workload import pinning
from node_agent.workload.acceptor import CONNECTION, MESSAGE_MAX, RELEASE, Acceptor
from node_agent.workload.tracker import _ACCEPTOR_CODE, PeerTrackingProxy


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short temp directory (Unix socket paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="credo-a-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class _Running:
    def __init__(self, proxy: PeerTrackingProxy, server: aio.Server) -> None:
        self.proxy, self.server = proxy, server
        self.channels: list[aio.Channel] = []

    def channel(self) -> aio.Channel:
        ch = aio.insecure_channel(
            "unix:" + self.proxy.public_path, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.channels.append(ch)
        return ch


async def _start(short_dir: str, **settings: Any) -> _Running:
    proxy = PeerTrackingProxy(os.path.join(short_dir, "api.sock"), **settings)

    async def who(request: bytes, context: aio.ServicerContext) -> bytes:
        peer = proxy.lookup(context.peer())
        return b"unknown" if peer is None else str(peer.pid).encode()

    handler = grpc.method_handlers_generic_handler(
        "T", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    assert server.add_insecure_port(proxy.internal_address) != 0
    await server.start()
    await proxy.start()
    return _Running(proxy, server)


async def _stop(r: _Running) -> None:
    for ch in r.channels:
        await ch.close()
    r.proxy.stop_accepting()
    await r.server.stop(None)
    await r.proxy.stop()


async def _who(ch: aio.Channel) -> bytes:
    answer: bytes = await ch.unary_unary("/T/Who")(b"", timeout=10)
    return answer


async def _until(condition: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def test_a_handoff_dropped_for_lost_descriptors_frees_its_slot(short_dir: str) -> None:
    """The agent reads a connection's message without room for its descriptors (the kernel
    drops them: MSG_CTRUNC); the accept process had counted it open, so the agent releases
    it, and the uid (limit 1) can connect again."""

    async def main() -> None:
        r = await _start(short_dir, max_connections_per_uid=1)
        try:
            acceptor = r.proxy._acceptor
            assert acceptor is not None
            loop = asyncio.get_running_loop()
            channel = acceptor.channel
            loop.remove_reader(channel.fileno())  # this test reads the next message itself
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(r.proxy.public_path)
            data = b""
            while data[:1] != b"C":  # (heartbeats come too)
                await asyncio.to_thread(select.select, [channel], [], [], 10)
                data, ancdata, flags, _ = channel.recvmsg(MESSAGE_MAX, 0)  # no room for fds
            assert data[:1] == b"C" and flags & socket.MSG_CTRUNC and not ancdata
            assert acceptor._message(data, ancdata, flags, adopt=True)
            loop.add_reader(channel.fileno(), acceptor._readable)
            s.close()
            assert await _who(r.channel()) == str(os.getpid()).encode()
        finally:
            await _stop(r)

    asyncio.run(main())


def test_a_restarted_accept_process_counts_the_relays_still_open(
    short_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The accept process dies while the uid has its limit (2) open: the new one refuses a
    third connection, and each close still makes room for one more."""

    async def main() -> None:
        r = await _start(short_dir, max_connections_per_uid=2)
        try:
            held = [r.channel(), r.channel()]
            await asyncio.gather(*(_who(ch) for ch in held))
            old = r.proxy._acceptor
            assert old is not None
            old.process.kill()
            await _until(
                lambda: r.proxy._acceptor not in (None, old), "no new accept process started"
            )
            with pytest.raises(grpc.RpcError) as err:
                await _who(r.channel())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await held[0].close()
            await _until(lambda: r.proxy.open_by_uid.get(os.geteuid()) == 1, "not released")
            assert await _who(r.channel()) == str(os.getpid()).encode()
        finally:
            await _stop(r)

    with caplog.at_level("WARNING", logger="node_agent.workload.tracker"):
        asyncio.run(main())
    refusals = [rec for rec in caplog.records if rec.getMessage() == "workload connections refused"]
    assert any("too many open connections" in getattr(rec, "reason", "") for rec in refusals)


def test_one_uid_filling_the_handoff_queue_does_not_shed_another_uids(
    short_dir: str,
) -> None:
    """The agent is not reading; uid 5000 fills the queue (4 here). uid 5001's connection
    is queued and one of 5000's is shed instead; 5000's next one is shed itself."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    try:
        while True:  # the agent stalls: its end of the channel is full
            ours.send(b"x" * 4096)
    except BlockingIOError:
        pass
    acc = Acceptor(listener, ours, max_open=100, rate=1000, burst=1000, log_interval=10)
    acc.max_outbox = 4
    pipes: dict[int, list[int]] = {5000: [], 5001: []}

    def connect(uid: int) -> list[int]:
        assert acc._admit(uid, time.monotonic()) == ""
        fds = list(os.pipe())
        pipes[uid].extend(fds)
        acc._queue(uid, b"C" + CONNECTION.pack(1, uid, uid, 0, 0, 0, 0), fds)
        return fds

    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True

    try:
        for _ in range(4):
            connect(5000)
        other = connect(5001)
        assert all(is_open(fd) for fd in other)
        assert acc.open_by_uid == {5000: 3, 5001: 1}
        assert sum(not is_open(fd) for fd in pipes[5000]) == 2  # its newest one
        assert not is_open(pipes[5000][-1])
        connect(5000)
        assert acc.open_by_uid == {5000: 3, 5001: 1}
        assert [uid for _, _, uid in acc._outbox] == [5000, 5000, 5000, 5001]
        assert acc._refused == {(acc._SLOW_AGENT, 5000): 2}
    finally:
        for _, fds, _ in acc._outbox:
            for fd in fds:
                os.close(fd)
        listener.close()
        ours.close()
        agent.close()


def test_refusal_summaries_of_many_uids_arrive_whole() -> None:
    """Refusals of 100 uids with long reasons reach the agent in several messages that
    each fit the agent's buffer (none cut off), every count once."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    acc = Acceptor(listener, ours, max_open=1, rate=1, burst=1, log_interval=10)
    try:
        for uid in range(100):
            for _ in range(uid + 1):
                acc._refuse("r" * 300 + str(uid), uid)
        acc._summarize(time.monotonic())
        agent.setblocking(False)
        entries = []
        while True:
            try:
                data, _, flags, _ = agent.recvmsg(MESSAGE_MAX)
            except BlockingIOError:
                break
            assert data[:1] == b"L" and not flags & socket.MSG_TRUNC
            entries.extend(json.loads(data[1:]))
        assert sorted(u for _, u, _ in entries) == list(range(100))
        assert all(n == u + 1 and r.endswith(str(u)) for r, u, n in entries)
    finally:
        listener.close()
        ours.close()
        agent.close()


def test_shedding_never_pauses_while_connections_are_queued(
    short_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A uid out of tokens has more connections queued than one batch: every one is shed
    without pinning (no /proc read, no pidfd), and the accept loop pauses only once the
    listen queue is empty. A pause with connections still queued lets a flood fill the
    queue, and then every other uid's connect() fails (EAGAIN)."""
    from node_agent.workload import acceptor as acceptor_module

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(short_dir, "l.sock"))
    listener.listen(4 * acceptor_module.BATCH)
    listener.setblocking(False)
    ours, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    acc = Acceptor(listener, ours, max_open=100, rate=0.001, burst=1, log_interval=10)
    uid = os.geteuid()
    acc._buckets[uid] = [0.0, time.monotonic()]  # out of tokens
    acc._last_summary = time.monotonic()  # no summary (it would reset the counts) yet
    pauses_with_queued: list[bool] = []

    def pause(seconds: float) -> None:
        pauses_with_queued.append(bool(select.select([listener], [], [], 0)[0]))

    def no_pin(*args: object) -> None:
        raise AssertionError("a shed connection was pinned")

    monkeypatch.setattr(acceptor_module.time, "sleep", pause)
    monkeypatch.setattr(acceptor_module, "pin", no_pin)
    count = acceptor_module.BATCH + 50
    try:
        for _ in range(count):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(listener.getsockname())
        for _ in range(10):
            if acc._accept_batch():
                break
        assert acc._refused == {(acc._too_fast, uid): count}
        assert pauses_with_queued == [False]
        assert not acc.open_by_uid
    finally:
        listener.close()
        ours.close()
        agent.close()


def test_a_release_sent_during_a_batch_frees_the_slot_before_shedding(short_dir: str) -> None:
    """The uid is at its limit (1) when a batch begins; the agent releases that connection
    (its client closed it) and the client connects again before the batch ends. The accept
    process reads the release before shedding the new connection at the limit, so the
    client is served, not refused."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(short_dir, "l.sock"))
    listener.listen(8)
    listener.setblocking(False)
    ours, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    uid = os.geteuid()
    acc = Acceptor(
        listener, ours, max_open=1, rate=100, burst=100, log_interval=10, open_by_uid={uid: 1}
    )
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        agent.send(b"R" + RELEASE.pack(uid))  # the release, not yet read by the accept loop
        client.connect(listener.getsockname())
        assert acc._accept_batch()
        assert acc._refused == {}
        assert acc.open_by_uid == {uid: 1}
        data, ancdata, _, _ = agent.recvmsg(MESSAGE_MAX, socket.CMSG_SPACE(8))
        assert data[:1] == b"C" and CONNECTION.unpack_from(data, 1)[:2] == (os.getpid(), uid)
        fds = array.array("i")
        for _, _, payload in ancdata:
            fds.frombytes(payload)
        assert len(fds) == 2
        for fd in fds:
            os.close(fd)
    finally:
        client.close()
        listener.close()
        ours.close()
        agent.close()


class _PeerPidfdError:
    """A socket whose SO_PEERPIDFD fails with ``code`` (the kernel's answers, by version)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def getsockopt(self, *args: int) -> int:
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ESRCH, errno.ENODATA])
def test_peer_pidfd_errors_of_an_exited_peer_refuse_instead_of_opening_by_pid(code: int) -> None:
    """On Linux 6.5 to 6.14 these mean the peer exited: its pid may name another process
    by now, so it must not be opened from the pid."""
    with pytest.raises(pinning.PinRefused, match="exited"):
        pinning.peer_pidfd(_PeerPidfdError(code))  # type: ignore[arg-type]


def test_peer_pidfd_unknown_option_falls_back_to_the_pid() -> None:
    """Before Linux 6.5 (ENOPROTOOPT) the caller opens a pidfd from the pid."""
    assert pinning.peer_pidfd(_PeerPidfdError(errno.ENOPROTOOPT)) is None  # type: ignore[arg-type]


def test_a_hung_accept_process_is_killed_and_replaced(
    short_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The accept process stops (SIGSTOP: as if stuck in stat() on a hung mount); its
    heartbeats stop, the agent kills it, logs it, and a new one serves connections."""

    async def main() -> None:
        r = await _start(short_dir, acceptor_heartbeat=0.05, acceptor_timeout=1.0)
        try:
            old = r.proxy._acceptor
            assert old is not None
            os.kill(old.process.pid, signal.SIGSTOP)
            await _until(lambda: r.proxy._acceptor not in (None, old), "not replaced")
            await _until(lambda: old.process.poll() is not None, "old one not reaped")
            assert old.process.returncode == -signal.SIGKILL
            assert await _who(r.channel()) == str(os.getpid()).encode()
        finally:
            await _stop(r)

    with caplog.at_level("ERROR", logger="node_agent.workload.tracker"):
        asyncio.run(main())
    assert any(
        rec.getMessage() == "the workload API accept process stopped answering; killing it"
        for rec in caplog.records
    )


def test_a_live_accept_process_is_left_alone(short_dir: str) -> None:
    """With heartbeats flowing, the watchdog keeps the accept process for many timeouts."""

    async def main() -> None:
        r = await _start(short_dir, acceptor_heartbeat=0.02, acceptor_timeout=1.0)
        try:
            first = r.proxy._acceptor
            for _ in range(20):  # two timeouts
                assert await _who(r.channel()) == str(os.getpid()).encode()
                await asyncio.sleep(0.1)
            assert r.proxy._acceptor is first
        finally:
            await _stop(r)

    asyncio.run(main())


def test_received_descriptors_are_close_on_exec(short_dir: str) -> None:
    """The pidfd that comes with a connection is not inherited by processes the agent
    starts (MSG_CMSG_CLOEXEC)."""

    async def main() -> None:
        r = await _start(short_dir)
        try:
            assert await _who(r.channel()) == str(os.getpid()).encode()
            (peer,) = r.proxy.peers.values()
            assert not os.get_inheritable(peer._pidfd)
        finally:
            await _stop(r)

    asyncio.run(main())


def test_a_malformed_refusal_summary_is_logged_not_raised(
    short_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        r = await _start(short_dir)
        try:
            acceptor = r.proxy._acceptor
            assert acceptor is not None
            for bad in (b"L{not json", b'L[["reason", "uid"]]', b"L7"):
                assert acceptor._message(bad, [], 0, adopt=True)
        finally:
            await _stop(r)

    with caplog.at_level("WARNING", logger="node_agent.workload.tracker"):
        asyncio.run(main())
    bad = [r for r in caplog.records if r.getMessage().startswith("malformed refusal summary")]
    assert len(bad) == 3


def test_the_accept_process_imports_the_standard_library_first(short_dir: str) -> None:
    """A module in the code root named like a standard one (site-packages when installed)
    does not shadow the standard library in the accept process."""
    root = os.path.join(short_dir, "root")
    os.mkdir(root)
    import node_agent

    os.symlink(os.path.dirname(node_agent.__file__), os.path.join(root, "node_agent"))
    with open(os.path.join(root, "json.py"), "w") as f:
        f.write("raise SystemExit(42)\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(short_dir, "l.sock"))
    listener.listen(1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    config = json.dumps({"max_open": 1, "rate": 1, "burst": 1, "log_interval": 1})
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _ACCEPTOR_CODE, root,
         str(listener.fileno()), str(theirs.fileno()), config],
        pass_fds=(listener.fileno(), theirs.fileno()),
    )  # fmt: skip
    theirs.close()
    try:
        ours.settimeout(10)
        assert ours.recv(64) == b"H"  # it runs (its first heartbeat)
    finally:
        ours.close()
        listener.close()
        assert proc.wait(timeout=10) == 0
