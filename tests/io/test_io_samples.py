"""n > 1: one output row per (input row, sample), ordered (input order, sample_index), on a real
engine (toy model, CPU); checkpoints and resume keep a row's samples together; the metrics count
every sample's tokens and each request once."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from parquet_files import write_parquet

from lmbatch import io
from lmbatch.io.engine_feed import RowResult, Sample, ShardResult

SAMPLING = {"max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3}


@pytest.fixture(scope="module")
def engine(toy_model_dir):
    from lmbatch.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=toy_model_dir, device="cpu", dtype="float32", max_model_len=128,
                                  num_kv_blocks=128,
                                  max_num_seqs=16))


def _prepared(engine, tmp_path, n_column):
    """Five rows: ids a..e, a per-row `n` column (null: the job's n) and an empty prompt at e."""
    ids = ["a", "b", "c", "d", "e"]
    prompts = ["Question 1: what is 1 plus 1?", "Hello there", "Ba ke lo", "What is 2+2?", None]
    write_parquet(tmp_path / "in" / "d.parquet", {"id": ids, "prompt": prompts, "tag": [f"t{i}" for i in range(5)],
                                                   "n": pa.array(n_column, pa.int64())})
    info = io.inspect_input(io.InputSpec(path=str(tmp_path / "in"), sampling_columns=["n"],
                                         passthrough_columns=["tag"]))
    table = io.read_shard(info.spec, io.plan_shards(info)[0])
    return io.prepare_requests(table, info.spec, engine.tokenizer, SAMPLING, engine.max_model_len)


def test_rows_with_different_n_in_one_shard_give_one_row_per_sample(engine, tmp_path):
    prepared = _prepared(engine, tmp_path, [None, 1, 2, None, None])   # n: 3, 1, 2, 3, (error row)
    progress = []
    result = io.run_shard(engine, prepared, "input", lambda *a: progress.append(a))
    table = io.build_output_table(prepared.input_columns, result.rows, "m", "run1")
    rows = table.to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [
        ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 0), ("c", 1), ("d", 0), ("d", 1), ("d", 2), ("e", 0)]
    assert [r["tag"] for r in rows if r["id"] == "c"] == ["t2", "t2"]           # passthrough per sample row
    error = rows[-1]
    assert error["finish_reason"] == "error" and error["error"] == "empty prompt" and error["completion"] is None
    for rid in "ad":   # seeded temperature-1.0 samples differ; the request's own columns repeat
        samples = [r for r in rows if r["id"] == rid]
        assert len({r["completion"] for r in samples}) == 3
        assert len({(r["prompt_tokens"], r["cached_tokens"], r["ttft_s"], r["e2e_s"]) for r in samples}) == 1
        assert all(1 <= r["completion_tokens"] <= 8 for r in samples)
    # Progress counts input rows, and output tokens of every sample.
    assert progress[-1] == (5, 5, sum(r["completion_tokens"] for r in rows))
    # The schema does not depend on n: an all-n=1 shard has the same columns and types.
    single = io.build_output_table(prepared.input_columns, [RowResult(error="x")] * 5, "m", "run1")
    assert single.schema == table.schema and single.column("sample_index").to_pylist() == [0] * 5


def test_metrics_count_every_samples_tokens_and_each_request_once(engine, tmp_path):
    prepared = _prepared(engine, tmp_path, [None, 1, 2, None, None])
    result = io.run_shard(engine, prepared, "input")
    table = io.build_output_table(prepared.input_columns, result.rows, "m", "run1")
    m = io.shard_metrics(result)
    ok = [r for r in table.to_pylist() if r["finish_reason"] != "error"]
    assert m["completion_tokens"] == sum(r["completion_tokens"] for r in ok) > 4
    assert (m["rows"], m["ok_rows"], m["error_rows"], m["output_rows"]) == (5, 4, 1, table.num_rows) == (5, 4, 1, 10)
    assert m["prompt_tokens"] == sum(len(prepared.prompt_ids[i]) for i in range(4))   # once per request
    assert sum(m["finish_reasons"].values()) == 10 and m["finish_reasons"]["error"] == 1
    assert io.rollup_metrics([m, m])["output_rows"] == 20


def test_synthetic_samples_in_metrics_and_the_output_table():
    two = RowResult(completion="x", finish_reason="stop", prompt_tokens=10, completion_tokens=3, ttft_s=0.1,
                    e2e_s=0.5, extra_samples=[Sample("y", "length", 5)])
    m = io.shard_metrics(ShardResult([two, RowResult(error="empty prompt")], "input", 1.0))
    assert (m["completion_tokens"], m["prompt_tokens"], m["output_rows"]) == (8, 10, 3)
    assert m["output_tokens_per_s"] == 8 and m["requests_per_s"] == 1
    assert m["finish_reasons"] == {"stop": 1, "length": 1, "error": 1}
    assert m["ttft_s"]["p50"] == 0.1 and m["e2e_s"]["p50"] == 0.5   # per request, not per sample
    table = io.build_output_table(pa.table({"id": [1, 2]}), [two, RowResult(error="empty prompt")], "m", "r")
    assert table.select(["id", "sample_index", "completion", "completion_tokens", "e2e_s"]).to_pylist() == [
        {"id": 1, "sample_index": 0, "completion": "x", "completion_tokens": 3, "e2e_s": 0.5},
        {"id": 1, "sample_index": 1, "completion": "y", "completion_tokens": 5, "e2e_s": 0.5},
        {"id": 2, "sample_index": 0, "completion": None, "completion_tokens": 0, "e2e_s": None}]


def test_checkpoints_keep_a_rows_samples_and_a_resume_runs_only_missing_rows(engine, tmp_path):
    prepared = _prepared(engine, tmp_path, [None, 1, 2, None, None])
    parts = io.ShardParts(str(tmp_path / "out"), "shard-key")
    checkpoint = io.Checkpointer(parts, every_rows=1, every_s=1e9)
    first = io.run_shard(engine, prepared, "input", on_row=checkpoint.add)
    checkpoint.flush()
    loaded = parts.load()
    assert sorted(loaded) == [0, 1, 2, 3]    # valid rows only; an error row is never fed
    assert all(loaded[i] == first.rows[i] for i in loaded)                  # every sample came back
    assert [len(loaded[i].samples) for i in range(4)] == [3, 1, 2, 3]
    # A retry that finished rows 0 and 2 before: only rows 1 and 3 run, with all their samples.
    resumed = io.run_shard(engine, prepared, "input", done={0: loaded[0], 2: loaded[2]})
    assert resumed.resumed_rows == 2 and resumed.rows[0] == first.rows[0] and resumed.rows[2] == first.rows[2]
    table = io.build_output_table(prepared.input_columns, resumed.rows, "m", "r")
    counts = {}
    for r in table.to_pylist():
        counts.setdefault(r["id"], []).append(r["sample_index"])
    assert counts == {"a": [0, 1, 2], "b": [0], "c": [0, 1], "d": [0, 1, 2], "e": [0]}


def test_a_part_written_before_samples_existed_still_loads(tmp_path):
    from lmbatch.io.parts import PART_SCHEMA

    parts = io.ShardParts(str(tmp_path / "out"), "k")
    old = pa.schema([f for f in PART_SCHEMA if f.name != "extra_samples"])
    record = {f.name: None for f in old} | {"_row": 0, "completion": "x", "finish_reason": "stop",
                                            "prompt_tokens": 2, "completion_tokens": 1, "cached_tokens": 0}
    (tmp_path / "out" / ".parts" / "k").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([record], schema=old), tmp_path / "out" / ".parts" / "k" / "part-1.parquet")
    (row,) = parts.load().values()
    assert row.extra_samples == [] and [s.completion for s in row.samples] == ["x"]
