"""Which processes hold a socket: the ``/proc/*/fd`` scan, and a process that runs it.

The holder check (:meth:`~node_agent.workload.peer.PeerProcess.ensure_sole_holder`) needs,
for the client end of each new Workload API connection, every process with a descriptor on
it. Linux keeps no map from a socket to its holders, so :func:`scan_socket_holders` reads
every ``/proc/<pid>/fd``: a few milliseconds of CPU with a hundred processes, nearly all of
it Python bytecode holding the GIL. Run in a thread of the agent, it competed with the event
loop (the relay, gRPC, the handlers) for the one GIL; :class:`~node_agent.workload.peer.
HolderScans` therefore sends each batch of inodes to a process of its own, started from this
module like the accept process (a fresh interpreter, ``-I -S``, the standard library only),
which scans on another core and answers.

Protocol over a ``SOCK_SEQPACKET`` socket pair (one datagram per message; one request at a
time, so a scan always begins after the request that it answers was sent):

* from the agent, ``Q`` + inodes (:data:`INODE`, up to :data:`MAX_INODES`): scan now;
* to the agent, ``A`` + entries, then a last datagram ``E`` + entries (the reply is split so
  every datagram stays under :data:`MESSAGE_MAX`). An entry is :data:`ENTRY` (inode, number
  of holders, number of pids listed) then the pids (:data:`PID`), at most
  :data:`MAX_PIDS_LISTED` of them: a socket with more holders than that is refused either
  way (the pinned process is missing from the list, or others are in it).

The process exits when the agent closes its end (or dies).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
from collections.abc import Collection, Iterator

__all__ = [
    "ENTRY",
    "INODE",
    "MAX_INODES",
    "MAX_PIDS_LISTED",
    "MESSAGE_MAX",
    "PID",
    "decode_reply",
    "encode_reply",
    "main",
    "scan_socket_holders",
]

INODE = struct.Struct("=Q")
ENTRY = struct.Struct("=QII")
"""inode, how many processes hold it, how many of their pids follow."""
PID = struct.Struct("=i")
MESSAGE_MAX = 32768
"""No datagram either way is bigger (well under the socket buffer)."""
MAX_INODES = (MESSAGE_MAX - 1) // INODE.size
"""Inodes per request (the agent splits a bigger batch)."""
MAX_PIDS_LISTED = 64
"""Pids listed per inode in a reply; the count is always the true number."""


def scan_socket_holders(inodes: Collection[int], proc_root: str = "/proc") -> dict[int, set[int]]:
    """For each socket inode, the pids of every process with a descriptor on it (that we may see).

    One pass over ``<proc_root>/*/fd`` answers any number of inodes, so concurrent holder
    checks share it. Each fd directory is opened once and its links are read relative to
    it. A process whose fd table the agent may not read (another user's, when the agent is
    not root) is not seen.
    """
    targets = {f"socket:[{inode}]": inode for inode in inodes}
    holders: dict[int, set[int]] = {inode: set() for inode in inodes}
    if not targets:
        return holders
    readlink = os.readlink
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        try:
            fd_dir = os.open(f"{proc_root}/{name}/fd", flags)
        except OSError:
            continue
        try:
            fds = os.listdir(fd_dir)
            for fd in fds:
                try:
                    link = readlink(fd, dir_fd=fd_dir)
                except OSError:
                    continue
                if (inode := targets.get(link)) is not None:
                    holders[inode].add(int(name))
        except OSError:
            continue
        finally:
            os.close(fd_dir)
    return holders


def encode_reply(found: dict[int, set[int]]) -> Iterator[bytes]:
    """The reply datagrams for ``found`` (``A`` ..., then ``E``)."""
    chunk: list[bytes] = []
    size = 1
    for inode, pids in found.items():
        listed = sorted(pids)[:MAX_PIDS_LISTED]
        entry = ENTRY.pack(inode, len(pids), len(listed)) + b"".join(map(PID.pack, listed))
        if size + len(entry) > MESSAGE_MAX:
            yield b"A" + b"".join(chunk)
            chunk, size = [], 1
        chunk.append(entry)
        size += len(entry)
    yield b"E" + b"".join(chunk)


def decode_reply(data: bytes, into: dict[int, tuple[int, set[int]]]) -> bool:
    """Add one reply datagram's entries to ``into`` (inode -> (holders, listed pids)); True
    when it was the last. Raises :class:`ValueError` if it is malformed."""
    tag = data[:1]
    if tag not in (b"A", b"E"):
        raise ValueError(f"unexpected message {tag!r} from the holder scan process")
    offset = 1
    while offset < len(data):
        inode, count, listed = ENTRY.unpack_from(data, offset)
        offset += ENTRY.size
        end = offset + listed * PID.size
        if listed > count or end > len(data):
            raise ValueError("malformed reply from the holder scan process")
        pids = {PID.unpack_from(data, at)[0] for at in range(offset, end, PID.size)}
        into[inode] = (count, pids)
        offset = end
    return tag == b"E"


def serve(channel: socket.socket, proc_root: str) -> None:
    """Answer scan requests on ``channel`` until the agent closes it."""
    while True:
        try:
            data = channel.recv(MESSAGE_MAX)
        except OSError:
            return
        if not data:
            return
        if data[:1] != b"Q" or (len(data) - 1) % INODE.size:
            return  # not from the agent we know: leave, it starts another
        inodes = [i for (i,) in INODE.iter_unpack(data[1:])]
        found = scan_socket_holders(inodes, proc_root)
        try:
            for message in encode_reply(found):
                channel.send(message)
        except OSError:
            return


def main(argv: list[str] | None = None) -> None:
    """``holders CHANNEL_FD PROC_ROOT`` (started by the agent, not by hand)."""
    args = sys.argv[1:] if argv is None else argv
    # Like the accept process: the agent decides when this stops (it closes the channel).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, int(args[0]))
    serve(channel, args[1])


if __name__ == "__main__":
    main()
