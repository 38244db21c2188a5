"""``credo-server localauthority x509|jwt|wit show|prepare|activate|taint|revoke``.

Manual control of the two key slots per kind (X.509 CA, JWT and WIT-SVID signing keys): prepare the
next one, activate it, taint the old one (agents re-issue what it signed), then revoke it
(it leaves the bundle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from credo._proto.credo.server.v1 import admin_pb2
from server.cli.client import AdminClient
from server.cli.output import emit, message_to_dict, render_authority, render_authority_state
from server.cli.params import admin_options

__all__ = ["localauthority"]

KINDS = {"x509": "X.509 CA", "jwt": "JWT signing key", "wit": "WIT-SVID signing key"}
# action -> (admin method name, needs --authority-id, what it does, past tense)
ACTIONS = {
    "prepare": ("PrepareAuthority", False, "Prepare the next authority.", "prepared"),
    "activate": ("ActivateAuthority", True, "Make the prepared authority active.", "activated"),
    "taint": (
        "TaintAuthority",
        True,
        "Taint the old authority: re-issue what it signed.",
        "tainted",
    ),
    "revoke": (
        "RevokeAuthority",
        True,
        "Revoke a tainted authority: drop it from the bundle.",
        "revoked",
    ),
}


@click.group()
def localauthority() -> None:
    """Manage this server's X.509 CA, JWT and WIT-SVID signing keys (two slots each)."""


def _show_command(kind: str) -> click.Command:
    @click.command(name="show", help=f"Show the active, prepared and old {KINDS[kind]}.")
    @admin_options
    def show(socket_path: str, output: str) -> None:
        with AdminClient(socket_path) as client:
            state = client.call(
                client.authorities.GetAuthorityState,
                admin_pb2.AuthorityRequest(kind=kind),
                noun="authority",
            )
        emit(output, message_to_dict(state), render_authority_state(kind, state))

    return show


def _action_command(kind: str, action: str) -> click.Command:
    method_name, needs_id, help_text, done = ACTIONS[action]

    def callback(socket_path: str, output: str, authority_id: str | None) -> None:
        with AdminClient(socket_path) as client:
            method: Callable[..., Any] = getattr(client.authorities, method_name)
            info = client.call(
                method,
                admin_pb2.AuthorityRequest(kind=kind, authority_id=authority_id or ""),
                noun="authority",
            )
        text = f"{KINDS[kind]} {done}:\n{render_authority(info)}"
        emit(output, message_to_dict(info), text)

    command = click.command(name=action, help=f"{help_text} ({KINDS[kind]})")(callback)
    command = admin_options(command)
    return click.option(
        "--authority-id",
        required=needs_id,
        help="The authority's ID (see 'show').",
    )(command)


for _kind in KINDS:
    _group = click.Group(name=_kind, help=f"Manage the {KINDS[_kind]}.")
    _group.add_command(_show_command(_kind))
    for _action in ACTIONS:
        _group.add_command(_action_command(_kind, _action))
    localauthority.add_command(_group)
