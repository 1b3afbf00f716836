"""Structured outputs and reasoning through the whole flow: config defaults, per-row columns,
OpenAI response_format, and the reasoning / completion columns."""

import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmbatch.flows.config import validate_config
from lmbatch.flows.job import run_job
from lmbatch.testing import build_toy_model

pytestmark = pytest.mark.usefixtures("prefect_harness")
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["label", "score"], "additionalProperties": False}


def _rows(out: Path) -> list[dict]:
    return duckdb.sql(f"select * from '{out}/*.parquet' order by id").to_arrow_table().to_pylist()


def test_a_json_schema_job_writes_valid_json_on_every_row(job_config):
    columns = {"id": "id", "prompt": "prompt", "sampling": None, "passthrough": ["category"]}
    cfg = job_config(input={"columns": columns}, sampling={"temperature": 1.0, "seed": 3, "max_tokens": 48,
                                                           "structured_outputs": {"json": SCHEMA}})
    result = run_job(validate_config(cfg))
    assert result["message"] is None
    out = Path(result["output_dir"])
    stopped = duckdb.sql(f"select count(*), bool_and(json_valid(completion)) from '{out}/*.parquet' "
                         "where finish_reason = 'stop'").fetchall()[0]
    assert stopped[0] >= 30 and stopped[1] is True
    for row in _rows(out):
        if row["finish_reason"] == "stop":
            value = json.loads(row["completion"])
            assert value["label"] in ("spam", "ham") and isinstance(value["score"], int)


def test_a_per_row_regex_column_constrains_its_row(job_config, toy_assets, tmp_path):
    data = pq.read_table(toy_assets[1])
    regex = [r"[a-z]{3}-[0-9]{2}" if i % 2 == 0 else None for i in range(data.num_rows)]
    path = tmp_path / "with-regex.parquet"
    pq.write_table(data.append_column("pattern", pa.array(regex, pa.string())), path)
    cfg = job_config(input={"path": str(path), "columns": {
        "id": "id", "prompt": "prompt", "sampling": {"max_tokens": "max_tokens", "pattern": "structured_outputs.regex"},
        "passthrough": ["category"]}}, sampling={"temperature": 1.0, "seed": 1, "max_tokens": 16})
    result = run_job(validate_config(cfg))
    rows = {r["id"]: r for r in _rows(Path(result["output_dir"]))}
    ids = data.column("id").to_pylist()
    constrained = [rows[ids[i]] for i in range(0, len(ids), 2)]
    done = [r for r in constrained if r["finish_reason"] == "stop"]
    assert done and all(re.fullmatch(r"[a-z]{3}-[0-9]{2}", r["completion"]) for r in done)
    free = [rows[ids[i]]["completion"] for i in range(1, len(ids), 2)]
    assert not any(re.fullmatch(r"[a-z]{3}-[0-9]{2}", t or "") for t in free)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("thinker") / "model", decisive=False, seed=7, reasoning=True)


def test_reasoning_goes_to_its_column_and_the_budget_closes_it(job_config, thinker, tmp_path):
    messages = [[{"role": "user", "content": f"question {i}?"}] for i in range(8)]
    kwargs = [None] * 6 + [json.dumps({"enable_thinking": False})] * 2   # the last two rows do not think
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(8)], "messages": messages, "kw": kwargs}), path)
    cfg = job_config(input={"path": str(path), "columns": {"id": "id", "prompt": "messages", "sampling": None,
                                                          "passthrough": [], "chat_template_kwargs": "kw"}},
                     model={"id": str(thinker)}, engine={"reasoning_parser": "think"},
                     sampling={"temperature": 1.0, "seed": 2, "max_tokens": 12, "max_reasoning_tokens": 4,
                               "structured_outputs": {"choice": ["yes", "no"]}}, shards={"target_rows": 8})
    result = run_job(validate_config(cfg))
    assert result["message"] is None
    rows = _rows(Path(result["output_dir"]))
    thinking, plain = rows[:6], rows[6:]
    assert all(1 <= r["reasoning_tokens"] <= 4 and r["completion"] in ("yes", "no") for r in thinking)
    assert all(r["reasoning_tokens"] == 0 and r["reasoning"] == "" and r["completion"] in ("yes", "no")
               for r in plain)
    assert all(r["completion_tokens"] >= r["reasoning_tokens"] for r in rows)


def test_openai_response_format_is_honoured(job_config, tmp_path):
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 40,
                       "temperature": 1.0, "seed": i,
                       "response_format": ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
                                           if i % 2 == 0 else {"type": "json_object"})}} for i in range(6)]
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    cfg = job_config(input={"path": str(path), "format": "openai_jsonl", "columns": {
        "id": None, "prompt": None, "sampling": None, "passthrough": []}}, sampling={"max_tokens": 40})
    result = run_job(validate_config(cfg))
    rows = {r["custom_id"]: r for r in duckdb.sql(
        f"select * from '{result['output_dir']}/*.parquet'").to_arrow_table().to_pylist()}
    for i in range(6):
        row = rows[f"r{i}"]
        if row["finish_reason"] == "stop":
            value = json.loads(row["completion"])
            assert isinstance(value, dict) and (i % 2 or value["label"] in ("spam", "ham"))
    assert sum(r["finish_reason"] == "stop" for r in rows.values()) >= 3
