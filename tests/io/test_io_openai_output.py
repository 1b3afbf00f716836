"""OpenAI Batch output and error lines from output tables, parsed by OpenAI's own client types;
malformed request lines as error rows with their line number and reason; atomic publication."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from lmbatch import io
from lmbatch.io import openai_output
from lmbatch.io.engine_feed import RowResult, Sample


def _table():
    two = RowResult(completion="x", finish_reason="stop", prompt_tokens=10, completion_tokens=3, cached_tokens=4,
                    extra_samples=[Sample("yy", "length", 5)])
    one = RowResult(completion="z", finish_reason="length", prompt_tokens=7, completion_tokens=2)
    bad = RowResult(error="prompt too long: 300 tokens", prompt_tokens=300)
    return io.build_output_table(pa.table({"id": ["r1", "r2", "r3"]}), [two, bad, one], "toy", "run-1")


def test_chat_lines_group_a_rows_samples_as_choices_and_parse_as_chat_completions():
    ok, errors = openai_output.shard_lines(_table(), "id", chat=True, created=1700000000)
    assert len(ok) == 2 and len(errors) == 1
    first = json.loads(ok[0])
    assert first["custom_id"] == "r1" and first["error"] is None and first["id"].startswith("batch_req_")
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"].startswith("req_")
    body = ChatCompletion.model_validate(first["response"]["body"])
    assert body.object == "chat.completion" and body.model == "toy" and body.created == 1700000000
    assert [(c.index, c.message.content, c.finish_reason) for c in body.choices] == [(0, "x", "stop"),
                                                                                   (1, "yy", "length")]
    assert (body.usage.prompt_tokens, body.usage.completion_tokens, body.usage.total_tokens) == (10, 8, 18)
    assert body.usage.prompt_tokens_details.cached_tokens == 4
    assert body.usage.completion_tokens_details.reasoning_tokens == 0
    error = json.loads(errors[0])
    assert error["custom_id"] == "r2" and error["response"] is None
    assert error["error"] == {"code": "invalid_request", "message": "prompt too long: 300 tokens"}
    # Deterministic line ids: a part rebuilt from the Parquet file names its lines the same.
    assert openai_output.shard_lines(_table(), "id", chat=True, created=1700000000) == (ok, errors)


def test_completion_lines_parse_as_text_completions():
    ok, _ = openai_output.shard_lines(_table(), "id", chat=False, created=1)
    body = Completion.model_validate(json.loads(ok[1])["response"]["body"])
    assert body.object == "text_completion" and [c.text for c in body.choices] == ["z"]
    assert body.choices[0].finish_reason == "length" and body.usage.completion_tokens == 2


def test_parts_and_their_concatenation_in_shard_order(tmp_path):
    run = tmp_path / "run"
    shard_paths = [str(run / f"part-0000{i}.parquet") for i in range(2)]
    for path in shard_paths:
        io.write_shard(_table(), path)
    openai_output.write_parts(_table(), shard_paths[0], "id", chat=True)
    # Shard 1 has no parts (openai_jsonl chosen after it ran): rebuilt from its Parquet file.
    output, errors = openai_output.publish(str(run), shard_paths, "id", chat=True)
    lines = (run / "output.jsonl").read_text().splitlines()
    assert output == str(run / "output.jsonl") and [json.loads(x)["custom_id"] for x in lines] == ["r1", "r3"] * 2
    assert [json.loads(x)["custom_id"] for x in (run / "errors.jsonl").read_text().splitlines()] == ["r2", "r2"]
    assert sorted(p.name for p in (run / ".openai").iterdir()) == [
        "part-00000.errors.jsonl", "part-00000.output.jsonl", "part-00001.errors.jsonl", "part-00001.output.jsonl"]
    assert sorted(p.name for p in run.iterdir()) == [".openai", "errors.jsonl", "output.jsonl", "part-00000.parquet",
                                                     "part-00001.parquet"]   # no temporary file left
    openai_output.remove_parts(shard_paths[1])
    assert not (run / ".openai" / "part-00001.output.jsonl").exists()


def test_a_failed_publication_leaves_the_previous_files(tmp_path, monkeypatch):
    run = tmp_path / "run"
    path = str(run / "part-00000.parquet")
    io.write_shard(_table(), path)
    openai_output.publish(str(run), [path], "id", chat=True)
    before = (run / "output.jsonl").read_text()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(openai_output.shutil, "copyfileobj", broken)
    with pytest.raises(OSError, match="disk full"):
        openai_output.publish(str(run), [path], "id", chat=True)
    assert (run / "output.jsonl").read_text() == before
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


MALFORMED = [
    ('{"custom_id": "s", "body": {"messages": "hello"}}', "s", "body.messages must be a list, not a string"),
    ('{"custom_id": "j", "body": ', "j", "invalid JSON"),
    ('{"body": {"messages": []}}', "b.jsonl:line-4", "missing custom_id"),
    ('{"custom_id": "m"}', "m", "missing body"),
    ('{"custom_id": "o", "body": [1]}', "o", "body must be an object, not a list"),
    ('[1, 2]', "b.jsonl:line-7", "the line is a list, not a request object"),
    ('{"custom_id": "t", "body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}}', "t",
     "body.max_tokens must be an integer, not a string"),
    ('{"custom_id": "r", "body": {"messages": [{"content": "x"}]}}', "r", "body.messages[0].role must be a string"),
    ('{"custom_id": "p", "body": {"prompt": [1, 2]}}', "p", "body.prompt must be a string"),
]


def test_malformed_lines_become_error_rows_with_line_number_and_reason(tokenizer, tmp_path):
    good = json.dumps({"custom_id": "ok", "url": "/v1/chat/completions", "response_format": None,
                       "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                "response_format": {"type": "json_object"}}})
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join([good] + [line for line, _, _ in MALFORMED]) + "\n")
    info = io.inspect_input(io.InputSpec(path=str(path)))
    assert info.num_rows == 1 + len(MALFORMED)
    table = io.read_shard(info.spec, io.plan_shards(info)[0])
    assert table.column("structured_outputs.json_object").to_pylist()[0] is True   # response_format read
    prepared = io.prepare_requests(table, info.spec, tokenizer, {"max_tokens": 4}, 128)
    assert prepared.valid_rows == [0]
    assert prepared.sampling[0].structured_outputs.kind == "json_object"
    for k, (_, custom_id, reason) in enumerate(MALFORMED, start=1):
        assert table.column("custom_id")[k].as_py() == custom_id
        expected = f"invalid request at line {k + 1} of b.jsonl: {reason}"
        assert prepared.errors[k].startswith(expected), prepared.errors[k]
