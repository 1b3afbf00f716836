"""Validate an input before any compute: one clear InputError naming the file and column.

Checks run on metadata and schemas first (missing columns, wrong types) and only then stream
the id column (duplicates, nulls), so a misconfigured job fails in seconds and writes nothing.
Row-level problems (a null prompt, a bad temperature, a malformed JSONL line) are not input
errors: they become error rows at run time, because one bad prompt must not stop a million-row job.
"""

from __future__ import annotations

import dataclasses
import itertools

import pyarrow as pa

from lmbatch.io import inputs, openai_jsonl
from lmbatch.io.spec import SAMPLING_FIELD_KINDS, InputError, InputInfo, InputSpec
from lmbatch.io.writer import RESULT_COLUMNS

MAX_DUPLICATES_SHOWN = 5


def inspect_input(spec: InputSpec) -> InputInfo:
    """Resolve, list and validate an input; raises InputError on the first problem found."""
    fs, root = inputs.get_fs(spec)
    fmt = spec.format if spec.format != "auto" else inputs.detect_format(fs, root)
    files = inputs.list_files(fs, root, fmt)
    spec = resolve_spec(spec, fs, fmt, files)
    units, schemas = inputs.list_units(fs, files, fmt, spec.prompt_column)
    columns = read_columns(spec)
    for path, schema in schemas.items():
        check_schema(spec, schema, path)
    first = schemas[files[0]]
    for path, schema in schemas.items():
        for col in columns:
            if schema.field(col).type != first.field(col).type:
                raise InputError(f"{path}: column {col!r} has type {schema.field(col).type}, "
                                 f"but {files[0]} has {first.field(col).type}")
    info = InputInfo(spec=spec, files=files, schema=pa.schema([first.field(c) for c in columns]),
                     num_rows=sum(u.num_rows for u in units), units=units,
                     fingerprint=inputs.fingerprint(fs, root, files, fmt),
                     prompt_kind=prompt_kind(first.field(spec.prompt_column).type))
    if info.num_rows == 0:
        raise InputError(f"input {spec.path!r}: no rows")
    check_ids(fs, info)
    return info


def resolve_spec(spec: InputSpec, fs, fmt: str, files: list[str]) -> InputSpec:
    """Fill the format's conventions into the columns the user left unset."""
    if fmt == "openai_jsonl":
        return dataclasses.replace(
            spec, format=fmt, id_column=spec.id_column or "custom_id",
            prompt_column=spec.prompt_column or openai_jsonl.prompt_column(fs, files[0]),
            sampling_columns=(openai_jsonl.SAMPLING_COLUMNS if spec.sampling_columns is None
                              else spec.sampling_columns))
    return dataclasses.replace(spec, format=fmt, id_column=spec.id_column or "id",
                               prompt_column=spec.prompt_column or "prompt")


def read_columns(spec: InputSpec) -> list[str]:
    """The input columns a job reads, in a fixed order, each once (for OpenAI JSONL, also each
    line's error: a malformed line is an error row, openai_jsonl.mark_line_errors)."""
    cols = [spec.id_column, spec.prompt_column, *spec.sampling_map, *spec.passthrough_columns,
            *([spec.chat_template_kwargs_column] if spec.chat_template_kwargs_column else [])]
    if spec.format == "openai_jsonl":
        cols.append(openai_jsonl.LINE_ERROR)
    return list(dict.fromkeys(cols))


def check_schema(spec: InputSpec, schema: pa.Schema, path: str) -> None:
    for col in read_columns(spec):
        if col not in schema.names:
            raise InputError(f"{path}: column {col!r} not found (columns: {', '.join(schema.names)})")
    id_type = schema.field(spec.id_column).type
    if not (_is_string(id_type) or pa.types.is_integer(id_type)):
        raise InputError(f"{path}: id column {spec.id_column!r} must be string or integer, not {id_type}")
    if prompt_kind(schema.field(spec.prompt_column).type) is None:
        raise InputError(f"{path}: prompt column {spec.prompt_column!r} has type "
                         f"{schema.field(spec.prompt_column).type}; expected a string, a list of token "
                         "ids, or a list of chat messages (struct with role and content)")
    for col, name in spec.sampling_map.items():
        _check_sampling_column(path, col, name, schema.field(col).type)
    for col in spec.passthrough_columns:
        if col in RESULT_COLUMNS:
            raise InputError(f"{path}: passthrough column {col!r} clashes with an output column")


def prompt_kind(t: pa.DataType) -> str | None:
    if _is_string(t):
        return "text"
    if _is_list(t) and pa.types.is_integer(t.value_type):
        return "token_ids"
    if _is_list(t) and pa.types.is_struct(t.value_type):
        names = {t.value_type.field(i).name for i in range(t.value_type.num_fields)}
        return "messages" if {"role", "content"} <= names else None
    return None


def _check_sampling_column(path: str, col: str, name: str, t: pa.DataType) -> None:
    kind = SAMPLING_FIELD_KINDS.get(name)
    if kind is None:
        raise InputError(f"{path}: sampling column {col!r} maps to {name!r}, which is not a per-row "
                         f"sampling field ({', '.join(SAMPLING_FIELD_KINDS)})")
    ok = {
        "int": pa.types.is_integer(t),
        "float": pa.types.is_integer(t) or pa.types.is_floating(t),
        "bool": pa.types.is_boolean(t),
        "str": _is_string(t),
        "str_list": _is_list(t) and _is_string(t.value_type),
        "str_or_list": _is_string(t) or (_is_list(t) and _is_string(t.value_type)),
        "int_list": _is_list(t) and pa.types.is_integer(t.value_type),
    }[kind]
    if not (ok or pa.types.is_null(t)):
        raise InputError(f"{path}: sampling column {col!r} ({name}) has type {t}, expected {kind}")


def check_ids(fs, info: InputInfo) -> None:
    """Stream the id column once: no nulls, no duplicates (the first few are named)."""
    spec = info.spec
    if not spec.check_duplicate_ids:
        return
    seen, dups = set(), []
    for path, ids in _iter_ids(fs, info):
        if ids.null_count:
            raise InputError(f"{path}: id column {spec.id_column!r} has {ids.null_count} null "
                             "value(s); every row needs an id to join outputs to inputs")
        for v in ids.to_pylist():
            if v in seen:
                dups.append(v)
            seen.add(v)
        if len(dups) >= MAX_DUPLICATES_SHOWN:
            break
    if dups:
        shown = ", ".join(repr(d) for d in dups[:MAX_DUPLICATES_SHOWN])
        raise InputError(f"input {spec.path!r}: id column {spec.id_column!r} has duplicate values: {shown}")


def _iter_ids(fs, info: InputInfo):
    for path, units in itertools.groupby(info.units, key=lambda u: u.file):
        parts = ((u, 0, None) for u in units)
        for batch in inputs.read_units(fs, info.spec.format, parts, [info.spec.id_column]):
            yield path, batch.column(0)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
