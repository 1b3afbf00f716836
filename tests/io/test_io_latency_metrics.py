"""TTFT, ITL, E2E and queue time from known timestamps, as docs/design.md defines them:

    queue time: shard start -> first scheduled. TTFT: shard start -> first output token (also
    reported from first scheduled). ITL: mean gap between consecutive output tokens, first token
    excluded. E2E: shard start -> finished.

Engine outputs are built with hand-picked times and recorded the way LLMEngine._append_token
records a sampled token; every expected value is worked out by hand from those times.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmbatch import io
from lmbatch.engine import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from lmbatch.io.engine_feed import _row_result  # no public path turns one output into a row

SHARD_START = 100.0


def _record_tokens(m: RequestMetrics, times: list[float]) -> None:
    """What the engine does per sampled token (engine.py, _append_token); the last one finishes."""
    for t in times:
        if m.first_token_time is None:
            m.first_token_time = t
        m.last_token_time = t
        m.num_output_tokens += 1
    if times:
        m.finish_time = times[-1]


def _output(index, prompt_len, token_times, scheduled, arrival=SHARD_START, cached=0, reason="stop"):
    m = RequestMetrics(arrival_time=arrival)
    m.first_scheduled_time = scheduled
    _record_tokens(m, token_times)
    tokens = list(range(7, 7 + len(token_times)))
    sample = CompletionOutput(sample_index=0, token_ids=tokens, text="x" * len(tokens), finish_reason=reason)
    return RequestOutput(index=index, prompt_token_ids=list(range(1, prompt_len + 1)), outputs=[sample],
                         num_cached_tokens=cached, metrics=m)


def _error_output(index, prompt_len, at):
    """A request the engine rejects: an error output at once, as LLMEngine._add builds it."""
    m = RequestMetrics(arrival_time=at, finish_time=at)
    sample = CompletionOutput(sample_index=0, token_ids=[], text="", finish_reason="error")
    return RequestOutput(index=index, prompt_token_ids=list(range(1, prompt_len + 1)), outputs=[sample],
                         num_cached_tokens=0, metrics=m, error="prompt too long")


def test_request_metrics_itl_is_the_mean_gap_between_output_tokens():
    m = RequestMetrics(arrival_time=100.2)
    times = [101.0, 101.5, 102.25, 103.0]
    _record_tokens(m, times)
    gaps = [b - a for a, b in zip(times, times[1:])]            # 0.5, 0.75, 0.75: first token excluded
    assert sum(gaps) / len(gaps) == pytest.approx(2.0 / 3.0)
    assert m.itl_mean == pytest.approx(2.0 / 3.0)
    assert m.ttft == pytest.approx(0.8) and m.e2e == pytest.approx(2.8)   # these two from arrival
    one = RequestMetrics(arrival_time=100.0)
    _record_tokens(one, [101.0])
    assert one.itl_mean is None                                 # no gap with a single token


def test_row_latencies_are_measured_from_the_shard_start():
    # Arrives 0.2 s after the shard start (fed behind others): the design measures from the start.
    out = _output(0, prompt_len=6, token_times=[101.0, 101.5, 102.25, 103.0], scheduled=100.5,
                  arrival=100.2, cached=4, reason="length")
    row = _row_result(out, SHARD_START)
    assert isinstance(row, io.RowResult)
    assert row.queue_s == pytest.approx(0.5)          # 100.0 -> 100.5
    assert row.ttft_s == pytest.approx(1.0)           # 100.0 -> 101.0, not 0.8 from arrival
    assert row.ttft_sched_s == pytest.approx(0.5)     # 100.5 -> 101.0
    assert row.e2e_s == pytest.approx(3.0)            # 100.0 -> 103.0
    assert row.itl_s == pytest.approx(2.0 / 3.0)      # (0.5 + 0.75 + 0.75) / 3
    assert row.ttft_s == pytest.approx(row.queue_s + row.ttft_sched_s)
    assert (row.prompt_tokens, row.completion_tokens, row.cached_tokens) == (6, 4, 4)
    assert (row.finish_reason, row.completion, row.error) == ("length", "xxxx", None)


def test_single_token_and_error_rows():
    single = _row_result(_output(0, 3, [100.75], scheduled=100.25), SHARD_START)
    assert single.itl_s is None and single.ttft_s == pytest.approx(0.75) == single.e2e_s
    err = _row_result(_error_output(1, 9, at=100.5), SHARD_START)
    assert (err.finish_reason, err.completion, err.error) == ("error", None, "prompt too long")
    assert err.ttft_s is None and err.itl_s is None and err.queue_s is None and err.ttft_sched_s is None
    assert err.e2e_s == pytest.approx(0.5) and err.prompt_tokens == 9 and err.completion_tokens == 0


# Five finished requests and one rejected, in a shard that ran from 100.0 to 106.0:
#  row  prompt cached sched   token times                      reason
#  r0   8      4      100.125 100.5 101.0 101.5                stop
#  r1   4      0      100.5   101.0 101.25 101.5 101.75 102.0  length
#  r2   6      4      100.75  102.0 104.0                      stop
#  r3   10     8      101.5   103.0                            stop
#  r4   2      0      102.0   104.0 104.5 105.0 105.5          length
#  r5   7 (rejected at 100.0: an error row, left out of every token count and latency)
ROWS = [
    (8, 4, 100.125, [100.5, 101.0, 101.5], "stop"),
    (4, 0, 100.5, [101.0, 101.25, 101.5, 101.75, 102.0], "length"),
    (6, 4, 100.75, [102.0, 104.0], "stop"),
    (10, 8, 101.5, [103.0], "stop"),
    (2, 0, 102.0, [104.0, 104.5, 105.0, 105.5], "length"),
]
WALL_S = 6.0


def _shard() -> io.ShardResult:
    outs = [_output(i, p, times, sched, cached=c, reason=reason) for i, (p, c, sched, times, reason) in enumerate(ROWS)]
    outs.append(_error_output(5, 7, at=SHARD_START))
    return io.ShardResult(rows=[_row_result(o, SHARD_START) for o in outs], ordering="input", wall_s=WALL_S,
                          engine_stats=EngineStats(preemptions=1))


def test_shard_rows_carry_the_hand_computed_latencies():
    rows = _shard().rows
    assert [r.queue_s for r in rows] == pytest.approx([0.125, 0.5, 0.75, 1.5, 2.0, None])
    assert [r.ttft_s for r in rows] == pytest.approx([0.5, 1.0, 2.0, 3.0, 4.0, None])
    assert [r.ttft_sched_s for r in rows] == pytest.approx([0.375, 0.5, 1.25, 1.5, 2.0, None])
    assert [r.e2e_s for r in rows] == pytest.approx([1.5, 2.0, 4.0, 3.0, 5.5, 0.0])
    assert [r.itl_s for r in rows] == pytest.approx([0.5, 0.25, 2.0, None, 0.5, None])


def test_shard_metrics_percentiles_and_throughput():
    m = io.shard_metrics(_shard(), device="cpu")
    # Linear-interpolated percentiles of n sorted values: position (n - 1) * q / 100.
    # n = 5: p50 -> s[2]; p90 -> s[3] + 0.6 (s[4] - s[3]); p99 -> s[3] + 0.96 (s[4] - s[3]).
    assert m["ttft_s"] == pytest.approx({"p50": 2.0, "p90": 3.6, "p99": 3.96, "mean": 2.1})  # 0.5 1 2 3 4
    assert m["e2e_s"] == pytest.approx({"p50": 3.0, "p90": 4.9, "p99": 5.44, "mean": 3.2})   # 1.5 2 3 4 5.5
    assert m["queue_s"] == pytest.approx({"p50": 0.75, "p90": 1.8, "p99": 1.98, "mean": 0.975})
    assert m["ttft_sched_s"] == pytest.approx({"p50": 1.25, "p90": 1.8, "p99": 1.98, "mean": 1.125})
    # ITL has 4 values (r3 made one token): 0.25 0.5 0.5 2.0; positions 1.5, 2.7, 2.97.
    assert m["itl_s"] == pytest.approx({"p50": 0.5, "p90": 1.55, "p99": 1.955, "mean": 0.8125})
    # Tokens of the 5 ok rows over the 6 s wall: prompts 8+4+6+10+2 = 30, outputs 3+5+2+1+4 = 15.
    assert (m["rows"], m["ok_rows"], m["error_rows"]) == (6, 5, 1)
    assert (m["prompt_tokens"], m["completion_tokens"], m["total_tokens"]) == (30, 15, 45)
    assert m["requests_per_s"] == pytest.approx(5 / 6)
    assert m["input_tokens_per_s"] == pytest.approx(5.0)
    assert m["output_tokens_per_s"] == pytest.approx(2.5)
    assert m["total_tokens_per_s"] == pytest.approx(7.5)
    assert m["prefix_cache_hit_rate"] == pytest.approx(16 / 30)   # cached 4+0+4+8+0 of 30 prompt tokens
    assert m["preemptions"] == 1 and m["wall_s"] == WALL_S and m["ordering"] == "input"
    assert m["finish_reasons"] == {"stop": 3, "length": 2, "error": 1}
    assert m["cost"] is None and m["cost_per_1k_requests"] is None   # no price given


def test_run_rollup_of_one_shard_keeps_its_percentiles_within_the_bucket_error():
    shard = io.shard_metrics(_shard())
    run = io.rollup_metrics([shard])
    # The run's percentiles come from log buckets (40 per decade: 10**(1/40) ~ 5.9 % wide, the
    # geometric middle within 3 %) and take the value at rank ceil(q/100 * n), not interpolated:
    # ttft p50 -> 3rd of 5 (2.0), p90 and p99 -> the 5th (4.0).
    assert run["ttft_s"]["p50"] == pytest.approx(2.0, rel=0.03)
    assert run["ttft_s"]["p90"] == pytest.approx(4.0, rel=0.03)
    assert run["e2e_s"]["p99"] == pytest.approx(5.5, rel=0.03)
    assert run["itl_s"]["p50"] == pytest.approx(0.5, rel=0.03)   # rank 2 of 0.25 0.5 0.5 2.0
    assert run["output_tokens_per_s"] == pytest.approx(2.5) and run["rows"] == 6


@pytest.fixture(scope="module")
def engine(toy_model_dir):
    from lmbatch.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=toy_model_dir, device="cpu", dtype="float32", max_model_len=128,
                                  num_kv_blocks=64,
                                  max_num_seqs=4, max_num_batched_tokens=64))


def test_real_engine_rows_satisfy_the_definitions(engine, tmp_path):
    """On the toy engine (times unknown in advance): the identities the definitions imply."""
    n = 10
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)],
                             "prompt": [f"Question number {i} about things?" for i in range(n)]}),
                   tmp_path / "in.parquet")
    spec = io.InputSpec(path=str(tmp_path / "in.parquet"))
    info = io.inspect_input(spec)
    (shard,) = io.plan_shards(info, target_rows=n)
    prepared = io.prepare_requests(io.read_shard(info.spec, shard), info.spec, engine.tokenizer,
                                   {"max_tokens": 5, "min_tokens": 5, "temperature": 0.0}, engine.max_model_len)
    result = io.run_shard(engine, prepared, "input")
    assert len(result.rows) == n and result.num_errors == 0
    for r in result.rows:
        assert r.completion_tokens == 5, r
        assert 0 <= r.queue_s <= r.ttft_s <= r.e2e_s <= result.wall_s, (r, result.wall_s)
        assert r.ttft_s == pytest.approx(r.queue_s + r.ttft_sched_s, abs=1e-9), r
        # The last token finishes the request: E2E - TTFT spans the 4 gaps between 5 tokens.
        assert r.itl_s * (r.completion_tokens - 1) == pytest.approx(r.e2e_s - r.ttft_s, abs=1e-9), r
    # max_num_seqs=4: the 5th request to be scheduled waits for one of the first 4 to finish.
    queues = sorted(r.queue_s for r in result.rows)
    assert queues[4] > min(r.e2e_s for r in result.rows), [(r.queue_s, r.e2e_s) for r in result.rows]
    m = io.shard_metrics(result)
    assert m["completion_tokens"] == 5 * n
    assert m["output_tokens_per_s"] == pytest.approx(5 * n / result.wall_s)
