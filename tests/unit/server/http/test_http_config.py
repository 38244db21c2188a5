"""``[server.http]`` and ``--http-bind-address``: parsed, checked, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from credo.errors import ConfigError
from server.config import load_config
from server.http import HttpConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_no_http_table_means_no_http_front_end() -> None:
    """Without [server.http] and without --http-bind-address the server serves no HTTP."""
    assert load_config(None, {}).http == HttpConfig()
    assert not load_config(None, {}).http.enabled


def test_the_http_table_is_read(tmp_path: Path) -> None:
    """Every key of [server.http] reaches the config, durations included."""
    path = write(
        tmp_path,
        """
[server.http]
bind_address = "0.0.0.0:8443"
dns_names = ["credo.example.com"]
max_request_bytes = 8192
request_timeout = "5s"
idle_timeout = "1m"
""",
    )
    http = load_config(path, {}).http
    assert http.enabled
    assert http.host_port == ("0.0.0.0", 8443)
    assert http.dns_names == ("credo.example.com",)
    assert (http.max_request_bytes, http.request_timeout, http.idle_timeout) == (8192, 5, 60)
    assert not http.insecure_http


def test_the_flag_overrides_the_table(tmp_path: Path) -> None:
    """--http-bind-address sets [server.http] bind_address, keeping the table's other keys."""
    path = write(tmp_path, '[server.http]\nbind_address = "0.0.0.0:8443"\ndns_names = ["a.b"]\n')
    http = load_config(path, {"http_bind_address": "127.0.0.1:0"}).http
    assert http.bind_address == "127.0.0.1:0"
    assert http.dns_names == ("a.b",)
    assert load_config(None, {"http_bind_address": "127.0.0.1:0"}).http.enabled


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('bind_address = "8443"', "server.http.bind_address: expected host:port"),
        ('bind_address = "h:99999"', "server.http.bind_address: expected host:port"),
        ('tls_cert_file = "/x.crt"', "server.http.tls_cert_file: tls_cert_file and tls_key_file"),
        (
            'insecure_http = true\ntls_cert_file = "/a"\ntls_key_file = "/b"',
            "server.http.insecure_http: plain HTTP serves no certificate",
        ),
        ('dns_names = ["not a name"]', "server.http.dns_names: 'not a name' is not a DNS name"),
        ("max_request_bytes = 10", "server.http.max_request_bytes: expected 1024"),
        ('request_timeout = "0s"', "server.http.request_timeout: must be a positive duration"),
        ("insecure_http = 1", "server.http.insecure_http: expected true or false"),
        ("colour = 1", "server.http.colour: unknown setting"),
    ],
)
def test_bad_http_settings_are_refused(tmp_path: Path, table: str, message: str) -> None:
    """Each bad [server.http] value is refused with a message naming its full key."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"[server.http]\n{table}\n"), {})
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    "issuer",
    [
        "http://oidc.example.org",
        "oidc.example.org",
        "https://",
        "https://oidc.example.org/",
        "https://oidc.example.org?x=1",
        "https://user@oidc.example.org",
    ],
)
def test_jwt_issuer_must_be_an_https_url(issuer: str) -> None:
    """jwt_issuer is what OIDC relying parties fetch discovery from: an https URL, nothing
    else, so a typo is caught at start rather than by AWS refusing every token."""
    with pytest.raises(ConfigError, match="jwt_issuer"):
        load_config(None, {"jwt_issuer": issuer})


def test_jwt_issuer_accepts_an_https_url_with_a_path() -> None:
    """An issuer may have a path (https://example.org/tenant-a), as OIDC allows."""
    assert load_config(None, {"jwt_issuer": "https://x.org/t/a"}).jwt_issuer == "https://x.org/t/a"
