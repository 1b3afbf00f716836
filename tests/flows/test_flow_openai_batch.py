"""An OpenAI batch JSONL job end to end through the CLI: per-row body fields applied, outputs
joined back by custom_id, output and error files in OpenAI Batch's format (parsed by OpenAI's own
client types), a malformed line an error row with its line number and reason."""

import json
from pathlib import Path

import duckdb
import jsonschema
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from lmbatch.flows.cli import main
from lmbatch.flows.config import validate_config
from lmbatch.flows.job import run_job

pytestmark = pytest.mark.usefixtures("prefect_harness")

# OpenAI's BatchRequestOutput (openapi.yaml): the per-line object of the output and error files.
BATCH_REQUEST_OUTPUT = {
    "type": "object", "required": ["id", "custom_id", "response", "error"],
    "properties": {
        "id": {"type": "string"}, "custom_id": {"type": "string"},
        "response": {"type": ["object", "null"], "required": ["status_code", "request_id", "body"],
                     "properties": {"status_code": {"type": "integer"}, "request_id": {"type": "string"},
                                    "body": {"type": "object"}}},
        "error": {"type": ["object", "null"], "required": ["code", "message"],
                  "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
    },
}
MALFORMED_LINE = 4   # its `messages` is a string
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "sum", "schema": {
    "type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["answer"], "additionalProperties": False}}}


def _chat_lines(n: int = 13) -> tuple[list[str], dict[str, dict]]:
    """Request lines (one malformed) and each valid custom_id's body."""
    lines, bodies = [], {}
    for i in range(n):
        body = {"model": "toy", "messages": [{"role": "system", "content": "Answer briefly."},
                                             {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
                "max_tokens": 1 + i % 6, "temperature": 0.0 if i % 2 else 0.8, "seed": i}
        if i == 5:
            body.update(n=2, temperature=0.0, max_tokens=6)     # greedy: both choices the same
        if i == 7:
            body.update(n=2, temperature=1.5, max_tokens=6)     # seeded sampling: they differ
        if i == 9:
            body.update(response_format=RESPONSE_FORMAT, max_tokens=24, temperature=1.0)
        bodies[f"req-{i}"] = body
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}))
    lines.insert(MALFORMED_LINE - 1, json.dumps({"custom_id": "broken", "method": "POST", "url": "/v1/chat/completions",
                                                 "body": {"model": "toy", "messages": "What is 2+2?"}}))
    return lines, bodies


def _read_jsonl(path: Path) -> list[dict]:
    out = [json.loads(line) for line in path.read_text().splitlines()]
    for line in out:
        jsonschema.validate(line, BATCH_REQUEST_OUTPUT)
    return out


def test_openai_batch_job_end_to_end_through_the_cli(job_config, write_config, tmp_path, capsys):
    lines, bodies = _chat_lines()
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    cfg = job_config(input={"path": str(batch), "format": "openai_jsonl", "columns": {}},
                     output={"format": ["parquet", "openai_jsonl"]}, shards={"target_rows": 5})
    assert main(["run", str(write_config(cfg)), "--run-name", "oai", "--quiet"]) == 0, capsys.readouterr().err
    out = tmp_path / "out" / "oai"

    outputs = {line["custom_id"]: line for line in _read_jsonl(out / "output.jsonl")}
    errors = {line["custom_id"]: line for line in _read_jsonl(out / "errors.jsonl")}
    # Every input line is answered once, joined back by custom_id.
    assert sorted(outputs) == sorted(bodies) and list(errors) == ["broken"]
    for custom_id, line in outputs.items():
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = ChatCompletion.model_validate(line["response"]["body"])
        asked = bodies[custom_id]
        assert [c.index for c in body.choices] == list(range(asked.get("n", 1)))   # n choices, one line
        assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in body.choices)
        assert body.usage.completion_tokens <= asked["max_tokens"] * len(body.choices)
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
        if asked["max_tokens"] == 1:
            assert body.usage.completion_tokens == 1 and body.choices[0].finish_reason == "length"
    assert sum(b["max_tokens"] == 1 for b in bodies.values()) >= 2
    greedy, sampled = (ChatCompletion.model_validate(outputs[k]["response"]["body"]).choices
                       for k in ("req-5", "req-7"))
    assert greedy[0].message.content == greedy[1].message.content        # temperature 0.0 applied
    assert sampled[0].message.content != sampled[1].message.content      # temperature 1.5 applied
    (constrained,) = ChatCompletion.model_validate(outputs["req-9"]["response"]["body"]).choices
    assert constrained.finish_reason == "stop"                           # response_format applied
    assert json.loads(constrained.message.content)["answer"] in range(100)

    broken = errors["broken"]
    assert broken["response"] is None and broken["error"]["code"] == "invalid_request"
    assert broken["error"]["message"] == (f"invalid request at line {MALFORMED_LINE} of batch.jsonl: "
                                          "body.messages must be a list, not a string")
    # The same rows in Parquet: one per (custom_id, sample), the malformed line an error row.
    glob = f"'{out}/*.parquet'"
    assert duckdb.sql(f"select count(*) from {glob}").fetchall() == [(len(bodies) + 2 + 1,)]
    assert duckdb.sql(f"select sample_index, finish_reason, error from {glob} where custom_id = 'broken'"
                      ).fetchall() == [(0, "error", broken["error"]["message"])]
    per_row = dict(duckdb.sql(f"select custom_id, sum(completion_tokens) from {glob} group by custom_id").fetchall())
    assert all(per_row[k] == outputs[k]["response"]["body"]["usage"]["completion_tokens"] for k in outputs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == len(bodies) + 1 and metrics["error_rows"] == 1
    assert metrics["completion_tokens"] == sum(per_row.values())


def test_completions_endpoint_jsonl_only_still_resumes_from_parquet_and_rebuilds_lost_parts(job_config, tmp_path):
    batch = tmp_path / "completions.jsonl"
    batch.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                         "body": {"model": "toy", "prompt": f"Once upon a time {i}",
                                                  "max_tokens": 3}}) + "\n" for i in range(8)))
    cfg = validate_config(job_config(input={"path": str(batch), "format": "auto", "columns": {}},
                                     output={"format": "openai_jsonl"}, shards={"target_rows": 4}))
    first = run_job(cfg, run_name="cmpl")
    out = Path(first["output_dir"])
    # Parquet stays the record of what is done (the run database checks its row counts).
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    lines = _read_jsonl(out / "output.jsonl")
    assert [x["custom_id"] for x in lines] == [f"c{i}" for i in range(8)]      # shard order, input order
    assert (out / "errors.jsonl").read_text() == ""
    for line in lines:
        body = Completion.model_validate(line["response"]["body"])
        assert body.object == "text_completion" and body.usage.completion_tokens == 3
        assert body.choices[0].finish_reason == "length" and isinstance(body.choices[0].text, str)

    for part in (out / ".openai").iterdir():   # lost parts: rebuilt from the Parquet files
        part.unlink()
    again = run_job(cfg, run_name="cmpl")
    assert again["shards"] == [] and sorted(again["skipped"]) == [0, 1]

    def without_created(rows):
        return [{**r, "response": {**r["response"], "body": {**r["response"]["body"], "created": 0}}} for r in rows]

    assert without_created(_read_jsonl(out / "output.jsonl")) == without_created(lines)


def test_bad_output_format_and_a_file_that_is_not_jsonl_fail_before_compute(job_config, write_config, tmp_path,
                                                                              capsys):
    assert main(["run", str(write_config(job_config(output={"format": ["parquet", "csv"]})))]) == 2
    err = capsys.readouterr().err
    assert err == ("lmbatch: config error: " + str(tmp_path / "job.yaml") + ": output.format: 'csv' is not an "
                   "output format; must be parquet or openai_jsonl\n")
    notes = tmp_path / "notes.jsonl"
    notes.write_text("not json\nat all\n")
    cfg = job_config(input={"path": str(notes), "format": "openai_jsonl", "columns": {}})
    assert main(["run", str(write_config(cfg))]) == 2
    err = capsys.readouterr().err
    assert "config error: input: " in err and "not an OpenAI batch JSONL file" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_failed_publish_marks_the_run_failed_and_a_rerun_publishes(job_config, tmp_path, monkeypatch):
    from lmbatch import io
    from lmbatch.io import openai_output

    lines, _ = _chat_lines(6)
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    cfg = validate_config(job_config(input={"path": str(batch), "format": "openai_jsonl", "columns": {}},
                                     output={"format": ["parquet", "openai_jsonl"]}, shards={"target_rows": 4}))
    real = openai_output.publish

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(openai_output, "publish", disk_full)
    with pytest.raises(OSError, match="disk full"):
        run_job(cfg, run_name="publish")
    with io.RunDB(cfg.db.url, cfg.output.path) as db:
        run = db.find_run("publish")
    assert run["status"] == "failed" and "OpenAI JSONL files not written: disk full" in run["error"]
    monkeypatch.setattr(openai_output, "publish", real)
    again = run_job(cfg, run_name="publish")
    assert again["message"] is None and again["shards"] == []          # every shard was done
    assert (Path(again["output_dir"]) / "output.jsonl").exists()
