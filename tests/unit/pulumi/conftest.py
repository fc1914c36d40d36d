"""Fixtures of the Pulumi provider's unit tests: programs run against Pulumi's mocks."""

from __future__ import annotations

import pytest
from pulumi_mocks import Runner


@pytest.fixture
def pulumi_run() -> Runner:
    """Runs a program with `pulumi.runtime.set_mocks`; returns what reached the engine."""
    return Runner()
