"""Turn a shard's rows into engine requests: token ids and SamplingParams per row, or an error.

Tokenization is batched (one call of the fast tokenizer for the whole shard), chat messages go
through the model's chat template, and every row-level problem (null or empty prompt, a prompt
too long for the model, a bad per-row sampling value) becomes an error row with its reason:
one bad prompt never stops a shard.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from lmbatch.engine.prompt_rules import prompt_problem
from lmbatch.io.spec import ROW_ERROR_COLUMN, InputSpec
from lmbatch.io.validate import prompt_kind


@dataclass
class PreparedShard:
    """A shard ready for the engine; lists are indexed by row position in the shard."""

    input_columns: pa.Table  # id + passthrough columns, copied to the output as they are
    prompt_ids: list[list[int] | None]
    sampling: list[Any]  # SamplingParams, or None for an error row
    errors: list[str | None]
    with_logprobs: bool

    @property
    def num_rows(self) -> int:
        return len(self.errors)

    @property
    def valid_rows(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is None]


def prepare_requests(table: pa.Table, spec: InputSpec, tokenizer, default_sampling: dict | None,
                     max_model_len: int) -> PreparedShard:
    """Tokenize and validate a shard's rows (`spec` is the resolved `InputInfo.spec`).

    A prompt must leave room for one output token; a longer `max_tokens` is capped to what
    fits in `max_model_len`, and the completion then ends with finish_reason "length".
    """
    n = table.num_rows
    errors: list[str | None] = [None] * n
    prompt_ids = tokenize_prompts(table.column(spec.prompt_column), tokenizer, errors, _template_kwargs(table, spec))
    _reader_errors(table, errors, prompt_ids)
    sampling = [None] * n
    overrides = _row_overrides(table, spec, n)
    vocab = len(tokenizer)
    for i in range(n):
        if errors[i] is None:
            errors[i] = prompt_problem(prompt_ids[i], max_model_len, vocab)
        if errors[i] is None:
            sampling[i], errors[i] = _sampling_params(default_sampling or {}, overrides[i],
                                                      len(prompt_ids[i]), max_model_len)
    keep = [spec.id_column, *[c for c in spec.passthrough_columns if c != spec.id_column]]
    with_logprobs = any(s is not None and s.logprobs is not None for s in sampling)
    return PreparedShard(table.select(keep), prompt_ids, sampling, errors, with_logprobs)


def _reader_errors(table: pa.Table, errors: list[str | None], prompt_ids: list) -> None:
    """Rows the reader found invalid (ROW_ERROR_COLUMN, e.g. a malformed JSONL line) get its reason
    (their prompt was read as null: not "empty prompt")."""
    if ROW_ERROR_COLUMN in table.column_names:
        for i, reason in enumerate(table.column(ROW_ERROR_COLUMN).to_pylist()):
            if reason is not None:
                errors[i], prompt_ids[i] = reason, None


def tokenize_prompts(column: pa.ChunkedArray, tokenizer, errors: list[str | None],
                     template_kwargs: list[dict | str] | None = None) -> list[list[int] | None]:
    """Token ids per row; rows that cannot be tokenized get their reason in `errors`.

    `template_kwargs[i]`: the chat template's keyword arguments for row i (or why they are bad)."""
    kind = prompt_kind(column.type)
    values = column.to_pylist()
    if kind == "token_ids":
        out = [list(v) if v else None for v in values]
        for i, v in enumerate(out):
            if v is None:
                errors[i] = "empty prompt"
            elif any(t is None for t in v):
                errors[i], out[i] = "prompt token ids contain null", None
        return out
    texts: list[str | None] = [None] * len(values)
    for i, v in enumerate(values):
        texts[i], errors[i] = _prompt_text(v, kind, tokenizer, template_kwargs[i] if template_kwargs else {})
    todo = [i for i, t in enumerate(texts) if t is not None]
    out: list[list[int] | None] = [None] * len(values)
    # Chat templates already contain the model's special tokens (BOS etc.): do not add twice.
    encoded = tokenizer([texts[i] for i in todo], add_special_tokens=(kind == "text"))["input_ids"] if todo else []
    for i, ids in zip(todo, encoded):
        out[i] = list(ids)
    return out


def _prompt_text(value: Any, kind: str, tokenizer, template_kwargs: dict | str) -> tuple[str | None, str | None]:
    if value is None or (kind == "text" and not value.strip()) or (kind == "messages" and not value):
        return None, "empty prompt"
    if kind == "text":
        return value, None
    if isinstance(template_kwargs, str):   # the row's kwargs column could not be read
        return None, template_kwargs
    try:
        messages = [{"role": m["role"], "content": m["content"] or ""} for m in value]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **template_kwargs), None
    except Exception as e:  # noqa: BLE001 - a missing or failing template is this row's problem, not the job's
        return None, f"chat template failed: {type(e).__name__}: {e}"


def _template_kwargs(table: pa.Table, spec: InputSpec) -> list[dict | str]:
    """Per row: the job's chat template kwargs updated by the row's (a JSON object's text), or
    the reason the row's value cannot be used."""
    rows: list[dict | str] = [dict(spec.chat_template_kwargs)] * table.num_rows
    if not spec.chat_template_kwargs_column:
        return rows
    for i, raw in enumerate(table.column(spec.chat_template_kwargs_column).to_pylist()):
        if raw is None:
            continue
        try:
            value = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError as e:
            rows[i] = f"chat_template_kwargs is not valid JSON: {e}"
            continue
        rows[i] = {**spec.chat_template_kwargs, **value} if isinstance(value, dict) else \
            "chat_template_kwargs must be a JSON object"
    return rows


def _row_overrides(table: pa.Table, spec: InputSpec, n: int) -> list[dict[str, Any]]:
    """Per-row sampling values; null means "use the job's default"."""
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for col, name in spec.sampling_map.items():
        for i, v in enumerate(table.column(col).to_pylist()):
            if v is not None:
                rows[i][name] = v
    return rows


def _sampling_params(defaults: dict, override: dict, prompt_len: int, max_model_len: int):
    from lmbatch.engine import SamplingParams

    kw = {**defaults, **_nested(override)}
    room = max_model_len - prompt_len
    kw["max_tokens"] = room if kw.get("max_tokens") is None else min(kw["max_tokens"], room)
    try:
        return SamplingParams(**kw), None
    except (ValueError, TypeError) as e:
        return None, f"bad sampling value: {e}"


def _nested(override: dict[str, Any]) -> dict[str, Any]:
    """Dotted per-row names (structured_outputs.json) as nested values. A row's constraint replaces
    the job's default constraint whole: a row with a regex does not also keep the default schema."""
    out = {k: v for k, v in override.items() if "." not in k}
    for key, value in override.items():
        if "." in key:
            outer, inner = key.split(".", 1)
            out.setdefault(outer, {})[inner] = value
    return out


def prompt_token_lists(prepared: PreparedShard) -> Sequence[list[int]]:
    """Token ids of the valid rows, in the order of `prepared.valid_rows`."""
    return [prepared.prompt_ids[i] for i in prepared.valid_rows]
