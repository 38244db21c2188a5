"""How a CLI secret is read from a flag, a file, stdin or the environment (credo/_cli.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from credo._cli import CliError, read_secret


def test_sources_in_order_and_whitespace_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flag wins, then the file, then stdin for '-', then the environment; the newline a
    file or `echo` adds is dropped."""
    monkeypatch.setenv("T_ENV", " from-env\n")
    path = tmp_path / "t"
    path.write_text("from-file\n")
    assert read_secret("from-flag", None, flag="t", env="T_ENV") == "from-flag"
    assert read_secret(None, str(path), flag="t", env="T_ENV") == "from-file"
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    assert read_secret("-", None, flag="t", env="T_ENV") == "from-stdin"
    monkeypatch.setattr("sys.stdin", io.StringIO("again\n"))
    assert read_secret(None, "-", flag="t", env="T_ENV") == "again"
    assert read_secret(None, None, flag="t", env="T_ENV") == "from-env"
    monkeypatch.delenv("T_ENV")
    assert read_secret(None, None, flag="t", env="T_ENV") is None


@pytest.mark.parametrize(
    ("value", "file_text", "message"),
    [
        ("x", "y", "give --t or --t-file, not both"),
        (None, "\n", "--t: {path} is empty"),
        (None, None, "--t-file: cannot read {path}: No such file or directory"),
    ],
)
def test_bad_sources_are_one_line_errors(
    tmp_path: Path, value: str | None, file_text: str | None, message: str
) -> None:
    """Both flags, an empty file or a missing one are refused, naming the flag."""
    path = tmp_path / "secret"
    if file_text is not None:
        path.write_text(file_text)
    with pytest.raises(CliError) as info:
        read_secret(value, str(path), flag="t", env="T_ENV_UNSET")
    assert info.value.message == message.format(path=path)
