"""Shared test environment: offline, quiet Prefect, and one Prefect test server per session."""

import os

import pytest

from lmbatch.openmp import set_default_wait_policy
from lmbatch.quiet import set_quiet_defaults

# Before any Prefect import: offline runs must not log telemetry errors or try the hub.
set_quiet_defaults()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
set_default_wait_policy()  # before torch loads libgomp, as the CLI does
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before triton loads (nvidia-smi stands in for torch.cuda, which would load torch here).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server (SQLite) for the whole session: about 10 s once, not per test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


# The default of .ci/start-postgres.sh: tried when LMBATCH_TEST_PG_URL is unset.
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:55432/lmbatch_test"


@pytest.fixture(scope="session")
def pg_url():
    """A real PostgreSQL server. Set by .ci/run; skipped only when unset and none is reachable."""
    url = os.environ.get("LMBATCH_TEST_PG_URL")
    if url:
        return url  # configured: a failure to connect must fail the tests, not skip them
    if _pg_reachable(DEFAULT_PG_URL):
        return DEFAULT_PG_URL
    pytest.skip("no PostgreSQL: LMBATCH_TEST_PG_URL unset and none on 127.0.0.1:55432 "
                "(run .ci/start-postgres.sh)")


def _pg_reachable(url: str) -> bool:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as c:
            c.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False


# Under CI (CI=true) a test may skip only for what CI cannot have: a GPU. Everything else .ci/run
# installs or starts (PostgreSQL, Ray, triton, ...), so a skip for it there is a failure.
CI_SKIP_ALLOWED = ("CUDA", "GPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped:
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if not any(word in reason for word in CI_SKIP_ALLOWED):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where only GPU tests may skip: {reason}"
