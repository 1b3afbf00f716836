"""Shard plans: deterministic, balanced, covering every row once; reading stays memory-bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from itertools import pairwise

import pyarrow as pa
import pytest
from parquet_files import write_parquet

from lmbatch import io


@pytest.fixture
def skewed_parquet(tmp_path):
    """400 rows in row groups of 50: the first half has 10-char prompts, the second 400-char ones."""
    n = 400
    prompts = [f"s{i:08d} " if i < n // 2 else "L" * 390 + f"{i:09d}" for i in range(n)]
    write_parquet(tmp_path / "skew" / "data.parquet", {"id": list(range(n)), "prompt": prompts},
                  row_group_size=50)
    return tmp_path / "skew"


def test_plan_is_deterministic_and_keys_follow_the_data(skewed_parquet, tmp_path):
    spec = io.InputSpec(path=str(skewed_parquet))
    a = io.plan_shards(io.inspect_input(spec), target_tokens=3000)
    b = io.plan_shards(io.inspect_input(spec), target_tokens=3000)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert len({s.key for s in a}) == len(a)
    assert [io.ShardPlan.from_dict(s.to_dict()) for s in a] == a  # ships to workers as JSON-able dicts
    # The same rows in a changed dataset give other keys: a resume never mixes datasets.
    table = pa.table({"id": list(range(400)), "prompt": ["changed"] * 400})
    write_parquet(tmp_path / "other" / "data.parquet", table.to_pydict(), row_group_size=50)
    c = io.plan_shards(io.inspect_input(io.InputSpec(path=str(tmp_path / "other"))), target_rows=50)
    assert not {s.key for s in c} & {s.key for s in a}


def test_shards_cover_every_row_once_and_balance_tokens(skewed_parquet):
    info = io.inspect_input(io.InputSpec(path=str(skewed_parquet)))
    shards = io.plan_shards(info, target_tokens=info.est_tokens // 8)
    assert len(shards) == 8
    assert shards[0].row_start == 0 and shards[-1].row_end == 400
    assert all(a.row_end == b.row_start for a, b in pairwise(shards))
    ids = [i for s in shards for i in io.read_shard(info.spec, s).column("id").to_pylist()]
    assert ids == list(range(400))
    # Balance by real prompt bytes, not just by the estimate: short-prompt shards get more rows.
    sizes = [sum(len(p) for p in io.read_shard(info.spec, s).column("prompt").to_pylist()) for s in shards]
    assert max(sizes) / min(sizes) < 1.3, sizes
    assert shards[0].num_rows > 4 * shards[-1].num_rows


def test_target_rows_caps_rows_per_shard(skewed_parquet):
    info = io.inspect_input(io.InputSpec(path=str(skewed_parquet)))
    shards = io.plan_shards(info, target_rows=64)
    assert len(shards) == 7 and max(s.num_rows for s in shards) <= 64
    both = io.plan_shards(info, target_tokens=info.est_tokens // 2, target_rows=64)
    assert max(s.num_rows for s in both) <= 64 and len(both) >= 7  # token cuts, then row caps
    part = io.read_shard(info.spec, shards[1])  # starts inside a row group
    assert part.column("id").to_pylist() == list(range(shards[1].row_start, shards[1].row_end))


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import pyarrow as pa
    from lmbatch import io
    info = io.inspect_input(io.InputSpec(path=sys.argv[1], passthrough_columns=["payload"],
                                         check_duplicate_ids=False))
    rows = id_sum = 0
    for shard in io.plan_shards(info, target_rows=20_000):
        for batch in io.iter_shard_batches(info.spec, shard, batch_rows=1000):
            rows += batch.num_rows
            id_sum += sum(batch.column("id").to_pylist())
    print(json.dumps({"rows": rows, "id_sum": id_sum, "peak": pa.default_memory_pool().max_memory()}))
""")


def test_reading_a_large_dataset_keeps_arrow_memory_bounded(tmp_path):
    """80,000 rows, ~66 MB in memory, read in 1,000-row batches: the Arrow memory pool's peak
    (measured in a fresh process, so nothing else counts) stays a small fraction of it."""
    n = 80_000
    table = pa.table({"id": pa.array(range(n), pa.int64()),
                      "prompt": [f"prompt number {i} " + "x" * 300 for i in range(n)],
                      "payload": [f"{i:0500d}" for i in range(n)]})
    dataset_bytes = table.nbytes
    write_parquet(tmp_path / "big" / "data.parquet", table.to_pydict(), row_group_size=2000)
    del table
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big")],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == n and result["id_sum"] == n * (n - 1) // 2
    print(f"dataset {dataset_bytes / 1e6:.1f} MB in memory, peak Arrow pool {result['peak'] / 1e6:.1f} MB")
    assert dataset_bytes > 60e6
    assert result["peak"] < dataset_bytes / 8
