"""The server's one HTTP front end: :class:`HttpFrontend` and what endpoints use.

Endpoints live in the packages that own them and are added with
:meth:`HttpFrontend.add_routes` by ``server/app.py``; see :mod:`server.http.frontend`.
"""

from server.http.config import HttpConfig
from server.http.errors import HttpError
from server.http.frontend import ADDRESS_FILE, HttpFrontend, json_response
from server.http.tls import FileCertificate, IssuedCertificate, build_http_context

__all__ = [
    "ADDRESS_FILE",
    "FileCertificate",
    "HttpConfig",
    "HttpError",
    "HttpFrontend",
    "IssuedCertificate",
    "build_http_context",
    "json_response",
]
