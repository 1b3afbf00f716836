"""Shared test environment: offline, quiet Prefect, and one Prefect test server per session."""

import os

import pytest

from lmbatch.openmp import set_default_wait_policy

# Before any Prefect import: offline runs must not log telemetry errors or try the hub.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
set_default_wait_policy()  # before torch loads libgomp, as the CLI does


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server (SQLite) for the whole session: about 10 s once, not per test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
