"""Configuration plumbing shared by ``credo-server`` and ``credo-agent``.

Both processes read settings from defaults, then a TOML file, then flags. The pieces here
are the ones both need, written once:

* :func:`read_toml` reads a file into a table, with one-line errors;
* :func:`from_table` builds a frozen dataclass from a TOML table (or flag values): each key
  is converted to its field's type (``str``, ``int``, ``float``, ``bool``, ``Path``,
  ``tuple[str, ...]``, their ``| None`` forms, and durations marked with
  :func:`duration_field`, and named sub-tables marked with :func:`named_tables_field`), unknown
  keys are refused, and the dataclass's own ``validate()`` runs last; every error names the
  key by its full TOML path (``agent.workload_attestor.unix.workload_size_limit: must be >= 0``);
* :func:`plugin_tables` turns ``[<side>.<kind>.<name>]`` tables into plugin configs through
  a catalog (name -> config class), refusing unknown plugin names.

A plugin config is any frozen dataclass; it may define ``validate(self) -> None`` raising
:class:`~credo.errors.ConfigError` with a message that starts with the field name
(``"workload_size_limit: must be >= 0"``): :func:`from_table` adds the table's path.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from credo.durations import parse_duration
from credo.errors import ConfigError

__all__ = [
    "DURATION",
    "NAMED_TABLES",
    "duration_field",
    "from_table",
    "named_tables_field",
    "plugin_tables",
    "read_toml",
]

T = TypeVar("T")

DURATION = "credo.duration"
"""Field metadata key marking a field as a duration (``90s``, ``10m``, ``1h`` or seconds)."""


NAMED_TABLES = "credo.named_tables"
"""Field metadata key marking a field as named sub-tables; the value is their dataclass."""


def duration_field(default: int, **kwargs: Any) -> Any:
    """A dataclass field holding whole seconds, written in TOML as ``90s`` / ``10m`` / ``1h``."""
    return dataclasses.field(default=default, metadata={DURATION: True}, **kwargs)


def named_tables_field(cls: type[Any]) -> Any:
    """A dataclass field holding named sub-tables, each parsed into the dataclass ``cls``.

    A plugin whose settings include one table per cluster declares
    ``clusters: Mapping[str, Cluster] = named_tables_field(Cluster)``; the TOML tables
    ``[<where>.clusters.<name>]`` then become ``{name: Cluster(...)}`` (empty by default),
    and errors name the sub-table's key (``<where>.clusters.prod.audience: ...``).
    """
    return dataclasses.field(default_factory=dict, metadata={NAMED_TABLES: cls})


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``; :class:`ConfigError` if unreadable or not TOML."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(kind: Any, value: Any, name: str, *, duration: bool) -> Any:
    """``value`` converted to the annotated type ``kind``; ConfigError naming ``name``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None or (value == "" and type(None) in typing.get_args(kind)):
            return None
        if len(options) == 1:
            return _convert(options[0], value, name, duration=duration)
        raise TypeError(f"{name}: unsupported union type {kind}")  # a programming error
    if duration:
        try:
            seconds = parse_duration(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: {exc}") from None
        if seconds < 0:
            raise ConfigError(f"{name}: must not be negative, got {value!r}")
        return seconds
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool | float):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if kind is Path:
        if not isinstance(value, str | Path) or str(value) == "":
            raise ConfigError(f"{name}: expected a path, got {value!r}")
        return Path(value).expanduser()
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return tuple(value)
    raise TypeError(f"{name}: unsupported setting type {kind}")  # a programming error


def from_table(
    cls: type[T],
    table: Mapping[str, Any],
    where: str = "",
    *,
    convert: Mapping[str, Callable[[Any, str], Any]] | None = None,
) -> T:
    """An instance of the dataclass ``cls`` from ``table``; every error names the key.

    Keys may use ``-`` for ``_``. ``convert`` maps field names to custom converters
    ``(value, full_key) -> converted`` for fields whose type needs more than the defaults
    (nested plugin tables, say). After construction, ``cls.validate()`` runs if defined.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        name = raw_key.replace("-", "_")
        full = _key(where, raw_key)
        if name not in fields or not fields[name].init:
            known = ", ".join(sorted(n for n, f in fields.items() if f.init)) or "none"
            raise ConfigError(f"{full}: unknown setting; expected one of: {known}")
        tables_cls = fields[name].metadata.get(NAMED_TABLES)
        if convert and name in convert:
            values[name] = convert[name](value, full)
        elif tables_cls is not None:
            values[name] = _named_tables(tables_cls, value, full)
        else:
            values[name] = _convert(
                hints[name], value, full, duration=bool(fields[name].metadata.get(DURATION))
            )
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            if not where:
                raise
            raise ConfigError(f"{where}.{exc}") from None
    return instance


def _named_tables(cls: type[T], tables: Any, where: str) -> dict[str, T]:
    """``{name: cls(...)}`` for each ``[<where>.<name>]`` table."""
    if not isinstance(tables, Mapping):
        raise ConfigError(f"{where}: expected tables like [{where}.<name>], got {tables!r}")
    return {name: from_table(cls, table, f"{where}.{name}") for name, table in tables.items()}


def plugin_tables(tables: Any, catalog: Mapping[str, type[Any]], where: str) -> dict[str, Any]:
    """``{name: config}`` for each ``[<where>.<name>]`` table, built with the catalog's class.

    An unknown plugin name is refused with the names the catalog knows.
    """
    if tables is None:
        return {}
    if not isinstance(tables, Mapping):
        raise ConfigError(f"{where}: expected tables like [{where}.<name>], got {tables!r}")
    out: dict[str, Any] = {}
    for name, table in tables.items():
        cls = catalog.get(name)
        if cls is None:
            known = ", ".join(sorted(catalog)) or "none"
            raise ConfigError(f"{where}.{name}: unknown plugin {name!r}; known plugins: {known}")
        out[name] = from_table(cls, table or {}, f"{where}.{name}")
    return out
