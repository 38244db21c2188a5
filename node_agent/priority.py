"""The agent's CPU priority: its nice value, and its session's autogroup where it leads one.

A local user looping ``connect(); close()`` on the Workload API socket keeps CPUs busy with
processes of their own (each one as much as the accept process spends shedding it). When the
agent then waits for a CPU behind them, every other workload's fetch waits too: on a 2-core
VM with two such churners the agent's main process waited 15-17 s for a CPU per second it
ran, and another user's fetch p99 went from 0.01 s to 0.1-2 s (docs/benchmarks.md,
``workload_api_abuse``). So at start, where it may (root, or ``CAP_SYS_NICE``), the agent
sets:

* the nice value of every thread it has (Linux keeps one per thread; threads started later
  and the accept process inherit it; the accept process raises its own further, see
  :data:`~node_agent.workload.acceptor.ACCEPT_NICE`);
* when it leads its session (a service manager started it: systemd starts each service in
  a session of its own, or ``setsid credo-agent run``), the nice value of that session's
  autogroup (``/proc/self/autogroup``). With ``kernel.sched_autogroup_enabled`` = 1 and no
  cgroup CPU controller the kernel first shares the CPUs equally between sessions, and a
  nice value ranks a process only within its own: without this, a user with a session per
  churner outweighs the agent whatever its nice value. An agent started from a shell does
  not lead its session and leaves the shell's autogroup alone.

Where the CPU controller of cgroups decides (systemd with ``CPUWeight=``, a container's
CPU shares), neither reaches beyond the agent's cgroup: give the unit a weight
(docs/security.md).
"""

from __future__ import annotations

import contextlib
import logging
import os

__all__ = ["apply_priority"]

log = logging.getLogger(__name__)

AUTOGROUP = "/proc/self/autogroup"


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread only
        return [0]


def apply_priority(nice: int) -> dict[str, object]:
    """Set ``nice`` on every thread of this process and, when it leads its session, on its
    autogroup; what was set and what could not be, for the start log line.

    Raising a priority needs root (or ``CAP_SYS_NICE``); without it nothing changes and the
    reason is returned (``nice_error``), since an agent run by a user for testing must
    still start.
    """
    done: dict[str, object] = {}
    errors: list[str] = []
    for tid in _threads():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:  # that thread has exited
            continue
        except OSError as err:
            errors.append(f"nice: {err.strerror}")
            break
    else:
        done["nice"] = nice
    if os.getsid(0) == os.getpid():
        try:
            with open(AUTOGROUP, "w") as f:
                f.write(str(nice))
        except FileNotFoundError:  # no autogroups (CONFIG_SCHED_AUTOGROUP off)
            pass
        except OSError as err:
            errors.append(f"autogroup nice: {err.strerror}")
        else:
            with contextlib.suppress(OSError), open(AUTOGROUP) as f:
                done["autogroup"] = f.read().strip()
    if errors:
        done["nice_error"] = "; ".join(errors)
    return done
