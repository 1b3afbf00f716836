"""Each input format round-trips through inspect -> plan -> read; bad inputs fail before compute."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from parquet_files import write_parquet

from lmbatch import io


def _read_all(info, target_rows=7):
    shards = io.plan_shards(info, target_rows=target_rows)
    return pa.concat_tables([io.read_shard(info.spec, s) for s in shards])


def test_parquet_file_dir_glob_and_url_read_the_same_rows(prompts_parquet, tmp_path):
    # A second file in the directory: a directory and a glob read both, in file-name order.
    write_parquet(tmp_path / "in" / "zz.parquet", {
        "id": ["z1", "z2"], "prompt": ["a", "b"], "source": ["s", "s"],
        "max_tokens": pa.array([1, None], pa.int64())})
    expected = [f"r{i:03d}" for i in range(20)] + ["z1", "z2"]
    for path in [str(tmp_path / "in"), str(tmp_path / "in" / "*.parquet"), f"file://{tmp_path}/in"]:
        info = io.inspect_input(io.InputSpec(path=path, passthrough_columns=["source"],
                                             sampling_columns=["max_tokens"]))
        assert info.spec.format == "parquet" and info.num_rows == 22
        table = _read_all(info)
        assert table.column("id").to_pylist() == expected
        assert table.column_names == ["id", "prompt", "max_tokens", "source"]
    single = io.inspect_input(io.InputSpec(path=str(prompts_parquet)))
    assert single.num_rows == 20 and len(single.units) == 4  # one unit per row group


def test_parquet_on_an_fsspec_memory_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    table = pa.table({"id": [1, 2, 3], "prompt": ["x", "y", "z"]})
    with fs.open("/lmbatch-test/data.parquet", "wb") as f:
        pq.write_table(table, f)
    info = io.inspect_input(io.InputSpec(path="memory://lmbatch-test/data.parquet"))
    assert _read_all(info, 2).column("prompt").to_pylist() == ["x", "y", "z"]


def test_hf_save_to_disk_round_trip(tmp_path):
    import datasets

    messages = [[{"role": "user", "content": f"hi {i}"}] for i in range(30)]
    ds = datasets.Dataset.from_dict({"uid": list(range(30)), "messages": messages})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)  # several .arrow files
    info = io.inspect_input(io.InputSpec(path=str(tmp_path / "ds"), id_column="uid",
                                         prompt_column="messages"))
    assert info.spec.format == "hf_disk" and info.prompt_kind == "messages"
    assert len(info.files) > 1 and info.num_rows == 30
    table = _read_all(info)
    assert table.column("uid").to_pylist() == list(range(30))
    assert table.column("messages").to_pylist()[7] == [{"content": "hi 7", "role": "user"}]


def test_hf_dataset_dict_names_its_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": [1], "prompt": ["a"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(io.InputError, match=r"DatasetDict with splits \['train'\].*dd/train"):
        io.inspect_input(io.InputSpec(path=str(tmp_path / "dd")))


def _openai_lines(n, url="/v1/chat/completions"):
    for i in range(n):
        body = {"model": "m", "max_tokens": 5 + i, "temperature": 0.5}
        if url.endswith("chat/completions"):
            body["messages"] = [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": [{"type": "text", "text": f"q{i}"}]}]
            if i == 0:
                body.update(logprobs=True, top_logprobs=2, stop="END")
        else:
            body["prompt"] = f"p{i}"
        yield json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body})


def test_openai_batch_jsonl_chat_and_completions(tmp_path, monkeypatch):
    from lmbatch.io import openai_jsonl

    monkeypatch.setattr(openai_jsonl, "BLOCK_LINES", 4)  # several blocks from a small file
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(_openai_lines(10)) + "\n\n")
    info = io.inspect_input(io.InputSpec(path=str(chat)))
    assert (info.spec.format, info.spec.id_column, info.spec.prompt_column) == \
        ("openai_jsonl", "custom_id", "messages")
    assert info.num_rows == 10 and len(info.units) == 3
    table = _read_all(info, 3)
    assert table.column("custom_id").to_pylist() == [f"c{i}" for i in range(10)]
    assert table.column("messages")[3].as_py()[1] == {"role": "user", "content": "q3"}
    assert table.column("max_tokens").to_pylist() == list(range(5, 15))
    assert table.column("logprobs").to_pylist()[:2] == [2, None]
    assert table.column("stop").to_pylist()[0] == ["END"]

    comp = tmp_path / "comp.jsonl"
    comp.write_text("\n".join(_openai_lines(3, "/v1/completions")))
    info = io.inspect_input(io.InputSpec(path=str(comp)))
    assert info.spec.prompt_column == "prompt" and info.prompt_kind == "text"
    assert _read_all(info).column("prompt").to_pylist() == ["p0", "p1", "p2"]


def test_a_malformed_jsonl_line_is_a_row_with_its_line_and_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = list(_openai_lines(3))
    lines[1] = '{"custom_id": "c1", "body": '
    path.write_text("\n".join(lines))
    info = io.inspect_input(io.InputSpec(path=str(path)))   # no InputError: the job goes on
    table = _read_all(info)
    assert table.column("custom_id").to_pylist() == ["c0", "c1", "c2"]   # read from the broken text
    errors = table.column("_line_error").to_pylist()
    assert errors[0] is None and errors[2] is None
    assert errors[1].startswith("invalid request at line 2 of bad.jsonl: invalid JSON")


def test_a_file_that_is_not_jsonl_at_all_fails_before_compute(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("just some text\nand more\n")
    with pytest.raises(io.InputError, match=r"notes\.jsonl: not an OpenAI batch JSONL file"):
        io.inspect_input(io.InputSpec(path=str(path)))


@pytest.mark.parametrize("columns, spec_kw, message", [
    ({"id": [1, 2], "text": ["a", "b"]}, {}, r"prompts\.parquet: column 'prompt' not found \(columns: id, text\)"),
    ({"id": [1.5, 2.5], "prompt": ["a", "b"]}, {}, r"id column 'id' must be string or integer, not double"),
    ({"id": [1, 2], "prompt": [1, 2]}, {}, r"prompt column 'prompt' has type int64"),
    ({"id": ["a", "b", "a", "c", "b"], "prompt": list("vwxyz")}, {},
     r"id column 'id' has duplicate values: 'a', 'b'"),
    ({"id": ["a", None], "prompt": ["x", "y"]}, {}, r"prompts\.parquet: id column 'id' has 1 null"),
    ({"id": [1, 2], "prompt": ["a", "b"], "t": ["hot", "cold"]}, {"sampling_columns": {"t": "temperature"}},
     r"sampling column 't' \(temperature\) has type string, expected float"),
    ({"id": [1, 2], "prompt": ["a", "b"], "x": [1, 2]}, {"sampling_columns": ["x"]},
     r"sampling column 'x' maps to 'x', which is not a per-row sampling field"),
    ({"id": [1, 2], "prompt": ["a", "b"], "error": ["", ""]}, {"passthrough_columns": ["error"]},
     r"passthrough column 'error' clashes with an output column"),
])
def test_validation_errors_name_file_and_column(tmp_path, columns, spec_kw, message):
    path = tmp_path / "prompts.parquet"
    write_parquet(path, columns)
    with pytest.raises(io.InputError, match=message):
        io.inspect_input(io.InputSpec(path=str(path), **spec_kw))


def test_unreadable_and_missing_inputs(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(io.InputError, match=r"broken\.parquet: unreadable parquet file"):
        io.inspect_input(io.InputSpec(path=str(tmp_path / "broken.parquet")))
    with pytest.raises(io.InputError, match=r"no such file or directory"):
        io.inspect_input(io.InputSpec(path=str(tmp_path / "nope.parquet")))
    with pytest.raises(io.InputError, match=r"input format 'csv' is not one of"):
        io.InputSpec(path="x", format="csv")


def test_files_with_different_column_types_are_rejected(tmp_path):
    write_parquet(tmp_path / "d" / "a.parquet", {"id": [1], "prompt": ["x"]})
    write_parquet(tmp_path / "d" / "b.parquet", {"id": ["2"], "prompt": ["y"]})
    with pytest.raises(io.InputError, match=r"b\.parquet: column 'id' has type string, but .*a\.parquet has int64"):
        io.inspect_input(io.InputSpec(path=str(tmp_path / "d")))
