"""Real flow runs on a toy model under the session's Prefect test server: outputs, resume,
retries and failure, artifacts, and the CLI around them."""

import json
import os
from datetime import UTC
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
)

from lmbatch.flows import engine_cache
from lmbatch.flows.cli import main
from lmbatch.flows.config import validate_config
from lmbatch.flows.job import ShardsFailed, batch_inference, run_job

ROWS = 36  # as in tests/flows/conftest.py

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _outputs(out_dir: Path) -> dict[str, int]:
    return {p.name: pq.ParquetFile(p).metadata.num_rows for p in sorted(out_dir.glob("*.parquet"))}


def _artifact(key: str):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


def test_cli_run_end_to_end_then_status_and_report(job_config, write_config, tmp_path, capsys):
    path = write_config(job_config())
    loads = engine_cache.load_count()
    assert main(["run", str(path), "--run-name", "e2e", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "output tokens/s" in printed and "prefix cache hit rate" in printed
    out = tmp_path / "out" / "e2e"
    assert _outputs(out) == {f"part-0000{i}.parquet": 12 for i in range(3)}
    # One output row per input row, joinable by id, readable as one dataset.
    ids = duckdb.sql(f"select id, count(*) c from '{out}/*.parquet' group by id").fetchall()
    inputs = pq.read_table(job_config()["input"]["path"]).column("id").to_pylist()
    assert sorted(i for i, _ in ids) == sorted(inputs) and {c for _, c in ids} == {1}
    cols = duckdb.sql(f"describe select * from '{out}/*.parquet'").fetchall()
    assert {"id", "category", "completion", "finish_reason", "ttft_s", "run_id"} <= {c[0] for c in cols}
    # The engine was built at most once for the three shards (zero if an earlier test built it).
    assert engine_cache.load_count() - loads <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == ROWS and metrics["shards_run"] == 3 and metrics["completion_tokens"] > 0
    assert metrics["output_tokens_per_s"] > 0 and metrics["ttft_s"]["p50"] > 0
    # Artifacts: progress at 100 % and the metrics table.
    assert _artifact("lmbatch-progress-e2e").data == 100.0
    table = _artifact("lmbatch-metrics-e2e").data
    assert '"rows"' in table and str(ROWS) in table
    # status and report read the run database (SQLite beside the outputs).
    db = ["--db", f"sqlite:///{tmp_path / 'out' / 'lmbatch.db'}"]
    assert main(["status", *db]) == 0 and "e2e" in capsys.readouterr().out
    assert main(["status", "e2e", *db]) == 0
    status = capsys.readouterr().out
    assert status.count(" done ") == 3, status
    assert main(["report", "e2e", *db]) == 0
    report = capsys.readouterr().out
    assert "TTFT p50" in report
    for name in ("report-latency.png", "report-throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", "nope", *db]) == 2


def test_second_run_skips_all_then_redoes_exactly_a_deleted_shard(job_config):
    cfg = validate_config(job_config())
    first = run_job(cfg, run_name="resume")
    out = Path(first["output_dir"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert len(mtimes) == 3

    second = run_job(cfg, run_name="resume")
    assert second["shards"] == [] and sorted(second["skipped"]) == [0, 1, 2]
    assert second["metrics"]["rows"] == ROWS  # roll-up covers the resumed shards
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == mtimes

    (out / "part-00001.parquet").unlink()
    third = run_job(cfg, run_name="resume")
    assert [m["shard"] for m in third["shards"]] == [1] and sorted(third["skipped"]) == [0, 2]
    assert _outputs(out) == {f"part-0000{i}.parquet": 12 for i in range(3)}
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert after["part-00000.parquet"] == mtimes["part-00000.parquet"]
    assert after["part-00002.parquet"] == mtimes["part-00002.parquet"]
    assert after["part-00001.parquet"] != mtimes["part-00001.parquet"]

    # Another run name is another job: its own folder, every shard run there.
    other = run_job(cfg, run_name="resume-copy")
    assert len(other["shards"]) == 3 and other["skipped"] == []
    assert len(_outputs(Path(other["output_dir"]))) == 3


def _shard_task_runs(flow_run_id, name: str):
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))


def test_failing_shard_is_retried_then_fails_the_flow_after_the_others(job_config):
    cfg = job_config(runner={"retries": 1}, testing={"fail_shards": [1]})
    state = batch_inference(cfg, "fails", False, return_state=True)
    assert state.is_failed()
    assert "shard 1 failed after 2 attempt(s)" in state.message
    (task_run,) = _shard_task_runs(state.state_details.flow_run_id, "shard-1")
    assert task_run.run_count == 2 and task_run.state.is_failed()  # first try + one retry
    out = Path(cfg["output"]["path"]) / "fails"
    assert _outputs(out) == {"part-00000.parquet": 12, "part-00002.parquet": 12}
    with pytest.raises(ShardsFailed) as e:
        batch_inference(cfg, "fails", False)
    assert e.value.result["skipped"] == [0, 2]  # the done shards stay done
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["shards_failed"] == 1 and metrics["rows"] == 24

    # Without the injected failure the next run does the missing shard only.
    healed = run_job(validate_config(job_config()), run_name="fails")
    assert [m["shard"] for m in healed["shards"]] == [1] and healed["message"] is None
    assert len(_outputs(out)) == 3


def test_transient_failure_recovers_on_retry(job_config):
    cfg = job_config(runner={"retries": 2}, testing={"fail_shards": [0], "fail_attempts": 1})
    state = batch_inference(cfg, "transient", False, return_state=True)
    assert state.is_completed()
    (task_run,) = _shard_task_runs(state.state_details.flow_run_id, "shard-0")
    assert task_run.run_count == 2
    assert len(_outputs(Path(cfg["output"]["path"]) / "transient")) == 3


@pytest.mark.parametrize("override, expected", [
    ("colour=red", "colour: unknown key"),
    ("engine.max_num_seq=4", "engine.max_num_seq: unknown key"),
    ("input.columns.prompt=text", "input: "),  # a column the file does not have
    ("sampling.temperature=-1", "sampling.temperature"),
    ("engine.block_size=12", "block_size must be a positive power of two"),
    ("model.id=./no/such/model", "model.id: './no/such/model' is not a directory"),
    ("input.path=/no/such/data.parquet", "input: "),
])
def test_config_errors_fail_before_compute_with_one_line(job_config, write_config, tmp_path, capsys,
                                                         override, expected):
    path = write_config(job_config())
    loads = engine_cache.load_count()
    assert main(["run", str(path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmbatch: config error: ") and expected in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing written, no database created
    assert engine_cache.load_count() == loads


def test_plan_shows_shards_without_compute(job_config, write_config, capsys):
    path = write_config(job_config())
    loads = engine_cache.load_count()
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{ROWS} rows" in out and out.count(" new") == 3
    assert engine_cache.load_count() == loads
    assert os.path.exists(job_config()["input"]["path"])


def test_shard_of_a_live_run_is_left_alone_and_a_dead_runs_claim_is_taken_over(job_config):
    """A run killed mid-shard (SIGKILL, OOM) leaves its claim behind: while fresh, the shard is
    another run's; once its heartbeat is older than STALE_S, the next run takes it over."""
    from datetime import datetime, timedelta

    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from lmbatch import io
    from lmbatch.flows import shard as shard_mod
    from lmbatch.flows.job import job_identity
    from lmbatch.flows.preflight import input_spec
    from lmbatch.io.rundb_schema import Shard

    cfg = validate_config(job_config())
    info = io.inspect_input(input_spec(cfg))
    plans = io.plan_shards(info, target_rows=cfg.shards.target_rows)
    key, _, _ = job_identity(cfg, info.fingerprint, "crash")
    db = io.RunDB(cfg.db.url, cfg.output.path)
    dead = db.start_run(key, run_name="crash")
    db.resume(key, plans)
    assert db.claim_shard(dead, key, plans[2].key)  # the "killed" run was in shard 2

    held = run_job(cfg, run_name="crash")
    assert [f["shard"] for f in held["failed_shards"]] == [2] and held["failed_shards"][0]["held"]
    assert f"shard 2 ({plans[2].key}): held by run {dead} (pid {os.getpid()} on " in held["message"]
    assert "which is alive: it is that run's to finish" in held["message"]
    assert sorted(m["shard"] for m in held["shards"]) == [0, 1]

    with Session(db.engine) as s, s.begin():  # the dead run's last heartbeat, long ago
        s.execute(update(Shard).where(Shard.job_key == key, Shard.shard_key == plans[2].key)
                  .values(claimed_at=datetime.now(UTC).replace(tzinfo=None)
                          - timedelta(seconds=shard_mod.STALE_S + 1)))
    db.close()
    taken = run_job(cfg, run_name="crash")
    assert [m["shard"] for m in taken["shards"]] == [2] and taken["message"] is None
    assert len(_outputs(Path(taken["output_dir"]))) == 3


def test_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(job_config, capsys):
    """kill -9 / the OOM killer leave a fresh claim; its holder's pid is gone, so no stale wait."""
    import subprocess
    import sys

    from lmbatch import io
    from lmbatch.flows.job import job_identity
    from lmbatch.flows.preflight import input_spec
    from lmbatch.io.holder import Holder, process_start

    cfg = validate_config(job_config())
    info = io.inspect_input(input_spec(cfg))
    plans = io.plan_shards(info, target_rows=cfg.shards.target_rows)
    key, _, _ = job_identity(cfg, info.fingerprint, "killed")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    me = Holder.current()
    with io.RunDB(cfg.db.url, cfg.output.path) as db:
        killed = db.start_run(key, run_name="killed")
        db.resume(key, plans)
        assert db.claim_shard(killed, key, plans[1].key, holder=Holder(me.host, child.pid,
                                                                         process_start(child.pid)))
        live = run_job(cfg, run_name="killed")          # the holder is alive: left alone
        assert [f["shard"] for f in live["failed_shards"]] == [1]
        child.kill()
        child.wait()
        after = run_job(cfg, run_name="killed")         # immediately after its death: taken over
        assert [m["shard"] for m in after["shards"]] == [1] and after["message"] is None
        claim = db.claim_holder(key, plans[1].key)
        assert claim["status"] == "done" and claim["holder_pid"] == os.getpid()
        # A claim of a host that is gone for good: freed by hand.
        gone = db.start_run(key, run_name="killed")
        db._reset(key, plans[0].key)
        assert db.claim_shard(gone, key, plans[0].key, holder=Holder("gone-host", 4242, "7"))
        url = str(db.url)
    assert main(["status", "killed", "--db", url, "--release"]) == 0
    assert f"released shard 0 (run {gone}, pid 4242 on gone-host)" in capsys.readouterr().out
    with io.RunDB(url) as db:
        assert db.claim_holder(key, plans[0].key)["status"] == "pending"


@pytest.mark.postgres
def test_flow_on_a_postgresql_run_database(job_config, pg_url, capsys):
    cfg = validate_config(job_config(db={"url": pg_url}))
    first = run_job(cfg, run_name="pg")
    assert len(first["shards"]) == 3 and first["metrics"]["rows"] == ROWS
    again = run_job(cfg, run_name="pg")
    assert again["shards"] == [] and sorted(again["skipped"]) == [0, 1, 2]
    assert main(["status", first["run_id"], "--db", pg_url]) == 0
    assert capsys.readouterr().out.count(" done ") == 3
