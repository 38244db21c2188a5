"""Build the Credo image with podman and run it as the Helm chart runs it (scripts/test-image).

1. a base image: ``debootstrap --variant=minbase --include=python3,python3-venv bookworm``
   imported into podman as ``localhost/credo-test-base:bookworm`` (made once, then reused),
   or ``--base IMAGE``;
2. a wheelhouse of every dependency, made on the host with ``pip wheel`` (cached per
   pyproject.toml), so the build runs with no network at all;
3. ``podman build`` of the repository's Dockerfile, tagged as the chart's default image;
4. the chart rendered by Helm's engine (default values): the server and agent containers run
   with its commands, arguments, users, read-only root filesystems and mount paths; the
   server pods' postStart script registers the node alias (twice: idempotent); the agent's
   init container chowns the socket directory; the agent shares the host PID namespace;
5. X.509-SVIDs fetched through the Workload API socket in a host directory: by a container
   running the chart's ``helm test`` command, and by a process on the host.

There is no Kubernetes here, so the agent attests with a join token (``--join-token``) and
the configs keep the chart's scalar settings without its k8s_psat / k8s plugin tables.
Containers run with ``--runtime runc`` (crun fails on this machine's hybrid cgroups).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "credo"
BASE_IMAGE = "localhost/credo-test-base:bookworm"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "credo" / "test-image"
NAMESPACE = "credo-test-image"
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
CONTEXT_FILES = ("pyproject.toml", "README.md", "credo", "server", "node_agent")
HOST_ENTRY_ID = "spiffe://example.org/test-image/host-root"


class Failed(Exception):
    """A step failed; the message says which and why."""


def run(cmd: list[str], *, what: str, input_text: str | None = None, timeout: float = 600) -> str:
    """Run ``cmd``; its stdout, or Failed with its stderr."""
    proc = subprocess.run(
        cmd, input=input_text, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:]
        raise Failed(f"{what} failed (exit {proc.returncode}): {' / '.join(detail)}")
    return proc.stdout


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll ``check`` until it is true (there is no event to wait on across containers)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


class Steps:
    """Counts the checks and times the phases; prints one line per step."""

    def __init__(self) -> None:
        self.passed = 0
        self.started = time.monotonic()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        print(f"test-image: {name} ({time.monotonic() - start:.1f}s)", flush=True)

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"test-image: ok - {what}", flush=True)


# --- the image --------------------------------------------------------------------------


def image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], check=False).returncode == 0


def ensure_base_image() -> str:
    """The debootstrapped Debian base, made once and kept in podman's image store."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    with tempfile.TemporaryDirectory(prefix="credo-test-image-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv",
                "bookworm",
                str(rootfs),
            ],
            what="debootstrap",
            timeout=1800,
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["podman", "import", "-", BASE_IMAGE],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise Failed(f"podman import of the base failed: {imported.stderr.strip()}")
    return BASE_IMAGE


def ensure_wheelhouse() -> Path:
    """Wheels of every dependency (and setuptools, the build backend), per pyproject.toml."""
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    wheels = CACHE / f"wheels-{digest}"
    if wheels.is_dir():
        return wheels
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE))
    try:
        run(
            [
                *(sys.executable, "-m", "pip", "wheel", "--quiet"),
                *("--wheel-dir", str(partial), str(REPO), "setuptools>=77"),
            ],
            what="pip wheel",
        )
        for own in partial.glob("credo-*.whl"):
            own.unlink()  # the image builds Credo itself from the sources
        partial.rename(wheels)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for old in CACHE.glob("wheels-*"):
        if old != wheels:
            shutil.rmtree(old, ignore_errors=True)
    return wheels


def build_image(base: str, tag: str, wheels: Path | None, work: Path) -> None:
    """``podman build`` of the Dockerfile from a context holding only what the image needs."""
    context = work / "context"
    context.mkdir()
    for name in (*CONTEXT_FILES, "Dockerfile", ".dockerignore"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, context / name)
    network = []
    if wheels is not None:
        shutil.copytree(wheels, context / "wheels")
        network = ["--network", "none"]  # offline: everything comes from ./wheels
    build = [*PODMAN, "build", *network, *LIMITS, "--build-arg", f"BASE_IMAGE={base}"]
    run(
        [*build, "-t", tag, str(context)],
        what="podman build",
        timeout=1800,
    )


# --- what the chart runs ----------------------------------------------------------------


def render_chart() -> dict[str, Any]:
    """The chart's objects (default values) by kind and name, as `helm template` renders them."""
    helm.disable_logging()
    with helm.Chart.load(CHART) as chart:
        out = chart.render({}, name="credo", namespace=NAMESPACE, is_install=True)
    objects: dict[str, Any] = {}
    for template, text in out.items():
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def scalar_toml(text: str, table: str) -> str:
    """The ``[table]`` scalar settings of a rendered config, without the plugin tables."""
    settings = tomllib.loads(text)[table]
    lines = [f"[{table}]"] + [
        f"{key} = {json.dumps(value)}"
        for key, value in settings.items()
        if not isinstance(value, dict)
    ]
    return "\n".join(lines) + "\n"


def containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A workload's (or a Pod's) containers by name, init containers too, each with its
    securityContext merged over the pod's (as Kubernetes applies them)."""
    spec = workload["spec"].get("template", {}).get("spec") or workload["spec"]
    pod_sc = {k: v for k, v in spec.get("securityContext", {}).items() if k != "fsGroup"}
    found = {}
    for c in spec.get("initContainers", []) + spec["containers"]:
        found[c["name"]] = {**c, "securityContext": {**pod_sc, **c.get("securityContext", {})}}
    return found


def security_args(container: dict[str, Any]) -> list[str]:
    """podman flags for a container's securityContext: user, capabilities, read-only root."""
    sc = container["securityContext"]
    args = ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    args += [f"--cap-add={cap}" for cap in sc["capabilities"].get("add", [])]
    if "runAsUser" in sc:
        args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    if sc.get("readOnlyRootFilesystem"):
        # Read-only like the pod's: no writable /run, /tmp or /var/tmp unless a volume says so.
        args += ["--read-only", "--read-only-tmpfs=false"]
    return args


class Deployment:
    """The chart's server and agent as podman containers; ``close()`` removes everything."""

    def __init__(self, image: str, objects: dict[str, Any], work: Path, keep: bool) -> None:
        self.image = image
        self.objects = objects
        self.work = work
        self.keep = keep
        self.prefix = f"credo-test-image-{os.getpid()}"
        self.names: list[str] = []
        statefulset = objects["StatefulSet/credo-server"]
        daemonset = objects["DaemonSet/credo-agent"]
        self.server_pod = containers(statefulset)
        self.server = self.server_pod["server"]
        self.agent_pod = containers(daemonset)
        self.agent = self.agent_pod["agent"]
        self.test = containers(objects["Pod/credo-test-x509-svid"])["fetch-x509-svid"]
        server_cm = objects["ConfigMap/credo-server"]["data"]
        agent_cm = objects["ConfigMap/credo-agent"]["data"]
        self.server_toml = tomllib.loads(server_cm["server.toml"])["server"]
        self.agent_toml = tomllib.loads(agent_cm["agent.toml"])["agent"]
        self.socket_dir = str(Path(self.agent_toml["socket_path"]).parent)
        # Host directories standing in for the pod volumes.
        self.config = work / "config"
        self.bundle = work / "bundle"
        self.sockets = work / "sockets"
        self.server_data = work / "server-data"
        for d in (self.config, self.bundle, self.sockets, self.server_data):
            d.mkdir()
        (self.config / "server.toml").write_text(scalar_toml(server_cm["server.toml"], "server"))
        (self.config / "agent.toml").write_text(scalar_toml(agent_cm["agent.toml"], "agent"))
        (self.config / "register-entries.sh").write_text(server_cm["register-entries.sh"])
        # fsGroup makes the claim writable by the server's group; here the server owns it.
        uid = statefulset["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        os.chown(self.server_data, uid, uid)
        self.bundle.chmod(0o755)
        self.sockets.chmod(0o755)  # as the kubelet creates the hostPath: root, 0755

    def name(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        self.names.append(name)
        return name

    def _mount(self, host: Path, container: str, read_only: bool = False) -> list[str]:
        return ["-v", f"{host}:{container}{':ro' if read_only else ''}"]

    def _empty_dir(self, role: str, container: str) -> list[str]:
        """An emptyDir as the kubelet makes one: a fresh directory, root-owned, mode 0777."""
        host = self.work / f"empty-{role}-{container.strip('/').replace('/', '-')}"
        if not host.exists():  # the pod's containers share it: the init container first
            host.mkdir()
            host.chmod(0o777)
        return self._mount(host, container)

    def prepare_private_dirs(self, role: str, c: dict[str, Any]) -> None:
        """A pod's ``private-dirs`` init container, as the chart runs it (root, CAP_CHOWN
        only), on the emptyDirs it names; the pod's main container then gets the same ones."""
        args = [*PODMAN, "run", "--rm", "--network", "none", *LIMITS, *security_args(c)]
        for mount in c["volumeMounts"]:
            args += self._empty_dir(role, mount["mountPath"])
        args += ["--entrypoint", c["command"][0], self.image, *c["command"][1:]]
        run(args, what=f"podman run ({role} private-dirs init container)")

    def start_server(self) -> str:
        name = self.name("server")
        self.prepare_private_dirs("server", self.server_pod["private-dirs"])
        c = self.server
        env = [f"{e['name']}={e['value']}" for e in c["env"] if "value" in e]
        args = [*PODMAN, "run", "-d", "--name", name, "--network", "none", *LIMITS]
        args += security_args(c)
        for var in env:
            args += ["-e", var]
        args += self._mount(self.config / "server.toml", "/etc/credo/server.toml", True)
        args += self._mount(
            self.config / "register-entries.sh", "/etc/credo/register-entries.sh", True
        )
        args += self._mount(self.server_data, "/var/lib/credo")
        args += self._empty_dir("server", "/run/credo-server")
        args += self._empty_dir("server", "/tmp")
        args += ["--entrypoint", c["command"][0], self.image, *c["command"][1:], *c["args"]]
        run(args, what="podman run (server)")
        return name

    def exec(self, container: str, *cmd: str, what: str) -> str:
        return run(["podman", "exec", container, *cmd], what=what)

    def healthy(self, container: str, probe: dict[str, Any]) -> bool:
        """The probe's command passes; Failed at once if the container has exited."""
        state = run(
            ["podman", "inspect", "--format", "{{.State.Running}}", container], what="inspect"
        )
        if state.strip() != "true":
            raise Failed(f"container {container} exited")
        cmd = ["podman", "exec", container, *probe["exec"]["command"]]
        return subprocess.run(cmd, capture_output=True, check=False).returncode == 0

    def chown_socket_dir(self) -> None:
        """The agent's init container, as the chart runs it: root with CAP_CHOWN only."""
        c = self.agent_pod["socket-dir"]
        args = [*PODMAN, "run", "--rm", "--network", "none", *LIMITS, *security_args(c)]
        args += self._mount(self.sockets, self.socket_dir)
        args += ["--entrypoint", c["command"][0], self.image, *c["command"][1:]]
        run(args, what="podman run (socket-dir init container)")

    def start_agent(self, server: str, token: str) -> str:
        name = self.name("agent")
        self.prepare_private_dirs("agent", self.agent_pod["private-dirs"])
        c = self.agent
        args = [*PODMAN, "run", "-d", "--name", name, *LIMITS, *security_args(c)]
        # hostPID as in the DaemonSet; the server's network namespace stands in for the
        # Service (the agent reaches the server on 127.0.0.1:8081 there).
        args += ["--pid", "host", "--network", f"container:{server}"]
        args += ["-e", "MY_NODE_NAME=test-image-node"]
        args += self._mount(self.config / "agent.toml", "/etc/credo/agent.toml", True)
        args += self._mount(self.bundle, "/etc/credo/bundle", True)
        args += self._mount(self.sockets, self.socket_dir)
        for path in ("/run/credo-agent/private", "/var/lib/credo-agent", "/tmp"):
            args += self._empty_dir("agent", path)
        args += ["--entrypoint", c["command"][0], self.image, *c["command"][1:], *c["args"]]
        args += ["--join-token", token, "--server-address", "127.0.0.1:8081"]
        run(args, what="podman run (agent)")
        return name

    def run_helm_test(self) -> str:
        """The helm test pod's command, in a container mounting the host socket directory."""
        c = self.test
        args = [*PODMAN, "run", "--rm", "--network", "none", *LIMITS, *security_args(c)]
        for e in c["env"]:
            args += ["-e", f"{e['name']}={e['value']}"]
        mount = c["volumeMounts"][0]["mountPath"]
        args += self._mount(self.sockets, mount, True)
        args += ["--entrypoint", c["command"][0], self.image, *c["command"][1:]]
        return run(args, what="the helm test command", timeout=300)

    def logs(self) -> str:
        out = []
        for name in self.names:
            proc = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
            out.append(f"--- {name}\n{proc.stdout}{proc.stderr}")
        return "\n".join(out)

    def close(self) -> None:
        if self.keep:
            print(f"test-image: kept containers {' '.join(self.names)} and {self.work}")
            return
        # Newest first: the agent joins the server's network namespace, so it goes first.
        for name in reversed(self.names):
            removed = subprocess.run(
                ["podman", "rm", "-f", "-t", "5", name], capture_output=True, text=True
            )
            if removed.returncode != 0:
                print(f"test-image: could not remove {name}: {removed.stderr.strip()}")


def exercise(deployment: Deployment, steps: Steps) -> None:
    d = deployment
    server = d.start_server()
    wait_for("the server's startup probe", lambda: d.healthy(server, d.server["startupProbe"]), 120)
    steps.ok("credo-server runs as the chart runs it and passes its probe")

    hook = d.server["lifecycle"]["postStart"]["exec"]["command"]
    first = d.exec(server, *hook, what="the postStart hook")
    again = d.exec(server, *hook, what="the postStart hook, again")
    alias = "spiffe://example.org/k8s-cluster/example-cluster"
    if f"{alias} created" not in first or f"{alias} exists" not in again:
        raise Failed(f"postStart hook: expected created then exists, got {first!r} / {again!r}")
    steps.ok("the postStart hook registers the node alias, and a second run changes nothing")

    # What the bundle publisher keeps in the ConfigMap, and a join token (no Kubernetes here).
    pem = d.exec(server, "credo-server", "bundle", "show", "--format", "pem", what="bundle show")
    (d.bundle / "bundle.pem").write_text(pem)
    token_json = d.exec(
        server, "credo-server", "token", "generate", "--output", "json", what="token generate"
    )
    token = json.loads(token_json)["token"]

    d.chown_socket_dir()
    agent = d.start_agent(server, token)
    wait_for("the agent's startup probe", lambda: d.healthy(agent, d.agent["startupProbe"]), 120)
    steps.ok("credo-agent runs as the chart runs it (hostPID, uid 10002) and passes its probe")

    agent_id = f"spiffe://{d.agent_toml['trust_domain']}/credo/agent/join_token/{token}"
    test_env = {e["name"]: e["value"] for e in d.test["env"]}
    test_uid = d.test["securityContext"]["runAsUser"]
    # The helm test's SPIFFE ID for its container's uid, and one for this host process.
    create = ("credo-server", "entry", "create", "--parent-id", agent_id)
    for spiffe_id, uid in ((test_env["EXPECTED_SPIFFE_ID"], test_uid), (HOST_ENTRY_ID, 0)):
        selector = ("--selector", f"unix:uid:{uid}")
        d.exec(server, *create, "--spiffe-id", spiffe_id, *selector, what="entry create")

    out = d.run_helm_test()
    if f"ok: X.509-SVID for {test_env['EXPECTED_SPIFFE_ID']}" not in out:
        raise Failed(f"the helm test command printed {out!r}")
    steps.ok("a workload container fetches its X.509-SVID through the mounted socket directory")

    socket = d.sockets / Path(d.agent_toml["socket_path"]).name
    fetch = [str(Path(sys.executable).parent / "credo-agent"), "api", "fetch", "x509"]
    fetch += ["--socket", f"unix://{socket}", "--output", "json", "--timeout", "10"]

    def host_fetch() -> bool:
        proc = subprocess.run(fetch, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return False
        return HOST_ENTRY_ID in [s["spiffe_id"] for s in json.loads(proc.stdout)["svids"]]

    wait_for("an X.509-SVID for the host process", host_fetch, 60)
    steps.ok("a host process fetches its X.509-SVID through the socket in the host directory")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", help="base image (default: a debootstrapped Debian, cached)")
    parser.add_argument("--keep", action="store_true", help="keep containers and files")
    args = parser.parse_args()

    steps = Steps()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    tag = f"localhost/{chart['name']}:{chart['appVersion']}"  # the chart's default image
    work = Path(tempfile.mkdtemp(prefix="credo-test-image-"))
    work.chmod(0o755)  # the containers' users read the config files through it
    deployment: Deployment | None = None
    try:
        with steps.phase("base image"):
            base = args.base or ensure_base_image()
        with steps.phase("wheelhouse"):
            wheels = None if args.base else ensure_wheelhouse()
        with steps.phase(f"podman build -t {tag}"):
            build_image(base, tag, wheels, work)
        steps.ok(f"the Dockerfile builds FROM {base}")
        deployment = Deployment(tag, render_chart(), work, args.keep)
        with steps.phase("server, agent and workloads"):
            exercise(deployment, steps)
    except (Failed, subprocess.TimeoutExpired) as exc:
        if deployment is not None:
            print(deployment.logs(), file=sys.stderr)
        print(f"test-image: FAILED: {exc}", file=sys.stderr)
        print(f"test-image: {steps.passed} passed, 1 failed")
        return 1
    finally:
        if deployment is not None:
            deployment.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"test-image: done in {time.monotonic() - steps.started:.1f}s")
    print(f"test-image: {steps.passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
