"""OpenAI batch-format JSONL (one request per line), read as Arrow rows with a fixed schema.

A line looks like {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
"body": {"model": "...", "messages": [...], "max_tokens": 64, "temperature": 0.7}}. We map it
to columns named after our SamplingParams fields, so per-row sampling needs no configuration.
JSONL has no metadata: one streaming pass records the byte offset of every block of lines, and
a shard later seeks straight to its blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from lmbatch.io.spec import SAMPLING_FIELD_KINDS, InputError, Unit

BLOCK_LINES = 2048
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# The SamplingParams fields a request body can set (_sampling maps OpenAI's names onto them);
# each column's Arrow type follows from the field's kind.
SAMPLING_COLUMNS = ["max_tokens", "temperature", "top_p", "seed", "stop", "n",
                    "presence_penalty", "frequency_penalty", "logprobs"]
_ARROW_OF_KIND = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
                  "str_or_list": pa.list_(pa.string()), "int_list": pa.list_(pa.int64())}
SCHEMA = pa.schema([
    ("custom_id", pa.string()), ("messages", MESSAGE_TYPE), ("prompt", pa.string()), ("model", pa.string()),
    *[(name, _ARROW_OF_KIND[SAMPLING_FIELD_KINDS[name]]) for name in SAMPLING_COLUMNS],
])


def scan_units(fs, path: str, bytes_per_token: int) -> tuple[list[Unit], pa.Schema]:
    """Blocks of BLOCK_LINES physical lines with their byte ranges and non-blank row counts."""
    units, offset = [], 0
    with fs.open(path, "rb") as f:
        while True:
            lines = [f.readline() for _ in range(BLOCK_LINES)]
            lines = [ln for ln in lines if ln]
            if not lines:
                break
            nbytes = sum(len(ln) for ln in lines)
            rows = sum(1 for ln in lines if ln.strip())
            units.append(Unit(path, len(units), rows, max(1, nbytes // bytes_per_token), offset, nbytes))
            offset += nbytes
    return units, SCHEMA


def prompt_column(fs, path: str) -> str:
    """`messages` for the chat endpoint, `prompt` for completions (one endpoint per batch file)."""
    with fs.open(path, "rb") as f:
        for line in f:
            if line.strip():
                url = str(json.loads(line).get("url", ""))
                return "prompt" if url.rstrip("/").endswith("/v1/completions") else "messages"
    return "messages"


def read_block(fs, unit: Unit, batch_rows: int) -> Iterator[pa.RecordBatch]:
    with fs.open(unit.file, "rb") as f:
        f.seek(unit.offset)
        data = f.read(unit.nbytes)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        rows.append(_parse_line(line, unit.file, unit.index * BLOCK_LINES + i + 1))
        if len(rows) == batch_rows:
            yield pa.RecordBatch.from_pylist(rows, schema=SCHEMA)
            rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def _parse_line(line: bytes, path: str, lineno: int) -> dict[str, Any]:
    try:
        obj = json.loads(line)
        body = obj.get("body") or {}
        if not isinstance(body, dict):
            raise TypeError("body is not an object")
        return {
            "custom_id": _str_or_none(obj.get("custom_id")),
            "messages": _messages(body.get("messages")),
            "prompt": _prompt(body.get("prompt")),
            "model": _str_or_none(body.get("model")),
            **_sampling(body),
        }
    except (ValueError, TypeError, AttributeError) as e:
        raise InputError(f"{path}:{lineno}: not a valid OpenAI batch request line ({e})") from e


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


def _messages(msgs: Any) -> list[dict[str, str]] | None:
    if msgs is None:
        return None
    out = []
    for m in msgs:
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        out.append({"role": str(m["role"]), "content": content})
    return out


def _prompt(p: Any) -> str | None:
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        return p[0]
    return p if isinstance(p, str) else None


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    stop = body.get("stop")
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool):  # chat endpoint: logprobs flag + top_logprobs count
        logprobs = int(body.get("top_logprobs") or 0) if logprobs else None
    return {
        "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
        "stop": [stop] if isinstance(stop, str) else stop,
        "n": body.get("n"),
        "presence_penalty": body.get("presence_penalty"),
        "frequency_penalty": body.get("frequency_penalty"),
        "logprobs": logprobs,
    }
