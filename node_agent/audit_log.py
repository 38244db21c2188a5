"""The agent's local audit log: which process was handed which SVID, hash-chained.

Every X509-SVID and JWT-SVID the Workload API hands a workload is one record
(:mod:`credo._audit`, the server trail's format and chain): actor ``workload``
(``pid=P uid=U``), subject the SPIFFE ID, target the serial (X.509) or nothing (JWT; its
SHA-256 is in the details, never the token), details the caller's selectors, the entry
and the expiry. So "which process held this SVID" has an answer on the node.

Files live in ``<data_dir>/audit/`` (0700; files 0600): ``deliveries.jsonl`` is written,
and when it reaches ``max_bytes`` it becomes ``deliveries.jsonl.1`` (older ones shift up
to ``.keep``, the oldest is dropped) and a new file continues the chain. Each file starts
with a header line naming the seq and ``prev_hash`` it continues from, so the files left
verify together (:func:`verify_log`), as a pruned server trail does.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from credo._audit import (
    FORMAT,
    GENESIS,
    Actor,
    AuditRecord,
    ChainBroken,
    PendingRecord,
    VerifyResult,
    chain_record,
    verify_chain,
)

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_MAX_BYTES",
    "LOG_NAME",
    "DeliveryLog",
    "read_records",
    "verify_log",
]

LOG_NAME: Final = "deliveries.jsonl"
DEFAULT_MAX_BYTES: Final = 10 * 1024 * 1024
DEFAULT_KEEP: Final = 5
_KIND: Final = "credo-agent-audit-log"


def _line(rec: AuditRecord) -> str:
    data: dict[str, Any] = rec.to_dict()
    data["details"] = rec.details  # the exact hashed text
    del data["time"]
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _parse(path: Path, number: int, line: str) -> AuditRecord:
    try:
        data = json.loads(line)
        return AuditRecord(
            seq=int(data["seq"]),
            time_ms=int(data["time_ms"]),
            actor=Actor(data["actor_kind"], str(data["actor"])),
            action=str(data["action"]),
            subject=str(data["subject"]),
            target=str(data["target"]),
            owner=str(data["owner"]),
            outcome=str(data["outcome"]),
            reason=str(data["reason"]),
            request_id=str(data["request_id"]),
            details=str(data["details"]),
            prev_hash=str(data["prev_hash"]),
            hash=str(data["hash"]),
        )
    except (ValueError, KeyError, TypeError):
        raise ChainBroken(0, f"{path.name} line {number} is not an audit record") from None


def _header(path: Path, line: str) -> tuple[int, str]:
    try:
        data = json.loads(line)
        if data.get("kind") != _KIND or data.get("format") != FORMAT:
            raise ValueError
        return int(data["first_seq"]), str(data["prev_hash"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ChainBroken(0, f"{path.name} line 1 is not an agent audit log header") from None


def _files(directory: Path) -> list[Path]:
    """The log files, oldest first."""
    rotated = sorted(
        (p for p in directory.glob(f"{LOG_NAME}.*") if p.suffix.lstrip(".").isdigit()),
        key=lambda p: int(p.suffix.lstrip(".")),
        reverse=True,
    )
    current = directory / LOG_NAME
    return [*rotated, *([current] if current.exists() else [])]


def read_records(directory: Path) -> list[AuditRecord]:
    """Every record in the log files of ``directory``, oldest first (not verified)."""
    out: list[AuditRecord] = []
    for path in _files(directory):
        lines = path.read_text(encoding="utf-8").splitlines()
        out.extend(_parse(path, i, line) for i, line in enumerate(lines[1:], start=2))
    return out


def verify_log(directory: Path) -> VerifyResult:
    """Verify every log file in ``directory`` as one chain; :class:`ChainBroken` if not.

    The oldest file left anchors the chain on its header (older files were rotated away).
    """
    files = _files(directory)
    records: list[AuditRecord] = []
    first: tuple[int, str] | None = None
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines:
            continue
        start, prev = _header(path, lines[0])
        if first is None:
            first = (start, prev)
        elif records and (start != records[-1].seq + 1 or prev != records[-1].hash):
            raise ChainBroken(start, f"{path.name} does not continue the file before it")
        records.extend(_parse(path, i, line) for i, line in enumerate(lines[1:], start=2))
    if first is None:
        return VerifyResult(0, 1, 0, GENESIS)
    return verify_chain(records, first_seq=first[0], first_prev_hash=first[1])


class DeliveryLog:
    """Appends delivery records to the chained, size-rotated log in ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dir = directory
        self._max = max_bytes
        self._keep = keep
        self._clock = clock
        self._lock = threading.Lock()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._seq, self._prev = self._resume()
        self._path = str(self.path)
        self._fd = -1  # open (O_APPEND) on the file at self._path, whose identity is:
        self._fd_file: tuple[int, int] | None = None

    @property
    def path(self) -> Path:
        return self._dir / LOG_NAME

    def _resume(self) -> tuple[int, str]:
        """The last record's seq and hash, from the newest file that has one."""
        for path in reversed(_files(self._dir)):
            lines = path.read_text(encoding="utf-8").splitlines()
            if len(lines) > 1:
                last = _parse(path, len(lines), lines[-1])
                return last.seq, last.hash
            if lines:
                start, prev = _header(path, lines[0])
                return start - 1, prev
        return 0, GENESIS

    def _open_new(self) -> None:
        header = {
            "kind": _KIND,
            "format": FORMAT,
            "first_seq": self._seq + 1,
            "prev_hash": self._prev,
        }
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(header, sort_keys=True, separators=(",", ":")) + "\n")

    def _rotate(self) -> None:
        oldest = self._dir / f"{LOG_NAME}.{self._keep}"
        oldest.unlink(missing_ok=True)
        for i in range(self._keep - 1, 0, -1):
            src = self._dir / f"{LOG_NAME}.{i}"
            if src.exists():
                src.rename(self._dir / f"{LOG_NAME}.{i + 1}")
        self.path.rename(self._dir / f"{LOG_NAME}.1")

    def record(self, pending: PendingRecord) -> AuditRecord:
        """Chain ``pending`` after the last record and append it (written to the file).

        The file stays open between records; each record first checks (one ``stat``) that
        the path still names that file, and starts a new one if it was removed.
        """
        with self._lock:
            try:
                st: os.stat_result | None = os.stat(self._path)
            except FileNotFoundError:
                st = None
            if st is None or (st.st_dev, st.st_ino) != self._fd_file:
                st = self._reopen(st is not None)
            rec = chain_record(
                pending, seq=self._seq + 1, time_ms=int(self._clock() * 1000), prev_hash=self._prev
            )
            line = (_line(rec) + "\n").encode("utf-8")
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            self._seq, self._prev = rec.seq, rec.hash
            if st.st_size + len(line) >= self._max:
                self._close_file()
                self._rotate()
                self._open_new()
            return rec

    def _reopen(self, exists: bool) -> os.stat_result:
        """Open the log file for appending (a new one, with its header, if missing)."""
        self._close_file()
        if not exists:
            self._open_new()
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self._fd_file = (st.st_dev, st.st_ino)
        return st

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._fd_file = -1, None

    def close(self) -> None:
        """Close the open log file (a later record opens it again). Idempotent."""
        with self._lock:
            self._close_file()
