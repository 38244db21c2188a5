#!/usr/bin/env python3
"""Call a model API with no API key: exchange a JWT-SVID for a short-lived access token.

The workload (an AI agent) fetches a JWT-SVID from the local Credo agent through the SPIFFE
Workload API and exchanges it at the model provider's token endpoint, which verifies it with
the keys Credo publishes through OIDC discovery (docs/oidc.md). Prints the JSON token
response with the access token itself left out unless ``--print-token`` is given (pipe it
into the SDK's environment, never into a log).

    export SPIFFE_ENDPOINT_SOCKET=unix:///tmp/credo-agent/public/api.sock
    # Anthropic (RFC 7523 jwt-bearer grant)
    python3 model_api_token.py anthropic --audience https://api.anthropic.com \\
        --federation-rule-id fdrl_... --organization-id <uuid> --service-account-id svac_...
    # OpenAI (RFC 8693 token exchange)
    python3 model_api_token.py openai --audience https://api.openai.com \\
        --identity-provider-id <id> --service-account-id <id>

``--token-url`` points it elsewhere (a test double: plain http only to localhost).
Standard library and ``credo`` only.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from credo.errors import CredoError
from credo.workload_client import WorkloadApiClient

TOKEN_URLS = {
    "anthropic": "https://api.anthropic.com/v1/oauth/token",
    "openai": "https://auth.openai.com/oauth/token",
}


def exchange_body(args: argparse.Namespace, svid: str) -> dict[str, Any]:
    """The token request each provider documents, with the JWT-SVID as the subject."""
    if args.provider == "anthropic":
        body = {
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": svid,
            "federation_rule_id": args.federation_rule_id,
            "organization_id": args.organization_id,
            "service_account_id": args.service_account_id,
        }
        if args.workspace_id:
            body["workspace_id"] = args.workspace_id
        return body
    return {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "subject_token": svid,
        "identity_provider_id": args.identity_provider_id,
        "service_account_id": args.service_account_id,
    }


def check_token_url(url: str) -> None:
    parts = urlsplit(url)
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and local):
        raise SystemExit(f"error: --token-url must be https (plain http only to localhost): {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("provider", choices=sorted(TOKEN_URLS))
    parser.add_argument("--audience", required=True, help="aud the provider's rule expects")
    parser.add_argument("--spiffe-id", default=None, help="which of this workload's IDs")
    parser.add_argument("--token-url", default=None)
    parser.add_argument("--service-account-id", required=True)
    parser.add_argument("--federation-rule-id", default="", help="anthropic")
    parser.add_argument("--organization-id", default="", help="anthropic")
    parser.add_argument("--workspace-id", default="", help="anthropic (optional)")
    parser.add_argument("--identity-provider-id", default="", help="openai")
    parser.add_argument("--print-token", action="store_true")
    args = parser.parse_args(argv)
    needed = (
        ("federation_rule_id", "organization_id")
        if args.provider == "anthropic"
        else ("identity_provider_id",)
    )
    for name in needed:
        if not getattr(args, name):
            parser.error(f"--{name.replace('_', '-')} is required for {args.provider}")
    url = args.token_url or TOKEN_URLS[args.provider]
    check_token_url(url)

    try:
        with WorkloadApiClient(timeout=10) as client:
            svid = client.fetch_jwt_svid([args.audience], args.spiffe_id)
    except CredoError as err:
        print(f"error: no JWT-SVID from the Workload API: {err}", file=sys.stderr)
        return 1

    request = urllib.request.Request(
        url,
        data=json.dumps(exchange_body(args, svid.token)).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read()[:500].decode("utf-8", "replace")
        print(f"error: {url} refused the exchange ({err.code}): {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as err:
        print(f"error: {url}: {err}", file=sys.stderr)
        return 1
    if not args.print_token:
        reply = {k: v for k, v in reply.items() if k not in ("access_token", "refresh_token")}
    reply["spiffe_id"] = str(svid.spiffe_id)
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
