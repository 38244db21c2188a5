"""Finding a process's pod and container in /proc/<pid>/cgroup (node_agent/workload/cgroups.py),
on samples of every cgroup version, driver and runtime, and hostile ones (fixtures/cgroups)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node_agent.workload.cgroups import (
    QOS_BEST_EFFORT,
    QOS_BURSTABLE,
    QOS_GUARANTEED,
    Cgroup,
    PodContainer,
    find_pod_container,
    parse_cgroups,
    read_cgroups,
)
from node_agent.workload.errors import CgroupError

SAMPLES = Path(__file__).with_name("fixtures") / "cgroups"
POD = "2c48913c-b29f-11e7-9350-020968147796"
OTHER_POD = "7f3e1b2a-0c4d-4e5f-8a9b-1c2d3e4f5a6b"
STATIC_POD = "6d8ccb9b4dbbc3a9c3a7b0b3c8d2a1f0"
C1 = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
C2 = "b2d9a1bdd5d5a4bcd6fbbd36b4a2e28c6cf4b4f8f9a3f1e8d6c2f0a9b1e7d3c5"


def _find(name: str) -> PodContainer | None:
    return find_pod_container(parse_cgroups((SAMPLES / f"{name}.cgroup").read_text()))


IN_A_POD = {
    "v1-cgroupfs-docker-burstable": PodContainer(POD, C1, QOS_BURSTABLE),
    "v1-cgroupfs-containerd-besteffort": PodContainer(POD, C1, QOS_BEST_EFFORT),
    "v1-cgroupfs-containerd-guaranteed": PodContainer(POD, C1, QOS_GUARANTEED),
    "v1-systemd-docker-burstable": PodContainer(POD, C1, QOS_BURSTABLE),
    "hybrid-systemd-containerd-besteffort": PodContainer(POD, C1, QOS_BEST_EFFORT),
    "v1-systemd-crio-burstable": PodContainer(POD, C1, QOS_BURSTABLE),
    "v2-systemd-containerd-burstable": PodContainer(POD, C1, QOS_BURSTABLE),
    "v2-systemd-crio-guaranteed": PodContainer(POD, C1, QOS_GUARANTEED),
    "v2-systemd-docker-besteffort": PodContainer(POD, C1, QOS_BEST_EFFORT),
    "v2-cgroupfs-crio-burstable": PodContainer(POD, C1, QOS_BURSTABLE),
    "v2-cgroupfs-containerd-guaranteed": PodContainer(POD, C1, QOS_GUARANTEED),
    "v2-cgroupns-relative-path": PodContainer(POD, C1, QOS_BEST_EFFORT),
    "v2-kind-cgroup-root": PodContainer(POD, C1, QOS_BEST_EFFORT),
    "v1-cgroupfs-static-pod": PodContainer(STATIC_POD, C1, QOS_BURSTABLE),
    "v2-nested-cgroups-in-container": PodContainer(POD, C1, QOS_BURSTABLE),
    "v2-systemd-crio-conmon": PodContainer(POD, None, QOS_BURSTABLE),
    # The container's own sub-cgroup is never read: it stays the outer container.
    "hostile-nested-cgroup-named-like-another-container": PodContainer(POD, C1, QOS_BURSTABLE),
}


@pytest.mark.parametrize(("name", "expected"), IN_A_POD.items(), ids=IN_A_POD)
def test_pod_and_container_of_each_layout(name: str, expected: PodContainer) -> None:
    """The pod UID (with dashes, whatever the driver), container ID and QoS class are found
    for every cgroup version, driver, runtime and QoS layout the kubelet produces."""
    assert _find(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "v2-host-service",
        "v2-user-session",
        "v1-plain-docker-container",
        "v2-plain-docker-container",
        "hybrid-test-machine",
    ],
)
def test_a_process_in_no_pod_is_none(name: str) -> None:
    """Host services, user sessions and plain (non-Kubernetes) containers are in no pod."""
    assert _find(name) is None


HOSTILE = {
    "hostile-nested-cgroup-named-like-another-pod": f"names more than one pod ({POD}, {OTHER_POD})",
    "hostile-two-pod-uids-across-hierarchies": f"name two pods: {POD} and {OTHER_POD}",
    "hostile-two-container-ids-across-hierarchies": f"name two containers: {C1} and {C2}",
    "hostile-pod-under-a-user-delegated-cgroup": (
        f"names pod {POD} under user.slice, a cgroup delegated to an unprivileged user"
    ),
    "hostile-dot-dot-inside-path": "is not normalized",
    "malformed-line": "cgroup line 1 is not <hierarchy>:<controllers>:<path>",
}


@pytest.mark.parametrize(("name", "reason"), HOSTILE.items(), ids=HOSTILE)
def test_ambiguous_or_impossible_cgroups_are_refused(name: str, reason: str) -> None:
    """Cgroups that name two pods or two containers, a pod where the kubelet never puts one,
    or lines no kernel writes are refused, saying which."""
    with pytest.raises(CgroupError) as info:
        _find(name)
    assert reason in info.value.reason


def test_every_sample_is_in_a_table() -> None:
    """Each sample file is checked by one of the tables above."""
    tables = (
        set(IN_A_POD)
        | set(HOSTILE)
        | {
            "v2-host-service",
            "v2-user-session",
            "v1-plain-docker-container",
            "v2-plain-docker-container",
            "hybrid-test-machine",
        }
    )
    assert {p.stem for p in SAMPLES.glob("*.cgroup")} == tables


def test_parse_keeps_hierarchy_controllers_and_path() -> None:
    """Lines parse into hierarchy id, controllers and path; 0:: is the cgroup v2 line."""
    cgroups = parse_cgroups("4:cpu,cpuacct:/a\n1:name=systemd:/b:c\n0::/\n")
    assert cgroups == [
        Cgroup(4, ("cpu", "cpuacct"), "/a"),
        Cgroup(1, ("name=systemd",), "/b:c"),
        Cgroup(0, (), "/"),
    ]
    assert [c.unified for c in cgroups] == [False, False, True]


@pytest.mark.parametrize(
    "segment",
    [
        f"pod{POD.upper()}",  # the kubelet writes UIDs in lower case
        f"pod{POD[:-1]}",
        f"xpod{POD}",
        f"kubepods-burstable-pod{POD}.slice",  # systemd names carry '_', not '-'
        f"kubepods-guaranteed-pod{POD.replace('-', '_')}.slice",
    ],
)
def test_names_only_like_a_pod_are_not_a_pod(segment: str) -> None:
    """Only the kubelet's exact pod cgroup names count; near misses are no pod."""
    assert find_pod_container([Cgroup(0, (), f"/kubepods/{segment}/{C1}")]) is None


def test_read_cgroups_reads_this_process() -> None:
    """read_cgroups reads /proc/<pid>/cgroup of a live process; FileNotFoundError once gone."""
    cgroups = read_cgroups(os.getpid())
    assert cgroups and all(c.path.startswith("/") for c in cgroups)
    with pytest.raises(FileNotFoundError):
        read_cgroups(2**22 + 1)
