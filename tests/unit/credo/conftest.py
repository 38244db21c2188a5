"""Fixtures for the credo unit tests (real crypto, no mocks)."""

from __future__ import annotations

import pytest
from credo_testkit import Ca, make_ca

from credo import SpiffeId


@pytest.fixture(scope="session")
def ca() -> Ca:
    """The example.org CA."""
    return make_ca()


@pytest.fixture(scope="session")
def workload_id() -> SpiffeId:
    """The SPIFFE ID most tests issue."""
    return SpiffeId.parse("spiffe://example.org/ns/default/sa/agent")
