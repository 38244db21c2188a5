"""Load the fake signing server (agent_fake_server.py) under a unique module name, for every
node-agent test that talks to a server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if "agent_fake_server" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "agent_fake_server", Path(__file__).with_name("agent_fake_server.py")
    )
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["agent_fake_server"] = _module
    _spec.loader.exec_module(_module)
