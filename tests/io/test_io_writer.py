"""Outputs: a fixed typed schema, atomic publication, one row per input row for DuckDB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmbatch import io
from lmbatch.io.engine_feed import RowResult


def _rows(n, errors=False):
    if errors:
        return [RowResult(error="empty prompt") for _ in range(n)]
    return [RowResult(completion=f"c{i}", finish_reason="length", prompt_tokens=3, completion_tokens=2,
                      cached_tokens=0, ttft_s=0.1, e2e_s=0.2, itl_s=0.05) for i in range(n)]


def test_schema_is_fixed_even_when_columns_are_all_null(tmp_path):
    inputs = pa.table({"id": ["a", "b"], "tag": [1, 2]})
    ok = io.build_output_table(inputs, _rows(2), "m", "run1")
    bad = io.build_output_table(inputs, _rows(2, errors=True), "m", "run1")
    assert ok.schema == bad.schema
    assert ok.schema.field("error").type == pa.string() and ok.column("error").null_count == 2
    assert bad.schema.field("completion").type == pa.string() and bad.column("ttft_s").type == pa.float64()
    assert ok.column_names == ["id", "tag", "sample_index", "completion", "reasoning", "finish_reason", "error",
                               "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "ttft_s",
                               "e2e_s", "itl_s", "model", "run_id"]
    with_lp = io.build_output_table(inputs, _rows(2), "m", "run1", with_logprobs=True)
    assert with_lp.column_names[-1] == "logprobs" and with_lp.column("logprobs").null_count == 2
    for name, table in [("ok", ok), ("bad", bad)]:
        io.write_shard(table, str(tmp_path / f"{name}.parquet"))
        assert pq.read_schema(tmp_path / f"{name}.parquet").remove_metadata() == ok.schema
    assert pq.ParquetFile(tmp_path / "ok.parquet").metadata.row_group(0).column(3).compression == "ZSTD"
    with pytest.raises(ValueError, match="3 results for 2 input rows"):
        io.build_output_table(inputs, _rows(3), "m", "run1")


def test_a_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "out" / "part-00000.parquet"
    table = io.build_output_table(pa.table({"id": [1]}), _rows(1), "m", "r")
    with pytest.raises(RuntimeError), io.ShardWriter(str(path), table.schema) as w:
        w.write(table)
        raise RuntimeError("crash in the middle of a shard")
    assert os.listdir(tmp_path / "out") == []  # neither the file nor its temp
    assert io.count_rows(str(path)) is None


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import pyarrow as pa
    from lmbatch import io
    table = pa.table({"id": list(range(1000)), "x": ["y" * 100] * 1000})
    with io.ShardWriter(sys.argv[1], table.schema) as w:
        for i in range(1000):
            w.write(table)
            if i == 2:
                print("writing", flush=True)
            time.sleep(0.01)
""")


def test_a_killed_writer_never_leaves_a_visible_or_partial_file(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out / "part-00001.parquet")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup handler runs, as in an OOM kill
    proc.wait()
    names = os.listdir(out)
    assert names and all(n.startswith(".part-00001.parquet.tmp-") for n in names)  # only the hidden temp
    assert not (out / "part-00001.parquet").exists()
    io.write_shard(io.build_output_table(pa.table({"id": [1]}), _rows(1), "m", "r"), str(out / "part-00000.parquet"))
    # Readers of the run directory see only finished shards.
    assert duckdb.sql(f"select count(*) from '{out}/*.parquet'").fetchall() == [(1,)]


def test_duckdb_reads_shards_as_one_dataset_with_one_row_per_id(tmp_path):
    for k in range(3):
        ids = pa.table({"id": [f"s{k}-{i}" for i in range(4)]})
        io.write_shard(io.build_output_table(ids, _rows(4, errors=(k == 1)), "m", "r"),
                       str(tmp_path / f"part-{k:05d}.parquet"))
    rows = duckdb.sql(f"select finish_reason, count(*), count(distinct id) from '{tmp_path}/*.parquet' "
                      "group by 1 order by 1").fetchall()
    assert rows == [("error", 4, 4), ("length", 8, 8)]
