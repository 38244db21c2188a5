#!/usr/bin/env python3
"""A resource server that accepts delegated access tokens from Credo (docs/delegation.md).

Every request must carry ``Authorization: Bearer <token>``, a token Credo's token endpoint
issued for this server's audience with the ``repo:read`` scope. The answer says who the
request is for (the person), who makes it (the actor chain) and who answers for the agent
(the owner); anything else gets 401 or 403 with the reason, as RFC 6750 describes.

    python3 resource_server.py --issuer https://credo.example.com:8443 \\
        --audience https://git.example.com --ca-file bundle.pem --port 9000

Standard library and ``credo`` only.
"""

from __future__ import annotations

import argparse
import json
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import credo
from credo.errors import AccessTokenError, AccessTokenKeysUnavailable, InsufficientScope

REQUIRED = ["repo:read"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issuer", required=True, help="Credo's token issuer (iss).")
    parser.add_argument("--audience", required=True, help="This server's audience.")
    parser.add_argument("--ca-file", help="Trust anchors for Credo's HTTPS (its bundle PEM).")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    trust = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, object], challenge: str = "") -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if challenge:
                self.send_header("WWW-Authenticate", challenge)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            header = self.headers.get("Authorization", "")
            if not header.startswith("Bearer "):
                self._answer(401, {"error": "no bearer token"}, "Bearer")
                return
            try:
                token = credo.verify_access_token(
                    header.removeprefix("Bearer "),
                    issuer=args.issuer,
                    audience=args.audience,
                    required_scopes=REQUIRED,
                    ssl_context=trust,
                )
            except InsufficientScope as err:
                self._answer(403, {"error": str(err)}, 'Bearer error="insufficient_scope"')
                return
            except AccessTokenError as err:
                self._answer(401, {"error": str(err)}, 'Bearer error="invalid_token"')
                return
            except AccessTokenKeysUnavailable as err:
                self._answer(503, {"error": str(err)})
                return
            self._answer(
                200,
                {
                    "for": token.subject,
                    "actors": list(token.actors),
                    "scopes": sorted(token.scopes),
                    "owner": token.owner,
                },
            )

        def log_message(self, format: str, *args: object) -> None:  # never log tokens
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
