"""The agent's CPU priority (node_agent/priority.py), read from /proc of the real processes.

A local user churning connections must not starve the agent (docs/security.md, "Denial of
service by connection churn"): as root the agent sets its nice value on every thread, its
accept process raises its own further, and an agent leading its session (as a service
manager starts it) sets its session's autogroup nice too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers.processes import (
    AgentProcess,
    ServerProcess,
    short_temp_dir,
    start_agent,
    start_server,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs root"),
    pytest.mark.skipif(
        not Path("/proc/self/autogroup").exists(), reason="the kernel has no autogroups"
    ),
]

ACCEPT_NICE = -10


def _nice(pid: int, tid: int) -> int:
    """Field 19 of /proc/<pid>/task/<tid>/stat (after the command name in parentheses)."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[16])


def _thread_nices(pid: int) -> set[int]:
    return {_nice(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def _autogroup(pid: int) -> tuple[str, int] | None:
    """(name, nice) of ``pid``'s autogroup: ``/autogroup-42 nice -10``; None for the root
    autogroup, which the kernel shows as an empty file (pid 1, and whatever descends from
    it without a ``setsid``, as in a container whose processes never start a session)."""
    text = Path(f"/proc/{pid}/autogroup").read_text()
    if not text.strip():
        return None
    name, _, nice = text.split()
    return name, int(nice)


def _accept_process(agent: AgentProcess) -> psutil.Process:
    """The agent's accept process, once it has set its priority."""
    found: list[psutil.Process] = []

    def ready() -> bool:
        found[:] = [
            child
            for child in psutil.Process(agent.pid).children()
            if any("acceptor" in arg for arg in child.cmdline())
        ]
        return len(found) == 1 and _thread_nices(found[0].pid) == {ACCEPT_NICE}

    wait_for(ready, 10, "the accept process at its nice value")
    return found[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(tmp_path_factory.mktemp("priority-server")) as server:
        yield server


def test_an_agent_leading_its_session_raises_its_threads_and_its_autogroup(
    server: ServerProcess,
) -> None:
    """Started in a session of its own (as systemd starts a service), the agent runs every
    thread at the default nice -10 and sets its session's autogroup to -10; the accept
    process, in the same autogroup, runs at -10."""
    with start_agent(server, short_temp_dir(), new_session=True) as agent:
        assert os.getsid(agent.pid) == agent.pid
        assert _thread_nices(agent.pid) == {-10}
        own = _autogroup(agent.pid)
        assert own is not None and own[1] == -10
        accept = _accept_process(agent)
        assert _autogroup(accept.pid) == _autogroup(agent.pid)
        assert 'autogroup="' in agent.logs and "nice=-10" in agent.logs


def test_an_agent_started_from_a_shell_leaves_the_shells_autogroup_alone(
    server: ServerProcess,
) -> None:
    """Not leading its session, the agent sets only its own nice value (``--nice 5``): the
    autogroup it shares with whoever started it keeps its nice value."""
    ours = _autogroup(os.getpid())
    with start_agent(server, short_temp_dir(), nice=5) as agent:
        assert _autogroup(agent.pid) == ours
        assert _thread_nices(agent.pid) == {5}
        _accept_process(agent)
    assert _autogroup(os.getpid()) == ours
