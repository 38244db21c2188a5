"""The agent's local delivery log: chained records, size rotation, resume, tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from credo._audit import Actor, ChainBroken, PendingRecord
from node_agent.audit_log import LOG_NAME, DeliveryLog, read_records, verify_log


def _delivery(i: int) -> PendingRecord:
    return PendingRecord(
        action="x509_svid.deliver",
        actor=Actor("workload", f"pid={1000 + i} uid=1000"),
        subject="spiffe://example.org/w",
        target=format(i, "x"),
        details={"pid": 1000 + i, "uid": 1000, "selectors": ["unix:uid:1000"]},
    )


def test_rotation_keeps_one_chain_across_files_and_drops_the_oldest(tmp_path: Path) -> None:
    """Small files rotate; the files left verify as one chain; reopening resumes it."""
    log = DeliveryLog(tmp_path / "audit", max_bytes=1500, keep=2)
    for i in range(30):
        log.record(_delivery(i))
    names = sorted(p.name for p in (tmp_path / "audit").iterdir())
    assert names == [LOG_NAME, f"{LOG_NAME}.1", f"{LOG_NAME}.2"]
    assert oct((tmp_path / "audit").stat().st_mode & 0o777) == "0o700"
    assert all((tmp_path / "audit" / n).stat().st_mode & 0o777 == 0o600 for n in names)
    result = verify_log(tmp_path / "audit")
    assert result.last_seq == 30 and result.first_seq > 1  # the oldest file was dropped
    again = DeliveryLog(tmp_path / "audit", max_bytes=1500, keep=2)
    assert again.record(_delivery(99)).seq == 31
    assert verify_log(tmp_path / "audit").last_seq == 31
    assert read_records(tmp_path / "audit")[-1].target == "63"


def test_a_changed_byte_or_a_missing_file_breaks_the_log(tmp_path: Path) -> None:
    """Editing a rotated file, or removing the middle one, is named by verify_log."""
    directory = tmp_path / "audit"
    log = DeliveryLog(directory, max_bytes=1500, keep=3)
    for i in range(30):
        log.record(_delivery(i))
    rotated = directory / f"{LOG_NAME}.1"
    lines = rotated.read_text().splitlines()
    record = json.loads(lines[2])
    changed = lines[2].replace(f'"target":"{record["target"]}"', '"target":"ff"')
    assert changed != lines[2]
    lines[2] = changed
    original = rotated.read_text()
    rotated.write_text("\n".join(lines) + "\n")
    with pytest.raises(ChainBroken, match="modified") as info:
        verify_log(directory)
    assert info.value.seq == record["seq"]
    rotated.write_text(original)
    verify_log(directory)
    rotated.unlink()
    with pytest.raises(ChainBroken, match="does not continue the file before it"):
        verify_log(directory)


def test_a_log_file_removed_or_replaced_while_open_is_not_written_blind(tmp_path: Path) -> None:
    """The log keeps its file open between records, but each record looks at the path
    first: a removed file is started again (its header continuing the chain) and a file
    put in its place is appended to, so no record goes to an unlinked file."""
    directory = tmp_path / "audit"
    log = DeliveryLog(directory)
    log.record(_delivery(0))
    (directory / LOG_NAME).unlink()
    log.record(_delivery(1))
    assert [r.seq for r in read_records(directory)] == [2]
    assert verify_log(directory).last_seq == 2
    path = directory / LOG_NAME
    kept = path.read_text()
    path.rename(directory / "elsewhere")
    path.write_text(kept)  # another file, same content, at the path
    log.record(_delivery(2))
    assert [r.seq for r in read_records(directory)] == [2, 3]
    assert (directory / "elsewhere").read_text() == kept  # the old file got nothing more
    log.close()
    log.record(_delivery(3))
    assert verify_log(directory).last_seq == 4
