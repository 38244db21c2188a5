"""The shared config plumbing: TOML tables to frozen dataclasses, with errors that name the key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from credo._config import (
    duration_field,
    from_table,
    named_tables_field,
    plugin_tables,
    read_toml,
)
from credo.errors import ConfigError


@dataclass(frozen=True)
class _Plugin:
    limit: int = 10
    ratio: float = 0.5
    enabled: bool = True
    path: Path | None = None
    names: tuple[str, ...] = ()
    ttl: int = duration_field(60)
    label: str = "x"

    def validate(self) -> None:
        if self.limit < 0:
            raise ConfigError(f"limit: must be >= 0, got {self.limit}")


@dataclass(frozen=True)
class _Other:
    cluster: str = ""


CATALOG = {"alpha": _Plugin, "beta": _Other}


def test_each_key_is_converted_to_its_field_type() -> None:
    """Integers, floats, booleans, paths, string lists and durations come out typed."""
    got = from_table(
        _Plugin,
        {"limit": 3, "ratio": 1, "enabled": False, "path": "~/x", "names": ["a", "b"], "ttl": "2m"},
        "agent.thing.alpha",
    )
    assert got == _Plugin(3, 1.0, False, Path("~/x").expanduser(), ("a", "b"), 120)


def test_dashes_are_accepted_for_underscores() -> None:
    """``workload-size-limit`` and ``workload_size_limit`` name the same setting."""

    @dataclass(frozen=True)
    class Dashed:
        size_limit: int = 0

    assert from_table(Dashed, {"size-limit": 5}).size_limit == 5


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"limit": "many"}, "agent.w.alpha.limit: expected an integer, got 'many'"),
        ({"limit": 1.5}, "agent.w.alpha.limit: expected an integer"),
        ({"limit": True}, "agent.w.alpha.limit: expected an integer"),
        ({"enabled": "yes"}, "agent.w.alpha.enabled: expected true or false"),
        ({"ttl": "soon"}, "agent.w.alpha.ttl: invalid duration"),
        ({"names": [1]}, "agent.w.alpha.names: expected a list of strings"),
        ({"label": 3}, "agent.w.alpha.label: expected a string"),
        ({"limit": -1}, "agent.w.alpha.limit: must be >= 0, got -1"),
        ({"colour": "red"}, "agent.w.alpha.colour: unknown setting; expected one of: enabled,"),
    ],
)
def test_bad_values_name_the_full_key(table: dict[str, object], message: str) -> None:
    """Every refusal names the key by its whole TOML path and says what was expected."""
    with pytest.raises(ConfigError) as info:
        from_table(_Plugin, table, "agent.w.alpha")
    assert str(info.value).startswith(message)


def test_plugin_tables_build_each_named_plugin() -> None:
    """Each ``[<where>.<name>]`` table becomes that plugin's config; an empty table is defaults."""
    got = plugin_tables({"alpha": {"limit": 1}, "beta": {}}, CATALOG, "agent.workload_attestor")
    assert got == {"alpha": _Plugin(limit=1), "beta": _Other()}


def test_unknown_plugin_name_is_refused_with_the_known_ones() -> None:
    """A typo in a plugin name says which plugins exist."""
    with pytest.raises(
        ConfigError,
        match=r"agent.workload_attestor.unx: unknown plugin 'unx'; "
        r"known plugins: alpha, beta",
    ):
        plugin_tables({"unx": {}}, CATALOG, "agent.workload_attestor")


def test_plugin_section_must_be_tables() -> None:
    """``workload_attestor = "unix"`` (not a table) is refused with the expected form."""
    with pytest.raises(
        ConfigError, match=r"expected tables like \[agent.workload_attestor.<name>\]"
    ):
        plugin_tables("unix", CATALOG, "agent.workload_attestor")


def test_read_toml_errors_are_one_line(tmp_path: Path) -> None:
    """A missing file and a malformed file each give one clear ConfigError."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_toml(bad)


@dataclass(frozen=True)
class _Cluster:
    audience: str = "credo"


@dataclass(frozen=True)
class _WithClusters:
    clusters: Mapping[str, _Cluster] = named_tables_field(_Cluster)


def test_named_sub_tables_become_a_dict_of_their_dataclass() -> None:
    """``[<where>.clusters.<name>]`` tables parse into ``{name: Cluster}``; none gives ``{}``."""
    got = from_table(_WithClusters, {"clusters": {"a": {}, "b": {"audience": "x"}}}, "s.k.p")
    assert got == _WithClusters({"a": _Cluster(), "b": _Cluster("x")})
    assert from_table(_WithClusters, {}).clusters == {}
    with pytest.raises(ConfigError, match=r"^s.k.p.clusters.b.audience: expected a string"):
        from_table(_WithClusters, {"clusters": {"b": {"audience": 1}}}, "s.k.p")
