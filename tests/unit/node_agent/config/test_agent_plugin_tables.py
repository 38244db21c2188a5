"""The agent's plugin tables: [agent.node_attestor.<name>] and [agent.workload_attestor.<name>],
each parsed into its plugin's own dataclass, with errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from credo.errors import ConfigError
from node_agent.attestation.join_token import JoinTokenConfig
from node_agent.attestation.k8s_psat import K8sPsatConfig
from node_agent.config import AgentConfig, PluginConfig, load_config
from node_agent.workload.systemd import SystemdAttestorConfig
from node_agent.workload.unix import DEFAULT_WORKLOAD_SIZE_LIMIT, UnixAttestorConfig

SERVER = {"server_addresses": ("127.0.0.1:8081",)}


def _file(tmp_path: Path, text: str) -> Path:
    """An agent config file: an [agent] table with a server address, then ``text``."""
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nserver_address = "127.0.0.1:8081"\n' + text)
    return path


def _load(tmp_path: Path, text: str, **overrides: object) -> AgentConfig:
    return load_config(_file(tmp_path, text), overrides)


@dataclass(frozen=True)
class _SystemdConfig:
    """A second workload attestor, to check that several combine."""

    user_units: bool = False


# --- defaults and existing command lines -------------------------------------------------


def test_without_tables_join_token_and_unix_are_used() -> None:
    """No plugin tables: join_token is the node attestor (fed by --join-token) and unix the
    workload attestor, so existing command lines keep working."""
    config = load_config(None, {**SERVER, "join_token": "tok"})
    assert config.node_attestor == PluginConfig("join_token", JoinTokenConfig())
    assert config.workload_attestor == (PluginConfig("unix", UnixAttestorConfig()),)
    assert config.join_token == "tok"
    assert config.deprecations == ()


# --- [agent.node_attestor.join_token] ----------------------------------------------------


def test_join_token_table_is_valid_empty(tmp_path: Path) -> None:
    """An empty [agent.node_attestor.join_token] names the join_token attestor."""
    config = _load(tmp_path, "[agent.node_attestor.join_token]\n", join_token="tok")
    assert config.node_attestor == PluginConfig("join_token", JoinTokenConfig())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[agent.node_attestor.join_token]\ntoken = "x"\n',
            "agent.node_attestor.join_token.token: unknown setting; expected one of: none",
        ),
        (
            "[agent.node_attestor]\njoin_token = 3\n",
            "agent.node_attestor.join_token: expected a table, got 3",
        ),
        (
            "[agent.node_attestor.tpm]\n",
            "agent.node_attestor.tpm: unknown plugin 'tpm'; known plugins: join_token, k8s_psat",
        ),
        (
            "[agent.node_attestor]\n",
            "agent.node_attestor: exactly one node attestor table is required, got none",
        ),
        (
            "[agent.workload_attestor.unix]\nhash_limit = 5\n",
            "agent.workload_attestor.unix.hash_limit: unknown setting; expected one of: "
            "discover_workload_path, proc_root, workload_size_limit",
        ),
        (
            '[agent.workload_attestor.unix]\nworkload_size_limit = "big"\n',
            "agent.workload_attestor.unix.workload_size_limit: expected an integer, got 'big'",
        ),
        (
            '[agent.workload_attestor.unix]\nproc_root = "proc"\n',
            "agent.workload_attestor.unix.proc_root: must be an absolute path, got 'proc'",
        ),
        (
            "[agent.workload_attestor.docker]\n",
            "agent.workload_attestor.docker: unknown plugin 'docker'; "
            "known plugins: k8s, systemd, unix",
        ),
        (
            "[agent.workload_attestor]\n",
            "agent.workload_attestor: at least one workload attestor table is required",
        ),
        (
            "[agent.workload_attestor.systemd]\nunit_path = []\n",
            "agent.workload_attestor.systemd.unit_path: unknown setting; expected one of: "
            "proc_root, unit_paths",
        ),
        (
            "[agent.workload_attestor.systemd]\nunit_paths = [3]\n",
            "agent.workload_attestor.systemd.unit_paths: expected a list of strings, got [3]",
        ),
        (
            '[agent.workload_attestor.systemd]\nunit_paths = ["units"]\n',
            "agent.workload_attestor.systemd.unit_paths: must be absolute paths, got 'units'",
        ),
    ],
    ids=[
        "node-unknown-key",
        "node-bad-value",
        "node-unknown-plugin",
        "node-no-plugin",
        "unix-unknown-key",
        "unix-bad-type",
        "unix-bad-value",
        "unix-unknown-plugin",
        "unix-no-plugin",
        "systemd-unknown-key",
        "systemd-bad-type",
        "systemd-bad-value",
    ],
)
def test_bad_plugin_tables_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Each bad plugin table (unknown key, bad value, unknown plugin, none at all) is refused
    with the full key of what is wrong."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert str(info.value) == message


def test_exactly_one_node_attestor(tmp_path: Path) -> None:
    """Two node attestor tables are refused, naming both."""
    path = _file(
        tmp_path,
        '[agent.node_attestor.join_token]\n[agent.node_attestor.k8s_psat]\ncluster = "prod"\n',
    )
    with pytest.raises(ConfigError, match="exactly one node attestor table is required, got "):
        load_config(path, {})


def test_join_token_flag_needs_the_join_token_attestor(tmp_path: Path) -> None:
    """--join-token with another node attestor configured is refused, saying which."""
    path = _file(tmp_path, '[agent.node_attestor.k8s_psat]\ncluster = "prod"\n')
    config = load_config(path, {})
    assert config.node_attestor == PluginConfig("k8s_psat", K8sPsatConfig("prod"))
    with pytest.raises(ConfigError, match=r"join_token: .*\[agent\.node_attestor\.k8s_psat\]"):
        load_config(path, {"join_token": "tok"})


# --- [agent.node_attestor.k8s_psat] ------------------------------------------------------


def test_k8s_psat_table_names_the_cluster_and_the_token(tmp_path: Path) -> None:
    """[agent.node_attestor.k8s_psat] needs the cluster; the token is the projected one at
    /var/run/secrets/tokens/credo-agent unless token_path says otherwise."""
    config = _load(tmp_path, '[agent.node_attestor.k8s_psat]\ncluster = "prod-eu-1"\n')
    assert config.node_attestor == PluginConfig(
        "k8s_psat",
        K8sPsatConfig("prod-eu-1", Path("/var/run/secrets/tokens/credo-agent")),
    )
    moved = _load(
        tmp_path,
        '[agent.node_attestor.k8s_psat]\ncluster = "c"\ntoken_path = "/run/token"\n',
    )
    assert moved.node_attestor.config.token_path == Path("/run/token")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[agent.node_attestor.k8s_psat]\n",
            "agent.node_attestor.k8s_psat.cluster: is required: the name of this cluster in "
            "the server's [server.node_attestor.k8s_psat.clusters.<name>] table",
        ),
        (
            '[agent.node_attestor.k8s_psat]\ncluster = "prod/eu"\n',
            "agent.node_attestor.k8s_psat.cluster: 'prod/eu' cannot be part of a SPIFFE ID; "
            "use letters, digits, '.', '-' and '_'",
        ),
        (
            '[agent.node_attestor.k8s_psat]\ncluster = "c"\naudience = "x"\n',
            "agent.node_attestor.k8s_psat.audience: unknown setting; expected one of: cluster, "
            "token_path",
        ),
        (
            '[agent.node_attestor.k8s_psat]\ncluster = "c"\ntoken_path = ""\n',
            "agent.node_attestor.k8s_psat.token_path: expected a path, got ''",
        ),
    ],
    ids=["no-cluster", "bad-cluster", "unknown-key", "empty-token-path"],
)
def test_bad_k8s_psat_tables_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    """A bad [agent.node_attestor.k8s_psat] table is refused with the full key."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert str(info.value) == message


# --- [agent.workload_attestor.unix] ------------------------------------------------------


def test_unix_table_parses_into_its_dataclass(tmp_path: Path) -> None:
    """[agent.workload_attestor.unix] settings reach UnixAttestorConfig, typed."""
    config = _load(
        tmp_path,
        "[agent.workload_attestor.unix]\n"
        "discover_workload_path = false\n"
        "workload-size-limit = 1024\n"
        'proc_root = "/host/proc"\n',
    )
    assert config.workload_attestor == (
        PluginConfig("unix", UnixAttestorConfig(False, 1024, "/host/proc")),
    )


def test_systemd_table_parses_into_its_dataclass(tmp_path: Path) -> None:
    """[agent.workload_attestor.systemd] settings reach SystemdAttestorConfig; with no
    settings it searches systemd's unit directories."""
    config = _load(
        tmp_path,
        "[agent.workload_attestor.unix]\n"
        "[agent.workload_attestor.systemd]\n"
        'proc_root = "/host/proc"\n'
        'unit_paths = ["/host/etc/systemd/system", "/host/usr/lib/systemd/system"]\n',
    )
    assert config.workload_attestor[1] == PluginConfig(
        "systemd",
        SystemdAttestorConfig(
            "/host/proc", ("/host/etc/systemd/system", "/host/usr/lib/systemd/system")
        ),
    )
    plain = _load(tmp_path, "[agent.workload_attestor.systemd]\n")
    assert plain.workload_attestor == (PluginConfig("systemd", SystemdAttestorConfig()),)
    assert "/etc/systemd/system" in SystemdAttestorConfig().unit_paths


def test_several_workload_attestors_in_config_order(tmp_path: Path) -> None:
    """Every [agent.workload_attestor.*] table is kept, in the order the file names them."""
    path = _file(
        tmp_path,
        "[agent.workload_attestor.systemd]\nuser_units = true\n[agent.workload_attestor.unix]\n",
    )
    catalog = {"unix": UnixAttestorConfig, "systemd": _SystemdConfig}
    config = load_config(path, {}, workload_attestors=catalog)
    assert [p.name for p in config.workload_attestor] == ["systemd", "unix"]
    assert config.workload_attestor[0].config == _SystemdConfig(True)


def test_plugin_tables_are_not_flags() -> None:
    """Plugin tables come from the config file only."""
    with pytest.raises(ConfigError, match="config file only"):
        load_config(None, {**SERVER, "workload_attestor": {"unix": {}}})


# --- the flat workload_size_limit from before the tables -----------------------------------


def test_flat_workload_size_limit_still_works_with_a_deprecation(tmp_path: Path) -> None:
    """The old flat key sets the unix attestor's limit and leaves a warning saying where the
    key moved; the flag of the same name does too, over the file."""
    config = _load(tmp_path, "workload_size_limit = 5\n")
    assert config.workload_attestor[0].config.workload_size_limit == 5
    (message,) = config.deprecations
    assert "workload_size_limit is deprecated: set it in [agent.workload_attestor.unix]" in message
    flagged = _load(
        tmp_path, "[agent.workload_attestor.unix]\nworkload_size_limit = 5\n", workload_size_limit=9
    )
    assert flagged.workload_attestor[0].config.workload_size_limit == 9
    assert flagged.deprecations
    plain = _load(tmp_path, "")
    assert plain.workload_attestor[0].config.workload_size_limit == DEFAULT_WORKLOAD_SIZE_LIMIT


def test_flat_workload_size_limit_without_unix_says_where_it_moved(tmp_path: Path) -> None:
    """With no unix attestor configured the old key has nowhere to go: a clear error."""
    path = _file(tmp_path, "workload_size_limit = 5\n[agent.workload_attestor.systemd]\n")
    catalog = {"unix": UnixAttestorConfig, "systemd": _SystemdConfig}
    with pytest.raises(
        ConfigError, match=r"workload_size_limit: moved to \[agent\.workload_attestor\.unix\]"
    ):
        load_config(path, {}, workload_attestors=catalog)
