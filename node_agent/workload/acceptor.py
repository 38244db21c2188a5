"""The accept process: accepts Workload API connections, pins or sheds them, hands them over.

:class:`~node_agent.workload.tracker.PeerTrackingProxy` starts this module as a process of
its own (a fresh interpreter, ``-I -S``, importing only the standard library and
:mod:`node_agent.workload.pinning`) with two inherited descriptors: the public listening
socket and one end of a ``SOCK_SEQPACKET`` socket pair to the agent. It does nothing but:

1. accept every connection as soon as the kernel queues it;
2. read ``SO_PEERCRED`` and shed the connection (close it at once) when its uid already has
   ``max_open`` connections open or connects faster than its token bucket allows
   (``rate`` a second, ``burst`` saved up);
3. otherwise pin the caller at once (:func:`~node_agent.workload.pinning.pin`: the pidfd from
   ``SO_PEERPIDFD``, start time, effective ids, executable) and pass the connection and the
   pidfd to the agent with ``SCM_RIGHTS``, with the pinned facts;
4. count refusals and send the agent one summary per ``log_interval`` seconds (the agent
   logs it);
5. send a heartbeat every ``heartbeat`` seconds, so the agent notices when this process
   hangs (say in ``stat()`` of an executable on a hung network or FUSE mount) and replaces
   it.

The agent passes its count of open connections by uid in the config (``open``): a process
started after another one exited must count the relays still open, or their releases would
free slots it never counted.

Why a process and not a thread of the agent: a Python thread needs the agent's GIL after
every ``accept()``, and the event loop and the gRPC server hold it for milliseconds at a
time. While one user looped ``connect(); close()`` the thread fell behind, the listen queue
filled, and other users' ``connect()`` failed (``EAGAIN``: gRPC's ``UNAVAILABLE``) or waited
behind thousands of queued connections. This process competes for nothing but a CPU, and
runs at a raised priority where the agent may raise it (root).

Protocol (each message one datagram; the first byte says what it is):

* to the agent, ``C`` + :data:`CONNECTION` with two descriptors (the connection, the pidfd);
* to the agent, ``L`` + JSON ``[[reason, uid, count], ...]``: refusals since the last one
  (at most :data:`SUMMARY_ENTRIES` entries a message, several messages when there are more);
* to the agent, ``H``: a heartbeat;
* from the agent, ``R`` + :data:`RELEASE`: a connection of ``uid`` closed;
* from the agent, ``S``: stop (the last refusal counts are sent first).

The process exits when the agent says so, closes its end, or dies.
"""

from __future__ import annotations

import _socket
import array
import contextlib
import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable

from node_agent.workload.pinning import PinRefused, peer_pidfd, pin

__all__ = ["CONNECTION", "RELEASE", "Acceptor", "main"]

CONNECTION = struct.Struct("=iiiQQQB")
"""pid, uid, gid (``SO_PEERCRED``), start time, executable ``st_dev``, ``st_ino``, and
whether the executable could be seen (1) or not (0)."""
_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
RELEASE = struct.Struct("=i")
"""The uid whose connection closed."""
MESSAGE_MAX = 65536
"""The agent reads messages into a buffer this big."""

ACCEPT_NICE = -10
"""Nice value of this process where it may raise it (root): a user churning connections from
many processes must not out-run its accepting them."""
BATCH = 256
"""Connections accepted before the agent's channel is looked at again (at once: no pause
while connections are queued, see :meth:`Acceptor._accept_batch`)."""
PAUSE_UNDER_CHURN = 0.0005
"""Seconds to wait after a batch that shed connections and emptied the listen queue (a
flood of 100,000 connections a second queues 50 meanwhile; the queue holds 4096)."""
MAX_OUTBOX = 1024
"""Pinned connections waiting for the agent to take them; beyond that one is shed (see
:meth:`Acceptor._queue`)."""
SUMMARY_ENTRIES = 32
"""Refusal counts per ``L`` message (each well below :data:`MESSAGE_MAX`)."""


class Acceptor:
    """The accept loop (see the module docstring); :meth:`run` returns when the agent leaves."""

    def __init__(
        self,
        listener: socket.socket,
        channel: socket.socket,
        *,
        max_open: int,
        rate: float,
        burst: float,
        log_interval: float,
        heartbeat: float = 1.0,
        open_by_uid: dict[int, int] | None = None,
    ) -> None:
        self.listener = listener
        # The C accept, returning the bare descriptor (socket.accept() wraps it once more).
        self._accept: Callable[[], tuple[int, object]] = getattr(listener, "_accept")  # noqa: B009
        self.channel = channel
        self.max_open = max_open
        self.rate = rate
        self.burst = burst
        self.log_interval = log_interval
        self.heartbeat = heartbeat
        self.max_outbox = MAX_OUTBOX
        self.open_by_uid: dict[int, int] = {u: n for u, n in (open_by_uid or {}).items() if n > 0}
        self._buckets: dict[int, list[float]] = {}  # uid -> [tokens, stamp]
        # (message, descriptors, uid of the connection or -1)
        self._outbox: deque[tuple[bytes, list[int], int]] = deque()
        self._queued_by_uid: dict[int, int] = {}
        self._queued_total = 0
        self._next_heartbeat = 0.0
        self._refused: dict[tuple[str, int], int] = {}
        self._last_summary = -log_interval
        self._too_many = f"too many open connections for this uid (limit {max_open})"
        self._gone = False  # the agent closed the channel or said stop (seen mid-batch)
        self._too_fast = f"connecting too fast (limit {rate:g}/s, burst {burst:g})"

    # -- admission ----------------------------------------------------------------------

    def _admit(self, uid: int, now: float) -> str:
        """Why ``uid``'s new connection is shed, or "" (then it counts as open)."""
        bucket = self._buckets.get(uid)
        if bucket is None:
            if len(self._buckets) > 4096:  # forget full (idle) buckets
                self._buckets = {
                    u: b
                    for u, b in self._buckets.items()
                    if b[0] + (now - b[1]) * self.rate < self.burst
                }
            bucket = self._buckets[uid] = [self.burst, now]
        if self.open_by_uid.get(uid, 0) >= self.max_open:
            return self._too_many
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return self._too_fast
        bucket[0] = tokens - 1
        self.open_by_uid[uid] = self.open_by_uid.get(uid, 0) + 1
        return ""

    def _release(self, uid: int) -> None:
        left = self.open_by_uid.get(uid, 0) - 1
        if left > 0:
            self.open_by_uid[uid] = left
        else:
            self.open_by_uid.pop(uid, None)

    def _refuse(self, reason: str, uid: int) -> None:
        key = (reason, uid)
        self._refused[key] = self._refused.get(key, 0) + 1

    def _summarize(self, now: float) -> None:
        self._last_summary = now
        counts = [[reason, uid, n] for (reason, uid), n in sorted(self._refused.items())]
        self._refused = {}
        for i in range(0, len(counts), SUMMARY_ENTRIES):
            self._send(b"L" + json.dumps(counts[i : i + SUMMARY_ENTRIES]).encode(), [])

    # -- one connection -----------------------------------------------------------------

    def _handle(self, conn: socket.socket, pid: int, uid: int, gid: int, now: float) -> None:
        reason = self._admit(uid, now)
        if reason is self._too_many and not self._gone:
            # The agent may have released one of this uid's connections since this batch
            # began (the client closed one and connected again while we were accepting):
            # apply what is waiting in the channel before shedding it at its limit.
            if self._read_channel():
                reason = self._admit(uid, now)
            else:
                self._gone = True
        if reason:
            conn.close()
            self._refuse(reason, uid)
            return
        try:
            pidfd, start_time, exe = pin(pid, uid, gid, peer_pidfd(conn))
        except (PinRefused, OSError) as err:
            conn.close()
            self._release(uid)
            self._refuse(err.reason if isinstance(err, PinRefused) else str(err), uid)
            return
        dev, ino = exe if exe is not None else (0, 0)
        data = b"C" + CONNECTION.pack(pid, uid, gid, start_time, dev, ino, exe is not None)
        self._queue(uid, data, [conn.detach(), pidfd])

    _SLOW_AGENT = "the agent is not taking connections fast enough"

    def _queue(self, uid: int, data: bytes, fds: list[int]) -> None:
        """Queue a pinned connection of ``uid`` (counted open) for the agent.

        While the agent is not reading, at most :attr:`max_outbox` wait. When that is full,
        the connection shed is the newest one of the uid with the most waiting (this one
        when that is its own uid): one uid churning connections while the agent stalls
        cannot shed another uid's.
        """
        queued = self._queued_by_uid
        if self._queued_total >= self.max_outbox:
            top = max(queued, key=queued.__getitem__)
            if queued[top] <= queued.get(uid, 0):
                top = uid
            if top == uid:
                for fd in fds:
                    os.close(fd)
                self._release(uid)
                self._refuse(self._SLOW_AGENT, uid)
                return
            self._drop_newest(top)
        queued[uid] = queued.get(uid, 0) + 1
        self._queued_total += 1
        self._send(data, fds, uid)

    def _drop_newest(self, uid: int) -> None:
        """Shed the newest connection of ``uid`` waiting in the outbox."""
        outbox = self._outbox
        for i in range(len(outbox) - 1, -1, -1):
            if outbox[i][2] == uid:
                _, fds, _ = outbox[i]
                del outbox[i]
                for fd in fds:
                    os.close(fd)
                self._unqueued(uid)
                self._release(uid)
                self._refuse(self._SLOW_AGENT, uid)
                return

    def _unqueued(self, uid: int) -> None:
        self._queued_total -= 1
        left = self._queued_by_uid.get(uid, 0) - 1
        if left > 0:
            self._queued_by_uid[uid] = left
        else:
            self._queued_by_uid.pop(uid, None)

    def _accept_batch(self) -> bool:
        """Accept what is queued (up to :data:`BATCH`); shed the excess as cheaply as we can.

        A uid connecting as fast as it can makes this loop do as much work per connection
        as it does itself (the kernel's part of ``accept()`` and ``close()`` is most of
        it), so the shed path does nothing more than it must: ``SO_PEERCRED`` read through
        a bare ``_socket.socket`` (no Python-level wrapper to build and close), that uid's
        bucket looked at before anything else, no clock read per connection, no string
        formatting, no ``/proc`` read, no pidfd.

        The listen queue is one for every uid: when a flood fills it, everyone else's
        ``connect()`` fails (``EAGAIN``, which gRPC reports as ``UNAVAILABLE`` or retries
        after its one-second reconnect backoff). So this never pauses while connections
        are queued: after :data:`BATCH` it returns at once (the caller looks at the agent's
        channel and comes back), and only a batch that emptied the queue and shed
        something is followed by :data:`PAUSE_UNDER_CHURN`. Returns whether the queue was
        emptied.
        """
        accept = self._accept
        buckets, refused, rate, too_fast = self._buckets, self._refused, self.rate, self._too_fast
        bare, family, kind = _socket.socket, socket.AF_UNIX, socket.SOCK_STREAM
        sol, peercred, size = socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size
        now = time.monotonic()
        shed = 0
        drained = False
        for _ in range(BATCH):
            try:
                fd, _ = accept()
            except BlockingIOError:
                drained = True
                break
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._refuse(f"cannot accept: {err.strerror}", -1)
                    time.sleep(0.01)  # out of descriptors: let some connections close
                    break
                if err.errno == errno.EINVAL:  # the listener was shut down
                    raise
                continue  # ECONNABORTED and the like: that connection is gone
            conn = bare(family, kind, 0, fd)
            try:
                pid, uid, gid = _UCRED.unpack(conn.getsockopt(sol, peercred, size))
            except OSError as err:
                conn.close()
                self._refuse(f"no peer credentials: {err.strerror}", -1)
                continue
            bucket = buckets.get(uid)
            if bucket is not None and bucket[0] + (now - bucket[1]) * rate < 1:
                # Out of tokens (leaving the bucket as it is refills it the same).
                conn.close()
                key = (too_fast, uid)
                refused[key] = refused.get(key, 0) + 1
                shed += 1
                continue
            self._handle(socket.socket(family, kind, 0, conn.detach()), pid, uid, gid, now)
        if self._refused and now - self._last_summary >= self.log_interval:
            self._summarize(now)
        if shed and drained:
            # Someone is churning: let the queue gather a few before the next wake-up, so
            # shedding costs a wake-up per batch rather than per connection.
            time.sleep(PAUSE_UNDER_CHURN)
        return drained

    # -- the agent's channel ------------------------------------------------------------

    def _send(self, data: bytes, fds: list[int], uid: int = -1) -> None:
        """Hand ``data`` (and ``fds``, closed here once sent) to the agent now, or queue it."""
        self._outbox.append((data, fds, uid))
        if len(self._outbox) == 1:
            self._flush()  # a failure (the agent is gone) shows in the poll loop

    def _flush(self) -> bool:
        """Send what is queued; False when the agent is gone."""
        outbox = self._outbox
        while outbox:
            data, fds, uid = outbox[0]
            try:
                if fds:
                    rights = array.array("i", fds).tobytes()
                    self.channel.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
                else:
                    self.channel.send(data)
            except BlockingIOError:
                return True
            except OSError:
                return False
            outbox.popleft()
            for fd in fds:  # the agent has its own copies now
                os.close(fd)
            if uid >= 0:
                self._unqueued(uid)
        return True

    def _read_channel(self) -> bool:
        """Apply the agent's releases; False when the agent is gone."""
        while True:
            try:
                data = self.channel.recv(64)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            if data[:1] == b"R" and len(data) == 1 + RELEASE.size:
                self._release(RELEASE.unpack_from(data, 1)[0])
            elif data == b"S":  # stop: send the last refusal counts, then leave
                if self._refused:
                    self._summarize(time.monotonic())
                self.channel.settimeout(5)
                self._flush()
                return False

    def run(self) -> None:
        """Serve until the agent closes the channel."""
        self.listener.setblocking(False)
        self.channel.setblocking(False)
        lfd, cfd = self.listener.fileno(), self.channel.fileno()
        poller = select.poll()
        poller.register(lfd, select.POLLIN)
        poller.register(cfd, select.POLLIN)
        want_out = False
        while True:
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + self.heartbeat
                if not self._outbox:  # anything queued tells the agent we are alive anyway
                    self._send(b"H", [])
            wake = self._next_heartbeat
            if self._refused:
                wake = min(wake, self._last_summary + self.log_interval)
            timeout = max(0.0, wake - now) * 1000 + 1
            for fd, events in poller.poll(timeout):
                if fd == cfd:
                    if events & select.POLLIN and not self._read_channel():
                        return
                    if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                        return
                elif events & select.POLLIN:
                    # The agent's releases first, even when poll() listed the listener
                    # first: a client that closed its connection and connects again must
                    # find its slot freed, not be shed at its per-uid limit.
                    if not self._read_channel():
                        return
                    try:
                        self._accept_batch()
                    except OSError:
                        return
                    if self._gone:
                        return
                elif events & (select.POLLERR | select.POLLNVAL):
                    return
            if self._refused and (time.monotonic() - self._last_summary >= self.log_interval):
                self._summarize(time.monotonic())
            if not self._flush():
                return
            if bool(self._outbox) != want_out:
                want_out = bool(self._outbox)
                poller.modify(cfd, select.POLLIN | (select.POLLOUT if want_out else 0))


def main(argv: list[str] | None = None) -> None:
    """``acceptor LISTENER_FD CHANNEL_FD CONFIG_JSON`` (started by the agent, not by hand)."""
    args = sys.argv[1:] if argv is None else argv
    listener_fd, channel_fd, config = int(args[0]), int(args[1]), json.loads(args[2])
    # The agent decides when this process stops (it closes the channel): a terminal's ^C
    # or a SIGTERM to the process group must not leave the agent without its accept loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # not permitted (not root): keep the priority
        os.setpriority(os.PRIO_PROCESS, 0, ACCEPT_NICE)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, listener_fd)
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, channel_fd)
    Acceptor(
        listener,
        channel,
        max_open=int(config["max_open"]),
        rate=float(config["rate"]),
        burst=float(config["burst"]),
        log_interval=float(config["log_interval"]),
        heartbeat=float(config.get("heartbeat", 1.0)),
        open_by_uid={int(uid): int(n) for uid, n in config.get("open", {}).items()},
    ).run()


if __name__ == "__main__":
    main()
