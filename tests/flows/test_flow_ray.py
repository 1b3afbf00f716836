"""The Ray runner for real: a `ray start --head` cluster and a `prefect server start` on loopback,
the job's shard tasks run in Ray worker processes, report to that server and record their shards
in one SQLite run database; a second run skips every shard."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from lmbatch import io
from lmbatch.flows.config import validate_config
from lmbatch.flows.job import run_job
from lmbatch.flows.serve import free_port, start_server

pytest.importorskip("ray")
pytest.importorskip("prefect_ray")

ROWS = 36  # as in tests/flows/conftest.py


@pytest.fixture
def ray_head():
    """A one-node Ray cluster (2 CPUs, no GPU) on 127.0.0.1; yields its address, then stops it.

    Started without PREFECT_API_URL in its environment: the job itself must hand the URL to the
    workers. Its own process group, so that teardown ends exactly what it started.
    """
    port = free_port()
    # Short path: Ray's Unix sockets live under the temp dir and have a ~107-byte limit.
    temp = tempfile.mkdtemp(prefix="lmbatch-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    log = Path(temp) / "ray-start.log"
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={port}", f"--ray-client-server-port={free_port()}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           "--object-store-memory=200000000", f"--temp-dir={temp}"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed ({proc.poll()}): {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of our own group, if any
        except ProcessLookupError:
            pass
        proc.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def prefect_server(tmp_path, monkeypatch):
    """A real Prefect server, set as this process's API (over the session harness, if active)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = start_server(tmp_path / "prefect-home")
    try:
        monkeypatch.setenv("PREFECT_API_URL", server.url)
        with temporary_settings({PREFECT_API_URL: server.url}):
            yield server
            _drain_prefect_workers()
    finally:
        server.stop()


def _drain_prefect_workers() -> None:
    """Send this process's queued logs and events before the server goes (as Prefect's own test
    harness does): left queued, they are retried against a closed port at exit for a minute."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain():
        for drain_one in (lambda: APILogWorker.instance().drain(), EventsWorker.drain_all):
            result = drain_one()
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())


@pytest.mark.slow
def test_ray_runner_runs_shards_in_ray_workers_and_resumes(job_config, tmp_path, ray_head, prefect_server):
    db_url = f"sqlite:///{tmp_path / 'runs.db'}"  # one file every worker on this machine reaches
    cfg = validate_config(job_config(
        runner={"kind": "ray", "ray": {"address": ray_head, "num_gpus_per_task": 0}},
        db={"url": db_url}))

    first = run_job(cfg, run_name="ray")
    assert first["message"] is None, first
    out = Path(first["output_dir"])
    # One output row per input row.
    ids = duckdb.sql(f"select id, count(*) c from '{out}/*.parquet' group by id").fetchall()
    inputs = pq.read_table(cfg.input.path).column("id").to_pylist()
    assert sorted(i for i, _ in ids) == sorted(inputs) and {c for _, c in ids} == {1}
    # The shards ran in Ray worker processes, not in this one.
    pids = {m["pid"] for m in first["shards"]}
    assert len(first["shards"]) == 3 and os.getpid() not in pids, first["shards"]
    # Done in the run database.
    db = io.RunDB(db_url)
    try:
        job_key = db.get_run(first["run_id"])["job_key"]
        shards = db.shards(job_key)
    finally:
        db.close()
    assert [s["status"] for s in shards] == ["done"] * 3 and sum(s["num_rows"] for s in shards) == ROWS
    # The workers reported their task runs to the real server (not to temporary servers of their own).
    from prefect.client.orchestration import get_client

    def shard_runs():
        with get_client(sync_client=True) as client:
            return [r for r in client.read_task_runs() if r.name.startswith("shard-")]

    def all_completed(runs) -> bool:
        return len(runs) == 3 and all(r.state and r.state.is_completed() for r in runs)

    deadline = time.monotonic() + 20  # task run states reach the server as events: a little later
    while not all_completed(runs := shard_runs()):
        assert time.monotonic() < deadline, [(r.name, r.state) for r in runs]
        time.sleep(0.5)
    assert sorted(r.name for r in runs) == ["shard-0", "shard-1", "shard-2"]

    second = run_job(cfg, run_name="ray")
    assert second["message"] is None and second["shards"] == [] and sorted(second["skipped"]) == [0, 1, 2]


@pytest.mark.slow
def test_local_ray_without_address_uses_the_temporary_server_and_sqlite(job_config, write_config, tmp_path):
    """`runner.kind: ray` and nothing else: `lmbatch run` starts a Ray of this machine (2 CPU workers
    here, one per GPU on a GPU box), its temporary Prefect server and the SQLite file beside the outputs
    serve every worker; a rerun skips every shard."""
    cfg = job_config(runner={"kind": "ray", "ray": {"num_gpus_per_task": 0, "init_kwargs": {"num_cpus": 2}}})
    path = write_config(cfg)
    home_token = Path.home() / ".ray" / "auth_token"   # a new local Ray writes one unless given its own
    had_token = home_token.exists()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cmd = [sys.executable, "-m", "lmbatch.flows.cli", "run", str(path), "--quiet"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    out = Path(cfg["output"]["path"])
    ids = duckdb.sql(f"select id, count(*) c from '{out}/*/*.parquet' group by id").fetchall()
    assert sorted(i for i, _ in ids) == sorted(pq.read_table(cfg["input"]["path"]).column("id").to_pylist())
    assert {c for _, c in ids} == {1}
    db = io.RunDB(io.resolve_db_url(None, str(out)))
    try:
        (job_key,) = {r["job_key"] for r in db.recent_runs()}
        shards = db.shards(job_key)
    finally:
        db.close()
    assert [s["status"] for s in shards] == ["done"] * 3
    pids = {s["holder_pid"] for s in shards}
    assert len(pids) >= 2, shards           # two Ray workers ran shards side by side
    assert home_token.exists() == had_token  # the run's token stayed in its environment
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    db = io.RunDB(io.resolve_db_url(None, str(out)))
    try:
        assert [s["status"] for s in db.shards(job_key)] == ["done"] * 3
        assert len(db.recent_runs()) == 2
    finally:
        db.close()
