"""n > 1 through the whole flow: n rows per input row with their sample_index, exactly once per
(id, sample) across a failed shard and the rerun that finishes it."""

from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from lmbatch.flows.config import validate_config
from lmbatch.flows.job import run_job

ROWS = 36  # as in tests/flows/conftest.py

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _per_id(out: Path) -> dict[str, list[int]]:
    rows = duckdb.sql(f"select id, list(sample_index order by sample_index) from '{out}/*.parquet' "
                      "group by id").fetchall()
    return dict(rows)


def test_an_n3_job_resumed_after_a_failed_shard_has_exactly_3_rows_per_id(job_config, toy_assets):
    sampling = {"n": 3, "temperature": 1.0, "seed": 11}
    failing = run_job(validate_config(job_config(sampling=sampling, runner={"retries": 0},
                                                 testing={"fail_shards": [1]})), run_name="n3")
    assert [f["shard"] for f in failing["failed_shards"]] == [1]
    out = Path(failing["output_dir"])
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet", "part-00002.parquet"]
    assert set(map(tuple, _per_id(out).values())) == {(0, 1, 2)} and len(_per_id(out)) == 24

    healed = run_job(validate_config(job_config(sampling=sampling)), run_name="n3")
    assert healed["message"] is None and [m["shard"] for m in healed["shards"]] == [1]
    assert sorted(healed["skipped"]) == [0, 2]
    per_id = _per_id(out)
    inputs = pq.read_table(toy_assets[1]).column("id").to_pylist()
    assert sorted(per_id) == sorted(inputs) and all(v == [0, 1, 2] for v in per_id.values())
    # duckdb: exactly 3 rows per id, and seeded temperature-1.0 samples that differ.
    assert duckdb.sql(f"select distinct count(*) from '{out}/*.parquet' group by id").fetchall() == [(3,)]
    distinct = duckdb.sql(f"select count(distinct completion) d from '{out}/*.parquet' group by id").fetchall()
    assert sum(d == 3 for (d,) in distinct) >= ROWS * 0.9 and all(d >= 2 for (d,) in distinct)
    # The metrics: requests per input row, output tokens of all samples.
    m = healed["metrics"]
    (total,) = duckdb.sql(f"select sum(completion_tokens), count(*) from '{out}/*.parquet'").fetchall()
    assert (m["rows"], m["output_rows"], m["completion_tokens"]) == (ROWS, 3 * ROWS, total[0])
    assert total[1] == 3 * ROWS and [s["rows"] for s in healed["shards"]] == [36]   # the file's rows
