"""The ``systemd`` workload attestor: the systemd unit that owns the calling process.

Selectors (the names of SPIRE's ``systemd`` plugin)::

    systemd:id:<unit>               the unit, e.g. systemd:id:pr-reviewer.service
    systemd:fragment_path:<path>    its unit file, when found, e.g.
                                    systemd:fragment_path:/etc/systemd/system/pr-reviewer.service

"One agent, one unit" is how AI agents are run on hosts, and two agents under one uid
running one interpreter differ in their unit. SPIRE asks systemd over D-Bus
(``GetUnitByPID``); Credo reads what systemd decides that by, the process's cgroup in
``/proc/<pid>/cgroup``, so no D-Bus is needed and the answer is the kernel's:

* **Which hierarchy.** The unified (v2) line ``0::<path>`` when it names a cgroup other
  than the root (pure v2, and hybrid hosts where systemd tracks units there); else the v1
  ``name=systemd`` line (legacy hosts).
* **Which unit.** Below any ``.slice`` components, the first ``.service`` or ``.scope``
  component. Cgroups nested inside a unit (``user@1000.service/app.slice/x.service``, a
  container runtime's) belong to that unit, as systemd's system manager answers, so names
  a delegated user creates there cannot pose as system units. A process in slices only is
  in the innermost slice; one in no unit (the root cgroup, a host without systemd, another
  cgroup namespace) gets no ``systemd`` selectors.
* **Which unit file** (``fragment_path``). The first ``<name>`` in ``unit_paths``
  (systemd's system unit search path, in its order), else, for an instance
  ``foo@bar.service``, the template ``foo@.service``; symlinks are resolved (an enabled or
  linked unit). A masked unit (linked to ``/dev/null``) and a scope (no unit file) have none.

User units (``systemctl --user``) run inside ``user@<uid>.service``, so they are
``systemd:id:user@<uid>.service``: give each AI agent a system unit (with ``User=``) to
tell them apart, or combine with ``unix:`` selectors.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass

from credo.errors import ConfigError
from credo.selector import Selector
from node_agent.workload.errors import AttestationFailed

__all__ = [
    "DEFAULT_UNIT_PATHS",
    "SystemdAttestor",
    "SystemdAttestorConfig",
    "systemd_cgroup",
    "unit_of_cgroup",
]

DEFAULT_UNIT_PATHS = (
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/run/systemd/generator.early",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/run/systemd/generator",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/run/systemd/generator.late",
)
"""systemd's system unit search path, in the order it searches (systemd.unit(5))."""

# A unit name: systemd's allowed characters, a known suffix, at most 255 bytes.
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,240}\.(service|scope|slice)")
_PROCESS_UNITS = (".service", ".scope")


@dataclass(frozen=True)
class SystemdAttestorConfig:
    """``[agent.workload_attestor.systemd]``.

    ``proc_root`` is where procfs is mounted; ``unit_paths`` are the directories searched
    for unit files (``fragment_path``), in order.
    """

    proc_root: str = "/proc"
    unit_paths: tuple[str, ...] = DEFAULT_UNIT_PATHS

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field of the TOML table."""
        if not os.path.isabs(self.proc_root):
            raise ConfigError(f"proc_root: must be an absolute path, got {self.proc_root!r}")
        for path in self.unit_paths:
            if not os.path.isabs(path):
                raise ConfigError(f"unit_paths: must be absolute paths, got {path!r}")


def systemd_cgroup(cgroup_file: str) -> str:
    """The cgroup path systemd tracks the process by, from a ``/proc/<pid>/cgroup`` file.

    The unified ``0::`` path when it is not the root, else the v1 ``name=systemd`` one,
    else ``/``. Raises OSError as reading the file does.
    """
    unified = legacy = "/"
    with open(cgroup_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            hierarchy, _, rest = line.rstrip("\n").partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and not controllers:
                unified = path or "/"
            elif "name=systemd" in controllers.split(","):
                legacy = path or "/"
    return unified if unified != "/" else legacy


def unit_of_cgroup(path: str) -> str | None:
    """The unit owning a process in cgroup ``path`` (see the module docstring), or None."""
    innermost_slice = None
    for part in path.strip("/").split("/"):
        if not part or not _UNIT_NAME.fullmatch(part):
            break
        if part.endswith(_PROCESS_UNITS):
            return part
        innermost_slice = part
    return innermost_slice


class SystemdAttestor:
    """Attests the systemd unit of a local process; see the module docstring."""

    def __init__(self, config: SystemdAttestorConfig | None = None) -> None:
        self.config = config or SystemdAttestorConfig()

    async def attest(self, pid: int) -> list[Selector]:
        """``systemd:id`` (and ``systemd:fragment_path``) of ``pid``; [] if in no unit."""
        return await asyncio.to_thread(self._attest, pid)

    def _attest(self, pid: int) -> list[Selector]:
        try:
            cgroup = systemd_cgroup(os.path.join(self.config.proc_root, str(pid), "cgroup"))
        except FileNotFoundError:
            raise AttestationFailed("process not found", pid=pid) from None
        except OSError as err:
            raise AttestationFailed(f"cannot read the process's cgroup: {err}", pid=pid) from None
        unit = unit_of_cgroup(cgroup)
        if unit is None:
            return []
        out = [Selector("systemd", f"id:{unit}")]
        fragment = self._fragment_path(unit)
        if fragment is not None:
            out.append(Selector("systemd", f"fragment_path:{fragment}"))
        return out

    def _fragment_path(self, unit: str) -> str | None:
        """The unit file systemd would load for ``unit`` (see the module docstring)."""
        names = [unit]
        prefix, at, rest = unit.partition("@")
        if at and rest.partition(".")[0]:
            names.append(f"{prefix}@.{unit.rsplit('.', 1)[1]}")  # foo@bar.service -> foo@.service
        for name in names:
            for directory in self.config.unit_paths:
                candidate = os.path.join(directory, name)
                if os.path.lexists(candidate):
                    resolved = os.path.realpath(candidate)
                    if resolved == os.devnull or not os.path.isfile(resolved):
                        return None  # masked, or not a unit file
                    return resolved
        return None
