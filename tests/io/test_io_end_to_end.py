"""The whole io path on a real engine (toy model, CPU): Parquet in, shards, outputs, metrics, resume."""

from __future__ import annotations

import json

import duckdb
import pytest
from parquet_files import write_parquet

from lmbatch import io

SAMPLING = {"max_tokens": 3, "temperature": 0.0}


@pytest.fixture(scope="module")
def engine(toy_model_dir):
    from lmbatch.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=toy_model_dir, device="cpu", dtype="float32", max_model_len=128,
                                  num_kv_blocks=64,
                                  max_num_seqs=8))


def _run_job(engine, spec, out_dir, db_url, policy="prefix_longest_first"):
    """What the flow does per job, through the public io API only; returns (run_id, shards run)."""
    info = io.inspect_input(spec)
    shards = io.plan_shards(info, target_rows=7)
    db = io.RunDB(db_url)
    key = io.job_key({"model": engine.model_name, "sampling": SAMPLING, "policy": policy}, info.fingerprint)
    run_id = db.start_run(key, run_name="t", model=engine.model_name, fingerprint=info.fingerprint)
    to_run, _ = db.resume(key, shards)
    for shard in to_run:
        assert db.claim_shard(run_id, key, shard.key)
        prepared = io.prepare_requests(io.read_shard(info.spec, shard), info.spec, engine.tokenizer,
                                       SAMPLING, engine.max_model_len)
        progress = []
        result = io.run_shard(engine, prepared, policy,
                              progress_callback=lambda *args, p=progress: p.append(args))
        # rows done, rows total, output tokens so far: the last call counts every row and token
        assert progress[-1] == (shard.num_rows, shard.num_rows, sum(r.completion_tokens for r in result.rows))
        assert progress[-1][2] > 0 and [c[2] for c in progress] == sorted(c[2] for c in progress)
        table = io.build_output_table(prepared.input_columns, result.rows, engine.model_name, run_id,
                                      prepared.with_logprobs)
        path = str(out_dir / shard.filename)
        io.write_shard(table, path)
        metrics = io.shard_metrics(result, device="cpu", price_per_device_hour=2.0)
        io.write_metrics_json(metrics, str(out_dir / f"metrics-{shard.index:05d}.json"))
        assert db.complete_shard(run_id, key, shard.key, output_path=path, num_rows=table.num_rows,
                                 error_rows=result.num_errors, metrics=metrics)
    run_metrics = io.rollup_metrics(db.done_metrics(key), device="cpu", price_per_device_hour=2.0)
    io.write_metrics_json(run_metrics, str(out_dir / "metrics.json"))
    db.finish_run(run_id, "done", run_metrics)
    return run_id, to_run


def test_parquet_to_outputs_with_error_rows_metrics_and_resume(engine, tmp_path):
    n = 20
    prompts = [f"Shared system preamble for every request in this job. Question {i}?" for i in range(n)]
    prompts[3], prompts[11] = None, "ba " * 200  # an empty row and a row too long for the model
    write_parquet(tmp_path / "in" / "data.parquet",
                  {"id": [f"q{i}" for i in range(n)], "prompt": prompts, "lang": ["en"] * n},
                  row_group_size=6)
    spec = io.InputSpec(path=str(tmp_path / "in"), passthrough_columns=["lang"])
    out, db_url = tmp_path / "out" / "t", f"sqlite:///{tmp_path / 'runs.db'}"
    run_id, ran = _run_job(engine, spec, out, db_url)
    assert len(ran) == 3

    glob = f"'{out}/*.parquet'"
    assert duckdb.sql(f"select count(*), count(distinct id) from {glob}").fetchall() == [(n, n)]
    errors = dict(duckdb.sql(f"select id, error from {glob} where finish_reason = 'error'").fetchall())
    assert errors.keys() == {"q3", "q11"} and errors["q3"] == "empty prompt"
    assert errors["q11"].startswith("prompt too long")
    ok = duckdb.sql(f"select completion, completion_tokens, ttft_s, e2e_s, lang, model, run_id "
                    f"from {glob} where error is null").fetchall()
    assert len(ok) == n - 2
    assert all(r[1] == 3 and 0 < r[2] <= r[3] and r[4] == "en" and r[6] == run_id for r in ok)
    # Input order within a shard, whatever order the engine ran it in.
    first = duckdb.sql(f"select id from '{out}/part-00000.parquet'").fetchall()
    assert [r[0] for r in first] == [f"q{i}" for i in range(7)]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == n and metrics["error_rows"] == 2 and metrics["num_shards"] == 3
    assert metrics["completion_tokens"] == 3 * (n - 2) and metrics["output_tokens_per_s"] > 0
    assert metrics["cached_tokens"] > 0 and 0 < metrics["prefix_cache_hit_rate"] < 1  # shared preamble
    assert metrics["ttft_s"]["p50"] <= metrics["e2e_s"]["p99"] * 1.03
    assert metrics["cost_per_1k_requests"] > 0

    # A second run of the same job finds everything done; losing a file redoes only that shard.
    assert _run_job(engine, spec, out, db_url)[1] == []
    (out / "part-00001.parquet").unlink()
    _, redone = _run_job(engine, spec, out, db_url)
    assert [s.index for s in redone] == [1]
    assert duckdb.sql(f"select count(*), count(distinct id) from {glob}").fetchall() == [(n, n)]


def test_greedy_outputs_do_not_depend_on_the_ordering_policy(engine, tmp_path):
    prompts = [("Ka be " * (1 + i % 4)) + f"item {i}" for i in range(8)]
    write_parquet(tmp_path / "in" / "d.parquet", {"id": list(range(8)), "prompt": prompts})
    info = io.inspect_input(io.InputSpec(path=str(tmp_path / "in")))
    table = io.read_shard(info.spec, io.plan_shards(info)[0])
    prepared = io.prepare_requests(table, info.spec, engine.tokenizer, SAMPLING, engine.max_model_len)
    texts = {policy: [r.completion for r in io.run_shard(engine, prepared, policy).rows]
             for policy in ("input", "length_desc", "prefix_longest_first")}
    assert texts["input"] == texts["length_desc"] == texts["prefix_longest_first"]
    assert all(t is not None for t in texts["input"])


def test_logprobs_column_when_asked(engine, tmp_path):
    write_parquet(tmp_path / "in" / "d.parquet", {"id": [1, 2], "prompt": ["Hello", "World"]})
    info = io.inspect_input(io.InputSpec(path=str(tmp_path / "in")))
    prepared = io.prepare_requests(io.read_shard(info.spec, io.plan_shards(info)[0]), info.spec,
                                   engine.tokenizer, {**SAMPLING, "logprobs": 2}, engine.max_model_len)
    result = io.run_shard(engine, prepared, "input")
    table = io.build_output_table(prepared.input_columns, result.rows, "m", "r", prepared.with_logprobs)
    lp = table.column("logprobs").to_pylist()[0]
    assert len(lp) == 3 and all(e["logprob"] is not None and e["logprob"] <= 0 for e in lp)
    assert all(e["top"][0]["logprob"] >= e["logprob"] for e in lp)  # top alternatives sorted, best first
