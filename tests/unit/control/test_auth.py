"""The token file: constant-time checks, reloads on rotation, refuses to start without a token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from secondsite.appliance.control import auth
from secondsite.appliance.control.auth import TokenFile, TokenFileError


def test_checks_the_token_without_surrounding_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  abc123\n")
    tokens = TokenFile(path)
    assert tokens.check("abc123")
    assert not tokens.check("abc12")
    assert not tokens.check("")


def test_reloads_a_rotated_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_RECHECK_SECONDS", 0.0)
    path = tmp_path / "token"
    path.write_text("old")
    tokens = TokenFile(path)
    new = tmp_path / "token.new"
    new.write_text("newer-token")
    os.replace(new, path)  # how a Kubernetes Secret volume swaps its files
    assert tokens.check("newer-token")
    assert not tokens.check("old")


def test_keeps_the_last_token_when_the_file_goes_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "_RECHECK_SECONDS", 0.0)
    path = tmp_path / "token"
    path.write_text("old")
    tokens = TokenFile(path)
    path.write_text("")
    assert tokens.check("old")
    path.unlink()
    assert tokens.check("old")


@pytest.mark.parametrize("content", [None, "", "\n  \n"])
def test_refuses_a_missing_or_empty_file(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenFileError):
        TokenFile(path)
