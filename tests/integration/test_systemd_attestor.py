"""Two AI agents under one uid told apart by their systemd unit, end to end: real cgroups
named as systemd names them (``system.slice/credo-test-<agent>.service``, in the unified
hierarchy and in the v1 ``name=systemd`` one), real processes moved into them, a real
`credo-server run` and `credo-agent run` with ``[agent.workload_attestor.systemd]``, and
the SVIDs fetched through the Workload API by `credo-agent api fetch x509`. No systemd
runs: the cgroups are what systemd would have made."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    create_entry,
    credo_agent_command,
    start_agent,
    start_server,
    wait_for,
)

TD = "example.org"
REVIEWER = "credo-test-pr-reviewer.service"
TRIAGE = "credo-test-triage.service"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create cgroups")


def _cgroup_mounts() -> dict[str, Path]:
    """Where the unified (``v2``) and the v1 ``name=systemd`` (``v1``) hierarchies are."""
    found: dict[str, Path] = {}
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, where, kind, options, *_ = line.split()
            if kind == "cgroup2":
                found.setdefault("v2", Path(where))
            elif kind == "cgroup" and "name=systemd" in options.split(","):
                found.setdefault("v1", Path(where))
    return found


def _own_cgroup(hierarchy: str) -> str:
    """This process's cgroup path in the unified (``v2``) or name=systemd (``v1``) hierarchy."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if hierarchy == "v2" and number == "0" and not controllers:
            return path
        if hierarchy == "v1" and "name=systemd" in controllers.split(","):
            return path
    return ""


@dataclass
class Units:
    """The credo-test units' cgroups in one hierarchy."""

    hierarchy: str
    cgroups: dict[str, Path]


@contextlib.contextmanager
def _unit_cgroups(hierarchy: str) -> Iterator[Units]:
    """``system.slice/<unit>`` cgroups for both test units; removed afterwards (processes
    left in them are killed first), and ``system.slice`` too if this made it."""
    mount = _cgroup_mounts().get(hierarchy)
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip(f"no writable cgroup {hierarchy} hierarchy")
    if _own_cgroup(hierarchy) != "/" or (hierarchy == "v1" and _own_cgroup("v2") != "/"):
        pytest.skip(f"this test process must start in the root {hierarchy} cgroup")
    system_slice = mount / "system.slice"
    made_slice = not system_slice.exists()
    cgroups = {unit: system_slice / unit for unit in (REVIEWER, TRIAGE)}
    try:
        for path in cgroups.values():
            path.mkdir(parents=True)
        yield Units(hierarchy, cgroups)
    finally:
        for path in cgroups.values():
            if path.exists():
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                wait_for(lambda p=path: not (p / "cgroup.procs").read_text().strip(), 10, "empty")
                path.rmdir()
        if made_slice:
            with contextlib.suppress(OSError):  # another test's cgroup may be in it now
                system_slice.rmdir()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(tmp_path_factory.mktemp("systemd")) as running:
        yield running


def _systemd_agent(server: ServerProcess, root: Path) -> tuple[AgentProcess, Path]:
    """An agent with the unix and systemd workload attestors; unit files in root/units."""
    units = root / "units"
    units.mkdir()
    (units / TRIAGE).write_text("[Service]\nExecStart=/usr/bin/python3 triage.py\n")
    config = root / "agent.toml"
    config.write_text(
        "[agent.workload_attestor.unix]\n"
        f"[agent.workload_attestor.systemd]\nunit_paths = [{json.dumps(str(units))}]\n"
    )
    return start_agent(server, root, config=config), units


def _fetch_in(agent: AgentProcess, cgroup: Path | None) -> subprocess.CompletedProcess[str]:
    """`credo-agent api fetch x509` run by a process that first moved itself into ``cgroup``
    (as systemd starts a unit's process), as this test's uid."""
    fetch = [*credo_agent_command(), "api", "fetch", "x509", "--output", "json",
             "--socket", agent.endpoint]  # fmt: skip
    if cgroup is None:
        command = fetch
    else:
        command = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *fetch]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _ids(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [svid["spiffe_id"] for svid in json.loads(result.stdout)["svids"]]


@pytest.mark.parametrize("hierarchy", ["v2", "v1"])
def test_two_agents_under_one_uid_get_the_identity_of_their_unit(
    server: ServerProcess, root: Path, hierarchy: str
) -> None:
    """A process in system.slice/credo-test-pr-reviewer.service gets the pr-reviewer SVID,
    one in credo-test-triage.service the triage SVID (matched also by its unit file), and
    the same command outside both units gets none, though all run as one uid and one
    interpreter."""
    with _unit_cgroups(hierarchy) as units:
        agent, unit_dir = _systemd_agent(server, root)
        with agent:
            reviewer = f"spiffe://{TD}/agents/pr-reviewer"
            triage = f"spiffe://{TD}/agents/triage"
            create_entry(server, agent.spiffe_id, reviewer, f"systemd:id:{REVIEWER}")
            create_entry(
                server,
                agent.spiffe_id,
                triage,
                f"systemd:id:{TRIAGE}",
                f"systemd:fragment_path:{unit_dir / TRIAGE}",
            )

            def reviewer_served() -> subprocess.CompletedProcess[str] | None:
                result = _fetch_in(agent, units.cgroups[REVIEWER])
                return result if result.returncode == 0 else None

            in_reviewer = wait_for(reviewer_served, 30, "the pr-reviewer SVID")
            assert _ids(in_reviewer) == [reviewer]
            assert _ids(_fetch_in(agent, units.cgroups[TRIAGE])) == [triage]
            outside = _fetch_in(agent, None)
            assert outside.returncode == 1
            assert "no identity for this process" in outside.stderr
            refused = [line for line in agent.logs.splitlines() if "workload call refused" in line]
            assert refused and "unix:uid:" in refused[-1]
