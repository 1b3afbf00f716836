"""OpenAI batch-format JSONL (one request per line), read as Arrow rows with a fixed schema.

A line looks like {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
"body": {"model": "...", "messages": [...], "max_tokens": 64, "temperature": 0.7}}. We map it
to columns named after our SamplingParams fields, so per-row sampling needs no configuration.
JSONL has no metadata: one streaming pass records the byte offset of every block of lines, and
a shard later seeks straight to its blocks.

A malformed line (bad JSON, no custom_id or body, `messages` not a list, a sampling value of the
wrong type) is a row like any other, with its reason and line number in the LINE_ERROR column;
prepare_requests makes it an error row, so one bad line never stops a job. Its id is its
custom_id when one can be read, else `<file>:line-<n>`. Only a file none of whose first lines is
a JSON object (not JSONL at all) is an InputError.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from lmbatch.io.spec import ROW_ERROR_COLUMN, SAMPLING_FIELD_KINDS, InputError, Unit

BLOCK_LINES = 2048
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# The SamplingParams fields a request body can set (_sampling maps OpenAI's names onto them);
# each column's Arrow type follows from the field's kind.
SAMPLING_COLUMNS = ["max_tokens", "temperature", "top_p", "seed", "stop", "n",
                    "presence_penalty", "frequency_penalty", "logprobs",
                    "structured_outputs.json", "structured_outputs.json_object"]   # from response_format
_ARROW_OF_KIND = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "str": pa.string(),
                  "str_list": pa.list_(pa.string()), "str_or_list": pa.list_(pa.string()),
                  "int_list": pa.list_(pa.int64())}
LINE_ERROR = ROW_ERROR_COLUMN   # why the line is not a valid request; null when it is one
SCHEMA = pa.schema([
    ("custom_id", pa.string()), ("messages", MESSAGE_TYPE), ("prompt", pa.string()), ("model", pa.string()),
    *[(name, _ARROW_OF_KIND[SAMPLING_FIELD_KINDS[name]]) for name in SAMPLING_COLUMNS],
    (LINE_ERROR, pa.string()),
])
# A value of each kind as a JSON body holds it (ints within int64, so Arrow can take them).
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63)
_STRS = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
_VALID = {"int": _INT, "float": lambda v: _INT(v) or isinstance(v, float), "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str), "str_list": _STRS, "str_or_list": _STRS,
          "int_list": lambda v: isinstance(v, list) and all(_INT(x) for x in v)}
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "str_list": "a list of strings", "str_or_list": "a string or a list of strings",
             "int_list": "a list of integers"}
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*("(?:[^"\\]|\\.)*")')


class MalformedLine(ValueError):
    """A line that is not a valid batch request: it becomes an error row with this reason."""


def scan_units(fs, path: str, bytes_per_token: int) -> tuple[list[Unit], pa.Schema]:
    """Blocks of BLOCK_LINES physical lines with their byte ranges and non-blank row counts."""
    units, offset = [], 0
    with fs.open(path, "rb") as f:
        while True:
            lines = [f.readline() for _ in range(BLOCK_LINES)]
            lines = [ln for ln in lines if ln]
            if not lines:
                break
            if not units:
                _check_is_jsonl(path, lines)
            nbytes = sum(len(ln) for ln in lines)
            rows = sum(1 for ln in lines if ln.strip())
            units.append(Unit(path, len(units), rows, max(1, nbytes // bytes_per_token), offset, nbytes))
            offset += nbytes
    return units, SCHEMA


def _check_is_jsonl(path: str, lines: list[bytes]) -> None:
    """A file none of whose first lines is a JSON object is not JSONL (a bad line among good is)."""
    filled = [ln for ln in lines if ln.strip()]
    if filled and not any(isinstance(_json_or_none(ln), dict) for ln in filled):
        raise InputError(f"{path}: not an OpenAI batch JSONL file: none of its first {len(filled)} "
                         "non-blank line(s) is a JSON object")


def _json_or_none(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def prompt_column(fs, path: str) -> str:
    """`messages` for the chat endpoint, `prompt` for completions (one endpoint per batch file)."""
    with fs.open(path, "rb") as f:
        for _, line in zip(range(BLOCK_LINES), f):
            obj = _json_or_none(line) if line.strip() else None
            if isinstance(obj, dict):   # the first request that can be read names the endpoint
                url = str(obj.get("url", ""))
                return "prompt" if url.rstrip("/").endswith("/v1/completions") else "messages"
    return "messages"


def read_block(fs, unit: Unit, batch_rows: int) -> Iterator[pa.RecordBatch]:
    with fs.open(unit.file, "rb") as f:
        f.seek(unit.offset)
        data = f.read(unit.nbytes)
    rows: list[dict[str, Any]] = []
    # Split on "\n" only, as readline() did when the block was scanned: same lines, same numbers.
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        rows.append(_parse_line(line, unit.file, unit.index * BLOCK_LINES + i + 1))
        if len(rows) == batch_rows:
            yield pa.RecordBatch.from_pylist(rows, schema=SCHEMA)
            rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def _parse_line(line: bytes, path: str, lineno: int) -> dict[str, Any]:
    custom_id = None
    try:
        obj = _json_object(line)
        custom_id = obj.get("custom_id")
        if custom_id is None or isinstance(custom_id, (dict, list)):
            raise MalformedLine("missing custom_id" if custom_id is None else "custom_id must be a string")
        return {"custom_id": str(custom_id), **_body_columns(obj.get("body")), LINE_ERROR: None}
    except MalformedLine as e:
        if custom_id is None or isinstance(custom_id, (dict, list)):
            custom_id = _salvaged_custom_id(line) or f"{posixpath.basename(path)}:line-{lineno}"
        reason = f"invalid request at line {lineno} of {posixpath.basename(path)}: {e}"
        return {**dict.fromkeys(SCHEMA.names), "custom_id": str(custom_id), LINE_ERROR: reason}


def _json_object(line: bytes) -> dict:
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        raise MalformedLine("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise MalformedLine(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise MalformedLine(f"the line is {_kind(obj)}, not a request object")
    return obj


def _salvaged_custom_id(line: bytes) -> str | None:
    """The custom_id of a line that does not parse, when its text still shows one."""
    m = _CUSTOM_ID.search(line)
    if m is None:
        return None
    try:
        return json.loads(m.group(1))
    except ValueError:
        return None


def _kind(v: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _body_columns(body: Any) -> dict[str, Any]:
    if body is None:
        raise MalformedLine("missing body")
    if not isinstance(body, dict):
        raise MalformedLine(f"body must be an object, not {_kind(body)}")
    return {
        "messages": _messages(body.get("messages")),
        "prompt": _prompt(body.get("prompt")),
        "model": _str_or_none(body.get("model")),
        **_checked({**_sampling(body), **_response_format(body.get("response_format"))}),
    }


def _response_format(fmt: Any) -> dict[str, Any]:
    """OpenAI's response_format as our structured outputs: a JSON schema (as text) or any object."""
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"structured_outputs.json_object": True}
    schema = (fmt.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if not isinstance(schema, dict):
        raise MalformedLine("body.response_format must be {type: text}, {type: json_object} or "
                            "{type: json_schema, json_schema: {schema: {...}}}")
    return {"structured_outputs.json": json.dumps(schema)}


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


def _messages(msgs: Any) -> list[dict[str, str | None]] | None:
    if msgs is None:
        return None
    if not isinstance(msgs, list):
        raise MalformedLine(f"body.messages must be a list, not {_kind(msgs)}")
    out = []
    for i, m in enumerate(msgs):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict):
            raise MalformedLine(f"{where} must be an object, not {_kind(m)}")
        if not isinstance(m.get("role"), str):
            raise MalformedLine(f"{where}.role must be a string, not {_kind(m.get('role'))}")
        out.append({"role": m["role"], "content": _content(m.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise MalformedLine(f"{where}.content must be a string or a list of content parts")
    # content parts: keep the text parts
    return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


def _prompt(p: Any) -> str | None:
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        return p[0]
    if p is None or isinstance(p, str):
        return p
    raise MalformedLine("body.prompt must be a string (token-id and multi-prompt lists are not supported)")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    stop = body.get("stop")
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool):  # chat endpoint: logprobs flag + top_logprobs count
        logprobs = (body.get("top_logprobs") or 0) if logprobs else None
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


def _checked(values: dict[str, Any]) -> dict[str, Any]:
    """Each value of the kind its column holds (a wrong type would fail the whole Arrow batch)."""
    for name, v in values.items():
        kind = SAMPLING_FIELD_KINDS[name]
        if v is not None and not _VALID[kind](v):
            raise MalformedLine(f"body.{name} must be {_EXPECTED[kind]}, not {_kind(v)} ({json.dumps(v)[:40]})")
    return values
