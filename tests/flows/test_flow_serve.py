"""`lmbatch serve` against a real `prefect server start` on loopback: the deployment carries the
cron schedule, the server's scheduler creates runs for it, and a run triggered from the deployment
is executed by the serving process through the deployment's entrypoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from lmbatch.flows.serve import start_server

CRON = "0 2 * * *"  # far from now on most days: scheduled runs are created, none comes due


def _wait_for(fn, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = fn()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"lmbatch serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}; serve log: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_serve_creates_a_cron_deployment_that_the_server_schedules_and_runs(job_config, write_config, tmp_path):
    # The scheduler looks at recently changed deployments every few seconds; make it 1 s.
    server = start_server(tmp_path / "prefect-home", extra_env={
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1"})
    serve = None
    try:
        path = write_config(job_config())
        env = {**os.environ, "PREFECT_API_URL": server.url, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        log = tmp_path / "serve.log"
        with open(log, "wb") as f:
            serve = subprocess.Popen(
                [str(Path(sys.executable).with_name("lmbatch")), "serve", str(path), "--cron", CRON,
                 "--name", "nightly"], env=env, stdout=f, stderr=subprocess.STDOUT)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # The client talks to the real server, even inside the session's test harness.
        with temporary_settings({PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
            def deployment():
                try:
                    return client.read_deployment_by_name("lmbatch-batch-inference/nightly")
                except Exception:  # noqa: BLE001 - not created yet
                    return None

            dep = _wait_for(deployment, 120, "the deployment", serve, log)
            assert [s.schedule.cron for s in dep.schedules] == [CRON]
            assert all(s.active for s in dep.schedules)
            assert dep.parameters["config"]["model"]["id"] == job_config()["model"]["id"]

            def scheduled():
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                return [r for r in runs if r.state and r.state.is_scheduled()]

            runs = _wait_for(scheduled, 90, "scheduled runs", serve, log)
            tz = ZoneInfo(dep.schedules[0].schedule.timezone or "UTC")
            times = sorted(r.expected_start_time.astimezone(tz) for r in runs)
            assert all(t.hour == 2 and t.minute == 0 for t in times), times

            # A run triggered now is picked up by the serving process and runs the real job
            # through the deployment's entrypoint (what 2 AM would do).
            run = client.create_flow_run_from_deployment(dep.id)

            def finished():
                state = client.read_flow_run(run.id).state
                return state if state and state.is_final() else None

            state = _wait_for(finished, 240, "the triggered run", serve, log)
            assert state.is_completed(), (state, log.read_text()[-3000:])
    finally:
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait(10)
        server.stop()
    assert server.process.poll() is not None
    out = tmp_path / "out"
    assert len(list(out.glob("*/part-*.parquet"))) == 3 and list(out.glob("*/metrics.json"))
