"""A job's outputs in OpenAI Batch's format: `<run>/output.jsonl` and `<run>/errors.jsonl`.

One line per input row, keyed by its custom_id (the id column), as OpenAI's batch output and
error files have them:

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "req_...", "body": <chat.completion or text_completion>},
     "error": null}
    {"id": "batch_req_...", "custom_id": "r2", "response": null,
     "error": {"code": "invalid_request", "message": "prompt too long: ..."}}

A body holds the row's n samples as n `choices` (index = sample_index) and the request's usage
(prompt tokens once, completion tokens of all samples). Lines are made from a shard's output
table, the rows of its Parquet file, so the Parquet files stay the one record of what is done
and a JSONL part can always be rebuilt from them. The shard task writes its lines as two hidden
parts (`<run>/.openai/part-NNNNN.{output,errors}.jsonl`, each atomically, like the shard file);
the roll-up concatenates the done shards' parts in shard order into the two visible files,
atomically too, so a reader never sees a partial file and a rerun rewrites them whole.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import time
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from lmbatch.io.writer import AtomicFile

PARTS_DIR = ".openai"
OUTPUT_FILE, ERROR_FILE = "output.jsonl", "errors.jsonl"
ERROR_CODE = "invalid_request"   # every error row is a request the engine could not run as given
# Our finish reasons as OpenAI's; "error" rows go to the error file instead.
FINISH_REASONS = {"stop": "stop", "length": "length"}
_COLUMNS = ("sample_index", "completion", "reasoning", "finish_reason", "error", "prompt_tokens",
            "completion_tokens", "cached_tokens", "model", "run_id", "reasoning_tokens")


def shard_lines(table: pa.Table, id_column: str, chat: bool, created: int) -> tuple[list[str], list[str]]:
    """(output lines, error lines) of an output table; `chat`: chat.completion bodies, else text_completion."""
    cols = [id_column, *(c for c in _COLUMNS if c in table.column_names)]
    ok, errors = [], []
    for samples in _requests(table.select(cols).to_pylist()):
        custom_id = str(samples[0][id_column])
        if samples[0]["finish_reason"] == "error":
            errors.append(_error_line(custom_id, samples[0]))
        else:
            ok.append(_output_line(custom_id, samples, chat, created))
    return ok, errors


def _requests(rows: list[dict]) -> Iterator[list[dict]]:
    """The rows of each input row: a run of sample_index 0, 1, ... (rows are in that order)."""
    group: list[dict] = []
    for row in rows:
        if row["sample_index"] == 0 and group:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _line_hash(run_id: str | None, custom_id: str) -> str:
    # Deterministic, so a part rebuilt from the Parquet file names its lines as the first did.
    return hashlib.sha256(f"{run_id}\0{custom_id}".encode()).hexdigest()[:24]


def _error_line(custom_id: str, row: dict) -> str:
    return json.dumps({"id": f"batch_req_{_line_hash(row['run_id'], custom_id)}", "custom_id": custom_id,
                       "response": None, "error": {"code": ERROR_CODE, "message": row["error"]}})


def _output_line(custom_id: str, samples: list[dict], chat: bool, created: int) -> str:
    first = samples[0]
    h = _line_hash(first["run_id"], custom_id)
    completion_tokens = sum(s["completion_tokens"] for s in samples)
    usage = {"prompt_tokens": first["prompt_tokens"], "completion_tokens": completion_tokens,
             "total_tokens": first["prompt_tokens"] + completion_tokens,
             "prompt_tokens_details": {"cached_tokens": first["cached_tokens"]},
             "completion_tokens_details": {"reasoning_tokens": sum(s.get("reasoning_tokens") or 0 for s in samples)}}
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{h}", "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": first["model"], "choices": [_choice(s, chat) for s in samples],
            "usage": usage, "system_fingerprint": None}
    return json.dumps({"id": f"batch_req_{h}", "custom_id": custom_id,
                       "response": {"status_code": 200, "request_id": f"req_{h}", "body": body}, "error": None})


def _choice(sample: dict, chat: bool) -> dict:
    # Our logprobs name token ids, OpenAI's name token strings: the Parquet output has them.
    reason = FINISH_REASONS.get(sample["finish_reason"], "stop")
    choice = {"index": sample["sample_index"], "logprobs": None, "finish_reason": reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": sample["completion"], "refusal": None}
        if sample.get("reasoning") is not None:   # as vLLM's reasoning parsers return it
            choice["message"]["reasoning_content"] = sample["reasoning"]
    else:
        choice["text"] = sample["completion"]
    return choice


def part_paths(shard_path: str) -> tuple[str, str]:
    """The hidden (output, errors) JSONL parts of the shard whose Parquet file is `shard_path`."""
    stem = posixpath.basename(shard_path).removesuffix(".parquet")
    parts = posixpath.join(posixpath.dirname(shard_path), PARTS_DIR)
    return f"{parts}/{stem}.output.jsonl", f"{parts}/{stem}.errors.jsonl"


def write_parts(table: pa.Table, shard_path: str, id_column: str, chat: bool,
                storage_options: dict | None = None) -> None:
    """Write a shard's lines as its two parts (each appears whole or not at all)."""
    for path, lines in zip(part_paths(shard_path), shard_lines(table, id_column, chat, int(time.time()))):
        with AtomicFile(path, storage_options) as f:
            f.write("".join(line + "\n" for line in lines).encode())


def remove_parts(shard_path: str, storage_options: dict | None = None) -> None:
    """Drop a shard's parts before its Parquet file is written again: parts never outlive their rows."""
    for path in part_paths(shard_path):
        fs, p = _fs(path, storage_options)
        if fs.exists(p):
            fs.rm(p)


def publish(run_dir: str, shard_paths: list[str], id_column: str, chat: bool,
            storage_options: dict | None = None) -> tuple[str, str]:
    """Concatenate the done shards' parts (in the given shard order) into the two visible files.

    A done shard without its parts (openai_jsonl chosen after it ran, or the parts deleted) gets
    them rebuilt from its Parquet file first. Returns the (output, errors) file paths.
    """
    for shard_path in shard_paths:
        if not all(_exists(p, storage_options) for p in part_paths(shard_path)):
            write_parts(_read_output(shard_path, storage_options), shard_path, id_column, chat, storage_options)
    targets = (f"{run_dir.rstrip('/')}/{OUTPUT_FILE}", f"{run_dir.rstrip('/')}/{ERROR_FILE}")
    for k, target in enumerate(targets):
        with AtomicFile(target, storage_options) as out:
            for shard_path in shard_paths:
                fs, p = _fs(part_paths(shard_path)[k], storage_options)
                with fs.open(p, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
    return targets


def _fs(path: str, storage_options: dict | None):
    return fsspec.core.url_to_fs(path, **(storage_options or {}))


def _exists(path: str, storage_options: dict | None) -> bool:
    fs, p = _fs(path, storage_options)
    return fs.exists(p)


def _read_output(shard_path: str, storage_options: dict | None) -> pa.Table:
    fs, p = _fs(shard_path, storage_options)
    with fs.open(p, "rb") as f:
        return pq.read_table(f)
