"""What a job reads: the input specification, what inspecting it finds, and its one error type.

These are plain dataclasses so that a flow can build them from its validated config and ship
them to a worker process (Prefect task, Ray actor) by pickling or as JSON via `to_dict`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from lmbatch.engine.sampling_params import SamplingParams

FORMATS = ("auto", "parquet", "hf_disk", "openai_jsonl")
# A reader may add this column: why the row is not a valid request (a malformed JSONL line), null
# when it is one. prepare_requests makes such a row an error row with that reason.
ROW_ERROR_COLUMN = "_line_error"

# A SamplingParams field's type -> the kind of value a per-row column of it holds. A JSON value
# (a schema) is held as its JSON text.
_KIND_OF_TYPES = {(int,): "int", (float,): "float", (bool,): "bool", (str,): "str", (list[str],): "str_list",
                  (list[str], str): "str_or_list", (list[int],): "int_list", (dict[str, Any], str): "str"}


def _field_kinds(cls: type, prefix: str = "") -> dict[str, str]:
    """Field name -> value kind; a field holding a dataclass (structured_outputs) gives one
    dotted name per field of it (structured_outputs.json, structured_outputs.regex, ...)."""
    hints, kinds = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        types = tuple(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        if len(types) == 1 and dataclasses.is_dataclass(types[0]):
            kinds.update(_field_kinds(types[0], f"{prefix}{f.name}."))
        else:
            kinds[prefix + f.name] = _KIND_OF_TYPES[types]
    return kinds


# Per-row sampling columns are matched to SamplingParams fields by name; the value kind decides
# which Arrow types a column may have (checked before any compute). Derived from SamplingParams
# itself, so a new sampling field is a per-row column at once.
SAMPLING_FIELD_KINDS: dict[str, str] = _field_kinds(SamplingParams)


class InputError(ValueError):
    """The input cannot be used as configured; the message names the file and column."""


@dataclass(frozen=True)
class InputSpec:
    """Where the prompts are and how their columns map onto requests and outputs.

    `sampling_columns` maps a column name to a SamplingParams field (a list means "same name").
    `id_column`/`prompt_column` left as None take the format's convention: OpenAI batch JSONL
    `custom_id` and `messages` (chat) or `prompt` (completions); otherwise `id` and `prompt`.
    `sampling_columns` left as None means none, except for OpenAI JSONL where it means the
    body's sampling fields (max_tokens, temperature, ...).
    """

    path: str
    format: str = "auto"
    id_column: str | None = None
    prompt_column: str | None = None
    sampling_columns: dict[str, str] | list[str] | None = None
    passthrough_columns: list[str] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict)
    check_duplicate_ids: bool = True
    # Chat prompts: keyword arguments of the model's chat template (enable_thinking: false), for
    # every row, and a column whose non-null values (a JSON object's text) override them per row.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs_column: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"input format {self.format!r} is not one of {', '.join(FORMATS)}")

    @property
    def sampling_map(self) -> dict[str, str]:
        """column -> SamplingParams field."""
        cols = self.sampling_columns or {}
        return dict(cols) if isinstance(cols, dict) else {c: c for c in cols}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(**d)


@dataclass(frozen=True)
class Unit:
    """The smallest readable piece of an input: a Parquet row group, an Arrow record batch of a
    saved dataset, or a block of JSONL lines (`offset`/`nbytes` locate it in the file)."""

    file: str
    index: int
    num_rows: int
    est_tokens: int
    offset: int = 0
    nbytes: int = 0


@dataclass
class InputInfo:
    """The result of `inspect_input`: a resolved, validated view of the input."""

    spec: InputSpec  # resolved: format, id/prompt/sampling columns filled in
    files: list[str]
    schema: Any  # pyarrow.Schema of the rows as read_shard returns them
    num_rows: int
    units: list[Unit]
    fingerprint: str
    prompt_kind: str  # "text" | "token_ids" | "messages"

    @property
    def est_tokens(self) -> int:
        return sum(u.est_tokens for u in self.units)
