"""The shared selector rules: values an attestor can produce pass, others say why."""

from __future__ import annotations

import pytest

from credo.errors import InvalidSelector
from credo.selector import Selector
from credo.selector_rules import check_selector

GOOD = [
    "unix:uid:0",
    "unix:uid:4294967294",
    "unix:gid:1001",
    "unix:supplementary_gid:998",
    "unix:user:pr-reviewer",
    "unix:path:/usr/local/bin/pr reviewer",
    "unix:sha256:" + "ab" * 32,
    "systemd:id:pr-reviewer.service",
    "k8s:ns:shop",
    "k8s:pod-label:app:checkout",
    "k8s:pod-image-count:2",
    "k8s_psat:agent_node_label:topology.kubernetes.io/zone:eu-1a",
    "docker:label:anything goes",  # unknown types are opaque
    "join_token:abc",
]

BAD = {
    "unix:uid:-1": "decimal",
    "unix:uid:abc": "decimal",
    "unix:uid:99999999999": "larger than",
    "unix:uid:4294967295": "larger than",
    "unix:uid:ü1": "decimal",
    "unix:uid:\u0661": "decimal",  # an Arabic-Indic digit: str.isdigit() would take it
    "unix:uid:1 2": "decimal",
    "unix:uid:": "needs a value",
    "unix:path:rel/path": "absolute",
    "unix:path:/a\nb": "control character",
    "unix:sha256:zz": "SHA-256",
    "unix:sha256:" + "AB" * 32: "lowercase",
    "unix:user:a b": "white space",
    "unix:bogus:1": "unknown unix selector",
    "k8s:pod-label:novalue": "'<key>:<value>'",
    "k8s:pod-image-count:x": "count",
    "docker:label:a\x00b": "NUL",
}


@pytest.mark.parametrize("text", GOOD)
def test_values_attestors_produce_pass(text: str) -> None:
    check_selector(Selector.parse(text))


@pytest.mark.parametrize(("text", "why"), BAD.items())
def test_values_no_attestor_produces_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidSelector, match=why):
        check_selector(Selector.parse(text))
