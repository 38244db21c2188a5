"""A process's cgroups, read from ``/proc/<pid>/cgroup``, and the Kubernetes pod they name.

Each line of ``/proc/<pid>/cgroup`` is ``<hierarchy id>:<controllers>:<path>``: one line
per cgroup v1 hierarchy (``4:memory:/kubepods/...``, ``1:name=systemd:/...``) and, with
cgroup v2 (alone, or beside v1 in hybrid mode), ``0::/<path>``. :func:`read_cgroups` reads
the file and :func:`parse_cgroups` parses it into :class:`Cgroup` values; attestors that
need a process's cgroups (``k8s``, a ``systemd`` unit) start there.

Where the kubelet puts a pod, by cgroup driver (``<qos>`` is ``burstable`` or
``besteffort``; Guaranteed pods sit directly under ``kubepods``; the systemd driver writes
the UID's ``-`` as ``_``)::

    cgroupfs  /kubepods[/<qos>]/pod<uid>/<container>
    systemd   /kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid>.slice/<container>

and the container's cgroup, by runtime::

    containerd  <id>                       cri-containerd-<id>.scope   (systemd)
    CRI-O       crio-<id>                  crio-<id>.scope             (systemd)
    Docker      <id>                       docker-<id>.scope           (systemd)

``<id>`` is 64 lowercase hex digits. A static pod's cgroup names it by its config hash (32
hex digits) instead of a UID. With a kubelet ``--cgroup-root`` the systemd names gain its
prefix (``kubelet-kubepods-burstable-pod<uid>.slice``), and a reader in a cgroup namespace
sees paths relative to its own cgroup (``/../../kubepods-besteffort-pod<uid>.slice/...``):
both are understood.

:func:`find_pod_container` trusts only what the kubelet and the runtime control:

* the pod is the one path segment that names a pod, and the container is the segment
  right below it. Deeper segments are cgroups the container made for itself (a nested
  runtime, systemd in a container) and are never read: a nested cgroup named like another
  container's ID changes nothing;
* a path naming two pods, lines naming different pods or different containers, and a pod
  under a cgroup delegated to an unprivileged user (systemd's ``user.slice``,
  ``user@<uid>.service``: the kubelet never puts pods there, but any user may name a cgroup
  there like one) are :class:`~node_agent.workload.errors.CgroupError`;
* a process in no pod is None (not an error), and so is one in a pod's cgroup but in no
  container's (the pod's own processes are no container's).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from node_agent.workload.errors import CgroupError

__all__ = [
    "QOS_BEST_EFFORT",
    "QOS_BURSTABLE",
    "QOS_GUARANTEED",
    "Cgroup",
    "PodContainer",
    "find_pod_container",
    "parse_cgroups",
    "pod_in_path",
    "read_cgroups",
]

QOS_GUARANTEED: Final = "Guaranteed"
QOS_BURSTABLE: Final = "Burstable"
QOS_BEST_EFFORT: Final = "BestEffort"
_QOS = {"burstable": QOS_BURSTABLE, "besteffort": QOS_BEST_EFFORT}

_MAX_FILE: Final = 1024 * 1024

_HEX = "[0-9a-f]"
_UID = "-".join(f"{_HEX}{{{n}}}" for n in (8, 4, 4, 4, 12))
_UID_SYSTEMD = "_".join(f"{_HEX}{{{n}}}" for n in (8, 4, 4, 4, 12))
_HASH = r"[0-9a-f]{32}"  # a static pod: the kubelet's hash of its manifest
_POD_CGROUPFS = re.compile(rf"pod(?P<uid>{_UID}|{_HASH})")
_POD_SYSTEMD = re.compile(
    rf"(?:[A-Za-z0-9_.]+-)*kubepods(?:-(?P<qos>burstable|besteffort))?"
    rf"-pod(?P<uid>{_UID_SYSTEMD}|{_HASH})\.slice"
)
_ID = r"[0-9a-f]{64}"
_CONTAINER = re.compile(
    rf"(?:cri-containerd|crio|docker)-(?P<scoped>{_ID})\.scope|crio-(?P<crio>{_ID})|(?P<bare>{_ID})"
)
_USER_DELEGATED = re.compile(r"user\.slice|user-\d+\.slice|user@\d+\.service")


@dataclass(frozen=True, slots=True)
class Cgroup:
    """One line of ``/proc/<pid>/cgroup``.

    ``hierarchy`` is 0 with no ``controllers`` for cgroup v2; v1 lines list their
    controllers (``("cpu", "cpuacct")``, or a named hierarchy ``("name=systemd",)``).
    """

    hierarchy: int
    controllers: tuple[str, ...]
    path: str

    @property
    def unified(self) -> bool:
        """True for the cgroup v2 line."""
        return self.hierarchy == 0 and not self.controllers


@dataclass(frozen=True, slots=True)
class PodContainer:
    """Which pod and container a process's cgroups place it in.

    ``pod_uid`` is the pod's UID as the kubelet names it (for a static pod, its config
    hash, which the API shows as the mirror pod's ``kubernetes.io/config.mirror``
    annotation); ``container_id`` is the runtime's ID, or None for a process in the pod's
    cgroup but in no container's; ``qos_class`` is Kubernetes' spelling.
    """

    pod_uid: str
    container_id: str | None
    qos_class: str


def parse_cgroups(text: str) -> list[Cgroup]:
    """The lines of a ``/proc/<pid>/cgroup`` file; :class:`CgroupError` if one is malformed."""
    out: list[Cgroup] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        hierarchy, sep1, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep1 and sep2 and hierarchy.isdigit() and path.startswith("/")):
            raise CgroupError(
                f"cgroup line {number} is not <hierarchy>:<controllers>:<path>: {line[:120]!r}"
            )
        out.append(Cgroup(int(hierarchy), tuple(c for c in controllers.split(",") if c), path))
    return out


def read_cgroups(pid: int, proc_root: str = "/proc") -> list[Cgroup]:
    """The cgroups of process ``pid``; OSError if unreadable (FileNotFoundError: it exited)."""
    with open(os.path.join(proc_root, str(pid), "cgroup"), "rb") as f:
        data = f.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise CgroupError(f"cgroup file of pid {pid} is larger than {_MAX_FILE} bytes")
    return parse_cgroups(data.decode("utf-8", "surrogateescape"))


def _pod_segment(segment: str) -> tuple[str, str | None] | None:
    """``(uid, qos from the name or None)`` if ``segment`` is a pod's cgroup, else None."""
    if m := _POD_CGROUPFS.fullmatch(segment):
        return m["uid"], None
    if m := _POD_SYSTEMD.fullmatch(segment):
        return m["uid"].replace("_", "-"), _QOS.get(m["qos"] or "", QOS_GUARANTEED)
    return None


def _container_id(segment: str) -> str | None:
    m = _CONTAINER.fullmatch(segment)
    if m is None:
        return None
    return m["scoped"] or m["crio"] or m["bare"]


def pod_in_path(path: str) -> PodContainer | None:
    """The pod and container one cgroup path names (see the module docstring)."""
    segments = [s for s in path.split("/") if s]
    while segments and segments[0] == "..":  # relative to the reader's cgroup namespace
        segments.pop(0)
    if any(s in (".", "..") for s in segments):
        raise CgroupError(f"cgroup path {path[:200]!r} is not normalized")
    pods = [(i, found) for i, s in enumerate(segments) if (found := _pod_segment(s)) is not None]
    if not pods:
        return None
    if len(pods) > 1:
        uids = ", ".join(uid for _, (uid, _qos) in pods)
        raise CgroupError(f"cgroup path {path[:200]!r} names more than one pod ({uids})")
    index, (uid, qos) = pods[0]
    for ancestor in segments[:index]:
        if _USER_DELEGATED.fullmatch(ancestor):
            raise CgroupError(
                f"cgroup path {path[:200]!r} names pod {uid} under {ancestor}, a cgroup "
                "delegated to an unprivileged user; the kubelet never puts pods there"
            )
    if qos is None:  # cgroupfs: the QoS class is the parent's name
        parent = segments[index - 1] if index else ""
        qos = _QOS.get(parent, QOS_GUARANTEED)
    container = _container_id(segments[index + 1]) if index + 1 < len(segments) else None
    return PodContainer(uid, container, qos)


def find_pod_container(cgroups: Iterable[Cgroup]) -> PodContainer | None:
    """The pod and container a process's cgroups place it in; None outside any pod.

    Raises :class:`CgroupError` when the lines disagree (two pods, two containers) or a
    path is not one the kubelet could have made (see the module docstring).
    """
    found: PodContainer | None = None
    for cgroup in cgroups:
        place = pod_in_path(cgroup.path)
        if place is None:
            continue
        if found is None:
            found = place
            continue
        if place.pod_uid != found.pod_uid:
            raise CgroupError(
                f"the process's cgroups name two pods: {found.pod_uid} and {place.pod_uid}"
            )
        if place.container_id and found.container_id and place.container_id != found.container_id:
            raise CgroupError(
                "the process's cgroups name two containers: "
                f"{found.container_id} and {place.container_id}"
            )
        if found.container_id is None and place.container_id is not None:
            found = place
    return found
