"""Soak test of the agent's entry sync (issue 8 §1): changes keep reaching workloads through
agent SVID renewals, sync reconnects, server restarts (SIGTERM and SIGKILL) and CA
rotations, and no process leaks a pending asyncio task.

The scenario is :mod:`tests.helpers.soak` (``./scripts/bench soak`` runs it longer):
agent SVID TTL 20 s, a change every 12 s (each gap holds at least one agent SVID renewal),
the server restarted after every third change and its CA prepared and activated after
every fifth (activated once the new CA is in the workload's trust bundle, which counts as
a change too). About three minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.soak import run_soak

pytestmark = pytest.mark.slow


def test_every_change_reaches_the_workload_through_renewals_restarts_and_rotations(
    root: Path, tmp_path: Path
) -> None:
    result = run_soak(root, changes=13, gap=12.0, progress=print)
    assert result.server is not None and result.agent is not None
    server_log, agent_log = result.server.logs, result.agent.logs
    (tmp_path / "server.log").write_text(server_log)
    (tmp_path / "agent.log").write_text(agent_log)

    assert result.restarts == 4 and result.activations == 2 and result.changes == 15
    assert not result.missed, (
        f"{len(result.missed)} of {result.changes} changes never reached the workload:\n"
        + "\n".join(result.missed)
        + f"\nlongest server restart: {result.max_down_s:.1f}s (an agent SVID of 20 s is "
        "renewed 10 s before it expires: a server down longer than that ends the agent)"
        + f"\nagent log tail:\n{result.agent.log_tail(60)}"
    )
    for name, text in (("server", server_log), ("agent", agent_log)):
        assert "Task was destroyed" not in text, f"{name} leaked a pending task:\n{text[-4000:]}"
        assert "too many pings" not in text.lower() and "too_many_pings" not in text.lower()
    # Every stream start and end is in the logs, on both sides.
    assert "agent sync started" in server_log and "agent sync ended" in server_log
    assert "entry sync stream open" in agent_log
