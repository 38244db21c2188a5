"""The unix workload attestor against real processes."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from credo.selector import Selector
from node_agent.workload.errors import AttestationFailed
from node_agent.workload.unix import UnixAttestor, UnixAttestorConfig


def _attest(attestor: UnixAttestor, pid: int) -> set[str]:
    return {str(s) for s in asyncio.run(attestor.attest(pid))}


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def sleeper_binary(tmp_path: Path) -> Path:
    """A private copy of the sleep binary, so the test may change it."""
    target = tmp_path / "my-sleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", target)
    return target


def _spawn(binary: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(binary), "30"])
    deadline = time.monotonic() + 5
    while os.readlink(f"/proc/{proc.pid}/exe") != str(binary):  # wait for exec
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc


@pytest.fixture
def child(sleeper_binary: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A running child process executing the private sleep copy."""
    proc = _spawn(sleeper_binary)
    yield proc
    proc.kill()
    proc.wait()


def test_current_process_selectors() -> None:
    """The current process gets its effective uid/gid, names, groups, path and digest."""
    selectors = _attest(UnixAttestor(), os.getpid())
    uid, gid = os.geteuid(), os.getegid()
    exe = os.readlink("/proc/self/exe")
    assert f"unix:uid:{uid}" in selectors
    assert f"unix:user:{pwd.getpwuid(uid).pw_name}" in selectors
    assert f"unix:gid:{gid}" in selectors
    assert f"unix:group:{grp.getgrgid(gid).gr_name}" in selectors
    for sgid in os.getgroups():
        assert f"unix:supplementary_gid:{sgid}" in selectors
    assert f"unix:path:{exe}" in selectors
    assert f"unix:sha256:{_sha256(exe)}" in selectors


def test_child_process_path_and_digest(
    child: subprocess.Popen[bytes], sleeper_binary: Path
) -> None:
    """A spawned child is attested with its own executable's path and SHA-256."""
    selectors = _attest(UnixAttestor(), child.pid)
    assert f"unix:path:{sleeper_binary}" in selectors
    assert f"unix:sha256:{_sha256(str(sleeper_binary))}" in selectors
    assert f"unix:uid:{os.geteuid()}" in selectors


def test_digest_cached_until_file_changes(sleeper_binary: Path) -> None:
    """The digest is computed once per unchanged file and recomputed after it changes."""
    attestor = UnixAttestor()
    first = _spawn(sleeper_binary)
    try:
        a = _attest(attestor, first.pid)
        b = _attest(attestor, first.pid)
    finally:
        first.kill()
        first.wait()
    assert a == b
    assert attestor.hash_count == 1
    with open(sleeper_binary, "ab") as f:  # same inode, new size/mtime
        f.write(b"\0")
    second = _spawn(sleeper_binary)
    try:
        c = _attest(attestor, second.pid)
    finally:
        second.kill()
        second.wait()
    assert attestor.hash_count == 2
    assert f"unix:sha256:{_sha256(str(sleeper_binary))}" in c
    assert c != a


@pytest.mark.parametrize("limit", [10, -1])
def test_size_limit_skips_digest(child: subprocess.Popen[bytes], limit: int) -> None:
    """A binary over the size limit (or a negative limit) gets a path but no sha256 selector."""
    selectors = _attest(UnixAttestor(UnixAttestorConfig(workload_size_limit=limit)), child.pid)
    assert any(s.startswith("unix:path:") for s in selectors)
    assert not any(s.startswith("unix:sha256:") for s in selectors)


def test_path_discovery_can_be_disabled(child: subprocess.Popen[bytes]) -> None:
    """With discover_workload_path off, only uid/gid/group selectors are produced."""
    selectors = _attest(UnixAttestor(UnixAttestorConfig(discover_workload_path=False)), child.pid)
    assert not any(s.startswith(("unix:path:", "unix:sha256:")) for s in selectors)
    assert Selector.parse(f"unix:uid:{os.geteuid()}").value in {s[5:] for s in selectors}


def test_unknown_pid_fails() -> None:
    """Attesting a pid that names no process raises AttestationFailed."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(AttestationFailed):
        _attest(UnixAttestor(), proc.pid)
