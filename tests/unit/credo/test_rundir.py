"""The private directory for a process's internal sockets (credo/_rundir.py), with real
processes holding and abandoning it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from credo._rundir import RuntimeDir
from credo.errors import ConfigError

_HOLDER = """
import sys, time
from pathlib import Path
from credo._rundir import RuntimeDir
held = RuntimeDir.create(Path(sys.argv[1]), setting="data_dir")
print(held.path, flush=True)
time.sleep(600)
"""


def _holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process that made a runtime dir under ``parent`` and keeps it; and that dir."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(parent)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_create_makes_a_private_directory_and_close_removes_it(tmp_path: Path) -> None:
    """The directory is 0700 under <parent>/run (0700); close() removes it and its lock."""
    runtime = RuntimeDir.create(tmp_path, setting="data_dir")
    assert runtime.path.parent == tmp_path / "run"
    assert stat.S_IMODE(runtime.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(runtime.path.parent.stat().st_mode) == 0o700
    (runtime.path / "x.sock").touch()
    runtime.close()
    runtime.close()
    assert sorted(os.listdir(tmp_path / "run")) == [".sweep.lock"]


def test_a_killed_process_directory_is_swept_and_a_live_one_kept(tmp_path: Path) -> None:
    """After SIGKILL the next create removes the dead process's directory; one a live
    process holds stays."""
    dead, dead_dir = _holder(tmp_path)
    live, live_dir = _holder(tmp_path)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert dead_dir.is_dir()
        runtime = RuntimeDir.create(tmp_path, setting="data_dir")
        assert not dead_dir.exists()
        assert not dead_dir.with_name(dead_dir.name + ".lock").exists()
        assert live_dir.is_dir()
        runtime.close()
    finally:
        live.kill()
        live.wait()


def test_a_directory_without_a_lock_is_swept(tmp_path: Path) -> None:
    """A directory under run/ that no lock names (nobody can own it) is removed."""
    (tmp_path / "run" / "orphan").mkdir(parents=True)
    RuntimeDir.create(tmp_path, setting="data_dir").close()
    assert not (tmp_path / "run" / "orphan").exists()


def test_a_path_too_deep_for_unix_sockets_is_refused(tmp_path: Path) -> None:
    """A parent so deep that its socket paths would pass 107 bytes is a ConfigError naming
    the setting, and nothing is created."""
    deep = tmp_path / ("d" * 100)
    with pytest.raises(ConfigError, match=r"^data_dir: .* too deep for the internal Unix"):
        RuntimeDir.create(deep, setting="data_dir")
    assert not deep.exists()
