"""The run database on SQLite and a real PostgreSQL: resume, exclusive shard claims, no secrets."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import pytest

from lmbatch import io
from lmbatch.io import rundb


@dataclass(frozen=True)
class Plan:  # the fields of a ShardPlan the database reads
    index: int
    key: str
    row_start: int
    row_end: int


PLANS = [Plan(i, f"shard{i}", 10 * i, 10 * i + 10) for i in range(4)]


def test_job_key_is_canonical():
    a = io.job_key({"model": "m", "sampling": {"temperature": 0, "max_tokens": 8}}, "fp1")
    b = io.job_key({"sampling": {"max_tokens": 8, "temperature": 0}, "model": "m"}, "fp1")
    assert a == b and a != io.job_key({"model": "m"}, "fp1") and a != io.job_key({"model": "m"}, "fp2")


def test_resume_skips_done_shards_and_redoes_one_whose_file_is_gone(db_url, unique_key, tmp_path):
    db = io.RunDB(db_url)
    run1 = db.start_run(unique_key, run_name="nightly", model="m", fingerprint="fp", config={"a": 1})
    to_run, done = db.resume(unique_key, PLANS)
    assert to_run == PLANS and done == []
    paths = {}
    for p in PLANS[:3]:  # run 1 finishes three shards, then crashes
        assert db.claim_shard(run1, unique_key, p.key)
        paths[p.key] = str(tmp_path / f"part-{p.index:05d}.parquet")
        io.write_shard(pa.table({"id": list(range(10))}), paths[p.key])
        assert db.complete_shard(run1, unique_key, p.key, output_path=paths[p.key], num_rows=10,
                                 metrics={"rows": 10})
    (tmp_path / "part-00001.parquet").unlink()  # a lost output file
    run2 = io.RunDB(db_url).start_run(unique_key)
    to_run, done = db.resume(unique_key, PLANS)
    assert [p.key for p in done] == ["shard0", "shard2"]
    assert [p.key for p in to_run] == ["shard1", "shard3"]
    assert db.claim_shard(run2, unique_key, "shard1") and not db.claim_shard(run2, unique_key, "shard0")
    rows = {r["shard_key"]: r for r in db.shards(unique_key)}
    assert rows["shard1"]["status"] == "running" and rows["shard1"]["run_id"] == run2
    assert len(db.done_metrics(unique_key)) == 2
    db.finish_run(run2, "done", metrics={"rows": 30})
    assert db.get_run(run2)["metrics"] == {"rows": 30} and db.get_run(run2)["status"] == "done"


def test_a_wrong_row_count_is_not_done(db_url, unique_key, tmp_path):
    db = io.RunDB(db_url)
    run = db.start_run(unique_key)
    db.register_shards(unique_key, PLANS[:1])
    path = str(tmp_path / "part.parquet")
    io.write_shard(pa.table({"id": [1, 2]}), path)
    assert db.claim_shard(run, unique_key, "shard0")
    db.complete_shard(run, unique_key, "shard0", output_path=path, num_rows=10)
    to_run, done = db.resume(unique_key, PLANS[:1])
    assert done == [] and to_run == PLANS[:1]


def test_claims_are_exclusive_until_released_or_stale(db_url, unique_key):
    db = io.RunDB(db_url)
    a, b = db.start_run(unique_key), db.start_run(unique_key)
    db.register_shards(unique_key, PLANS)
    db.register_shards(unique_key, PLANS)  # a second run registering the same plan is harmless
    assert len(db.shards(unique_key)) == 4
    assert db.claim_shard(a, unique_key, "shard0")
    assert not db.claim_shard(b, unique_key, "shard0")
    assert not db.complete_shard(b, unique_key, "shard0", output_path="x", num_rows=1)  # not its claim
    time.sleep(1.1)
    db.heartbeat(a)
    assert not db.claim_shard(b, unique_key, "shard0", stale_after_s=1.0)  # refreshed: still a's
    time.sleep(1.1)
    assert db.claim_shard(b, unique_key, "shard0", stale_after_s=1.0)  # a went silent: taken over
    assert db.claim_shard(a, unique_key, "shard1")
    db.fail_shard(a, unique_key, "shard1", "engine died")
    assert db.claim_shard(b, unique_key, "shard1")  # failed shards are retried
    assert db.claim_shard(a, unique_key, "shard2")
    db.finish_run(a, "failed", error="boom")  # a failed run releases its claims at once
    assert db.claim_shard(b, unique_key, "shard2")


def test_claims_of_dead_local_processes_are_taken_at_once_others_are_not(db_url, unique_key):
    import subprocess
    import sys

    from lmbatch.io.holder import Holder, process_start

    db = io.RunDB(db_url)
    a, b = db.start_run(unique_key), db.start_run(unique_key)
    db.register_shards(unique_key, PLANS)
    me = Holder.current()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    alive = Holder(me.host, child.pid, process_start(child.pid))
    assert db.claim_shard(a, unique_key, "shard0", holder=alive)
    assert db.claim_shard(a, unique_key, "shard1", holder=Holder(me.host, child.pid, "1"))  # pid reused since
    assert db.claim_shard(a, unique_key, "shard2", holder=Holder("other-host", child.pid, "1"))
    assert not db.claim_shard(b, unique_key, "shard0")          # its holder lives
    assert db.claim_shard(b, unique_key, "shard1")              # same pid, another process: dead claim
    assert not db.claim_shard(b, unique_key, "shard2")          # another host's: only when stale
    child.kill()
    assert not Holder.current().is_dead_here()
    child.wait()
    assert db.claim_shard(b, unique_key, "shard0")              # its holder died: taken over, no wait
    claim = db.claim_holder(unique_key, "shard0")
    assert (claim["run_id"], claim["holder_pid"], claim["holder_start"]) == (b, me.pid, me.start)
    assert "becomes claimable at" in io.describe_claim(db.claim_holder(unique_key, "shard2"), 180)
    released = db.release_claims(unique_key)   # every running claim of the job: b's two, a's on the other host
    assert [r["shard"] for r in released] == [0, 1, 2]
    assert released[2] == {"shard": 2, "run_id": a, "host": "other-host", "pid": child.pid}
    assert db.claim_shard(b, unique_key, "shard2")
    db.close()


def _claim_all(url, key, run_id, barrier, results):
    db = io.RunDB(url)
    barrier.wait()
    won = [p.key for p in PLANS * 3 if db.claim_shard(run_id, key, p.key)]
    results.put((run_id, won))
    db.close()


def test_concurrent_runs_never_claim_the_same_shard(db_url, unique_key):
    """Three processes of the same job race for every shard (each tries each shard three times):
    each shard is won exactly once."""
    db = io.RunDB(db_url)
    db.register_shards(unique_key, PLANS)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(db_url, unique_key, f"run{i}", barrier, results))
             for i in range(3)]
    for p in procs:
        p.start()
    won = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    claimed = sorted(k for keys in won.values() for k in keys)
    assert claimed == sorted(p.key for p in PLANS)
    owners = {r["shard_key"]: r["run_id"] for r in db.shards(unique_key)}
    assert all(key in won[owners[key]] for key in owners)


def test_concurrent_threads_claim_each_shard_once(db_url, unique_key):
    db = io.RunDB(db_url)
    db.register_shards(unique_key, PLANS)
    wins: list[tuple[str, str]] = []
    barrier = threading.Barrier(8)

    def claimer(i):
        barrier.wait()
        wins.extend((f"t{i}", p.key) for p in PLANS if db.claim_shard(f"t{i}", unique_key, p.key))

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k for _, k in wins) == sorted(p.key for p in PLANS)


def test_urls_and_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv(rundb.DB_URL_ENV, raising=False)
    assert io.resolve_db_url(output_dir=str(tmp_path)) == f"sqlite:///{tmp_path}/lmbatch.db"
    monkeypatch.setenv(rundb.DB_URL_ENV, f"sqlite:///{tmp_path}/env.db")
    db = io.RunDB(output_dir=str(tmp_path))
    assert str(db.url).endswith("env.db")
    secret = rundb.RunDB.__new__(rundb.RunDB)
    from sqlalchemy.engine import make_url
    secret.url = make_url("postgresql+psycopg://user:s3cret@db.example/x")
    assert "s3cret" not in repr(secret) and "user" in repr(secret)
    monkeypatch.delenv(rundb.DB_URL_ENV)
    with pytest.raises(ValueError, match="no database URL"):
        io.resolve_db_url()


def test_resume_reads_output_files_with_the_outputs_storage_options(tmp_path):
    # Outputs on a store that needs options (credentials, endpoints): resume must open the shard
    # files as they were written. fsspec's dir:// filesystem fails without its `path` option.
    db = io.RunDB(f"sqlite:///{tmp_path / 'runs.db'}")
    opts = {"path": str(tmp_path), "target_protocol": "file"}
    run = db.start_run("k", run_name="r")
    db.resume("k", PLANS[:1])
    assert db.claim_shard(run, "k", "shard0")
    io.write_shard(pa.table({"id": list(range(10))}), "dir://part-00000.parquet", opts)
    assert db.complete_shard(run, "k", "shard0", output_path="dir://part-00000.parquet", num_rows=10)
    to_run, done = db.resume("k", PLANS[:1], opts)
    assert [p.key for p in done] == ["shard0"] and to_run == []


def test_a_database_from_before_claim_holders_gets_their_columns(tmp_path):
    from sqlalchemy import inspect, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = io.RunDB(url)
    with db.engine.begin() as conn:   # the shard table as the first release created it
        for column in ("holder_host", "holder_pid", "holder_start"):
            conn.execute(text(f"ALTER TABLE lmbatch_shards DROP COLUMN {column}"))
    db.close()
    db = io.RunDB(url)
    columns = {c["name"] for c in inspect(db.engine).get_columns("lmbatch_shards")}
    assert {"holder_host", "holder_pid", "holder_start"} <= columns
    run = db.start_run("k")
    db.register_shards("k", PLANS[:1])
    assert db.claim_shard(run, "k", "shard0")
    db.close()
