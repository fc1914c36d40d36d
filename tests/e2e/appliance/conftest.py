"""Fixtures of the appliance e2e tests: a short working directory (unix socket paths are limited to
107 bytes) and a cleanup stack that stops appliances and kills QEMU processes even when a test
fails."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ssapp", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    """Push closers; they run last-in first-out after the test, all of them, whatever fails."""
    closers: list[Callable[[], object]] = []
    yield closers
    errors: list[BaseException] = []
    while closers:
        try:
            closers.pop()()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]
