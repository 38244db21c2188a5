"""The systemd workload attestor: the unit from a /proc/<pid>/cgroup file, its unit file,
and the attestor on files laid out as procfs and systemd lay them out."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from credo.errors import ConfigError
from node_agent.workload.errors import AttestationFailed
from node_agent.workload.systemd import (
    SystemdAttestor,
    SystemdAttestorConfig,
    systemd_cgroup,
    unit_of_cgroup,
)


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("/system.slice/pr-reviewer.service", "pr-reviewer.service"),
        ("/system.slice/agents.slice/pr-reviewer.service", "pr-reviewer.service"),
        ("/system.slice/getty@tty1.service", "getty@tty1.service"),
        ("/user.slice/user-1000.slice/session-2.scope", "session-2.scope"),
        ("/init.scope", "init.scope"),
        # Nested inside a unit (a delegated subtree): still that unit, whatever it is named.
        (
            "/user.slice/user-1000.slice/user@1000.service/system.slice/pr-reviewer.service",
            "user@1000.service",
        ),
        ("/system.slice/docker-0123abcd.scope/init", "docker-0123abcd.scope"),
        ("/system.slice", "system.slice"),
        ("/user.slice/user-1000.slice", "user-1000.slice"),
        ("/", None),
        ("", None),
        ("/docker/0123abcd", None),  # a host without systemd (cgroupfs driver)
        ("/kubepods/burstable/pod1/abc", None),
        ("/system.slice/weird name.service", "system.slice"),
    ],
)
def test_unit_of_cgroup(cgroup: str, unit: str | None) -> None:
    """The first .service/.scope below the slices owns the process; only slices: the
    innermost slice; no systemd naming: no unit."""
    assert unit_of_cgroup(cgroup) == unit


A, B, C = "/system.slice/a.service", "/system.slice/b.service", "/system.slice/c.service"


@pytest.mark.parametrize(
    ("lines", "path"),
    [
        ([f"0::{A}"], A),  # pure cgroup v2
        # hybrid: systemd tracks units in the unified hierarchy
        ([f"1:name=systemd:{A}", f"0::{A}"], A),
        (["9:name=systemd:/", "4:memory:/x", f"0::{B}"], B),
        # legacy v1: the unified line (if the kernel prints one) is the root
        ([f"9:name=systemd:{C}", "2:cpu,cpuacct:/system.slice", "0::/"], C),
        ([f"9:name=systemd:{C}"], C),
        (["4:memory:/x"], "/"),
    ],
)
def test_systemd_cgroup_picks_the_hierarchy_systemd_tracks(
    tmp_path: Path, lines: list[str], path: str
) -> None:
    """The unified path when it is not the root, else the name=systemd one, else /."""
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("\n".join(lines) + "\n")
    assert systemd_cgroup(str(cgroup)) == path


def _proc(tmp_path: Path, pid: int, cgroup: str) -> Path:
    """A procfs-shaped tree with ``<pid>/cgroup`` saying the process is in ``cgroup``."""
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(f"0::{cgroup}\n")
    return proc


def _attest(attestor: SystemdAttestor, pid: int) -> list[str]:
    return [str(s) for s in asyncio.run(attestor.attest(pid))]


def test_id_and_fragment_path_from_the_first_unit_directory_that_has_it(tmp_path: Path) -> None:
    """systemd:id is the unit; systemd:fragment_path the file in the first unit directory
    holding it (the search order), symlinks resolved."""
    proc = _proc(tmp_path, 42, "/system.slice/pr-reviewer.service")
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.mkdir()
    lib.mkdir()
    (lib / "pr-reviewer.service").write_text("[Service]\n")
    (etc / "pr-reviewer.service").symlink_to(lib / "pr-reviewer.service")  # enabled/linked
    attestor = SystemdAttestor(SystemdAttestorConfig(str(proc), (str(etc), str(lib))))
    assert _attest(attestor, 42) == [
        "systemd:id:pr-reviewer.service",
        f"systemd:fragment_path:{lib / 'pr-reviewer.service'}",
    ]


def test_an_instance_uses_its_template_and_a_masked_unit_has_no_fragment(tmp_path: Path) -> None:
    """foo@bar.service's unit file is foo@.service; a unit masked to /dev/null has no
    fragment_path selector (but keeps its id)."""
    units = tmp_path / "units"
    units.mkdir()
    (units / "agent@.service").write_text("[Service]\n")
    (units / "masked.service").symlink_to(os.devnull)
    proc = _proc(tmp_path, 7, "/system.slice/agent@triage.service")
    (proc / "8").mkdir()
    (proc / "8" / "cgroup").write_text("0::/system.slice/masked.service\n")
    attestor = SystemdAttestor(SystemdAttestorConfig(str(proc), (str(units),)))
    assert _attest(attestor, 7) == [
        "systemd:id:agent@triage.service",
        f"systemd:fragment_path:{units / 'agent@.service'}",
    ]
    assert _attest(attestor, 8) == ["systemd:id:masked.service"]


def test_a_process_in_no_unit_gets_no_selectors_and_a_gone_one_fails(tmp_path: Path) -> None:
    """A process in the root cgroup is not the systemd attestor's to speak for ([]); a pid
    without a procfs entry fails attestation."""
    proc = _proc(tmp_path, 5, "/")
    attestor = SystemdAttestor(SystemdAttestorConfig(str(proc), ()))
    assert _attest(attestor, 5) == []
    with pytest.raises(AttestationFailed, match="process not found"):
        _attest(attestor, 6)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SystemdAttestorConfig(proc_root="proc"), "proc_root: must be an absolute path"),
        (SystemdAttestorConfig(unit_paths=("units",)), "unit_paths: must be absolute paths"),
    ],
)
def test_config_validation_names_the_field(config: SystemdAttestorConfig, message: str) -> None:
    """Relative paths are refused, naming the field."""
    with pytest.raises(ConfigError, match=message):
        config.validate()
