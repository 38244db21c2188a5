"""What a selector of a type Credo knows may look like: one set of rules for the server's
admin API and the CLI.

An entry whose selector can never be produced by an attestor (``unix:uid:-1``,
``unix:uid:abc``, ``unix:sha256:zz``, ``unix:path:rel/path``, a value with a newline) can
never match; it is refused with the reason instead of being stored. The types checked are
the ones Credo's attestors produce: ``unix``, ``systemd``, ``k8s`` (workload) and
``k8s_psat`` (node). Other types stay opaque, as in SPIRE (any non-empty value), except
that no selector value may hold a NUL (it cannot be stored in PostgreSQL, nor produced by
an attestor).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from credo.errors import InvalidSelector
from credo.selector import Selector

__all__ = ["KNOWN_KEYS", "check_selector"]

_MAX_ID = 4294967294  # uid_t/gid_t; 4294967295 is (uid_t)-1, "no id"
_DECIMAL = re.compile(r"[0-9]+", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")

_Rule = Callable[[str], str | None]
"""Takes the part of the value after ``<key>:``; returns why it is wrong, or None."""


def _id(value: str) -> str | None:
    if not _DECIMAL.fullmatch(value):
        return f"{value!r} is not a decimal number (0 to {_MAX_ID})"
    if int(value) > _MAX_ID:
        return f"{value} is larger than the largest id ({_MAX_ID})"
    return None


def _count(value: str) -> str | None:
    if not _DECIMAL.fullmatch(value) or len(value) > 6:
        return f"{value!r} is not a count (a decimal number)"
    return None


def _name(value: str) -> str | None:
    if _SPACE_OR_CONTROL.search(value):
        return f"{value!r} holds white space or a control character"
    return None


def _text(value: str) -> str | None:
    if _CONTROL.search(value):
        return f"{value!r} holds a control character (a newline, a NUL, ...)"
    return None


def _path(value: str) -> str | None:
    if not value.startswith("/"):
        return f"{value!r} is not an absolute path"
    return _text(value)


def _sha256(value: str) -> str | None:
    if not _SHA256.fullmatch(value):
        return f"{value!r} is not a SHA-256 digest (64 lowercase hex digits)"
    return None


def _key_value(value: str) -> str | None:
    key, sep, _ = value.partition(":")
    if not sep or not key:
        return f"{value!r} is not '<key>:<value>'"
    return _text(value)


_RULES: dict[str, dict[str, _Rule]] = {
    "unix": {
        "uid": _id,
        "gid": _id,
        "supplementary_gid": _id,
        "user": _name,
        "group": _name,
        "supplementary_group": _name,
        "path": _path,
        "sha256": _sha256,
    },
    "systemd": {"id": _name, "fragment_path": _path},
    "k8s": {
        "ns": _name,
        "sa": _name,
        "node-name": _name,
        "pod-uid": _name,
        "pod-name": _name,
        "container-name": _name,
        "container-image": _name,
        "pod-image": _name,
        "pod-init-image": _name,
        "pod-image-count": _count,
        "pod-init-image-count": _count,
        "pod-label": _key_value,
        "pod-owner": _key_value,
        "pod-owner-uid": _key_value,
    },
    "k8s_psat": {
        "cluster": _name,
        "agent_ns": _name,
        "agent_sa": _name,
        "agent_pod_name": _name,
        "agent_pod_uid": _name,
        "agent_node_ip": _name,
        "agent_node_name": _name,
        "agent_node_uid": _name,
        "agent_pod_label": _key_value,
        "agent_node_label": _key_value,
    },
}

KNOWN_KEYS: dict[str, tuple[str, ...]] = {kind: tuple(keys) for kind, keys in _RULES.items()}
"""The selector keys of each type Credo knows (``unix``: ``uid``, ``gid``, ...)."""


def check_selector(selector: Selector) -> None:
    """Raise :class:`~credo.errors.InvalidSelector` if ``selector`` can never be produced.

    Types Credo does not know are opaque (only a NUL is refused).
    """
    text = str(selector)
    if "\x00" in selector.value:
        raise InvalidSelector(text, "selector value holds a NUL character")
    rules = _RULES.get(selector.type)
    if rules is None:
        return
    key, sep, rest = selector.value.partition(":")
    rule = rules.get(key)
    if rule is None:
        raise InvalidSelector(
            text,
            f"unknown {selector.type} selector {key!r}; expected one of: "
            + ", ".join(f"{selector.type}:{k}:..." for k in rules),
        )
    if not sep or not rest:
        raise InvalidSelector(text, f"{selector.type}:{key} needs a value after '{key}:'")
    if (why := rule(rest)) is not None:
        raise InvalidSelector(text, f"{selector.type}:{key}: {why}")
