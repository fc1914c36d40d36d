"""Fixtures of the Pulumi provider's unit tests: programs run against Pulumi's mocks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pulumi_mocks import Runner


@pytest.fixture(scope="session")
def pulumi_loop() -> asyncio.AbstractEventLoop:
    """One event loop for every Pulumi test of the session, as when they run alone."""
    return asyncio.new_event_loop()


@pytest.fixture(autouse=True)
def current_event_loop(pulumi_loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Pulumi's runtime takes the thread's current event loop implicitly, and leaves RPCs of a
    refused program pending on it. Async tests that ran before (pytest-asyncio) leave no loop
    set, so each Pulumi test runs with the session's loop current. It is not closed: closing it
    would turn those pending RPCs into never-awaited warnings, which the suite treats as errors."""
    asyncio.set_event_loop(pulumi_loop)
    try:
        yield
    finally:
        asyncio.set_event_loop(None)


@pytest.fixture
def pulumi_run() -> Runner:
    """Runs a program with `pulumi.runtime.set_mocks`; returns what reached the engine."""
    return Runner()
