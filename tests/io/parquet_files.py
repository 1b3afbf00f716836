"""Writing small Parquet inputs for the io tests (imported by plain name, like tests/engine's helpers)."""

import os

import pyarrow as pa
import pyarrow.parquet as pq


def write_parquet(path, columns: dict, row_group_size: int | None = None, schema=None):
    table = pa.table(columns, schema=schema)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return table
