"""The job configuration: a YAML file validated by pydantic before any data or device is touched.

Every section forbids unknown keys, so a typo (`max_num_seq`) is an error instead of a silently
ignored setting that would cost a night of GPU time. Errors are raised as `ConfigError` whose
message is one line naming the file and the dotted key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from lmbatch.engine import EngineConfig, SamplingParams
from lmbatch.flows.sections import Strict, derive_section, job_key_decision, key_field
from lmbatch.io.ordering import DEFAULT_ORDERING, ORDERINGS
from lmbatch.io.rundb import DEFAULT_OUTPUT_PATH, resolve_db_url
from lmbatch.io.spec import FORMATS


class ConfigError(ValueError):
    """A configuration problem, with a one-line message meant for the user."""


# Every field states whether it counts in the job key (key_field(job_key=...), or the engine's
# setting(affects_outputs=...) for derived sections): a change to one that counts starts a new
# job; one that does not (batch sizes, ordering, runner, database, cost) resumes the old one.
# tests/flows/test_job_key.py refuses a field without a decision.


class Columns(Strict):
    # None: the format's convention (OpenAI batch JSONL: custom_id and messages/prompt).
    id: str | None = key_field(None, job_key=True)      # parquet, saved datasets: "id"
    prompt: str | None = key_field(None, job_key=True)  # parquet, saved datasets: "prompt"
    # input column -> SamplingParams field (a list: same names; None: the format's convention,
    # e.g. body.max_tokens of OpenAI batch files); a non-null value in the row
    # overrides the `sampling` default for that row.
    sampling: dict[str, str] | list[str] | None = key_field(None, job_key=True)
    passthrough: list[str] = key_field(default_factory=list, job_key=True)
    # a column of JSON objects: this row's chat template kwargs, over input.chat_template_kwargs
    chat_template_kwargs: str | None = key_field(None, job_key=True)


class InputConfig(Strict):
    # a file, directory or glob; local or any fsspec URL (s3://, gs://, file://)
    path: str = key_field(job_key=True)
    format: Literal[FORMATS] = key_field("auto", job_key=True)
    columns: Columns = key_field(default_factory=Columns, job_key=True)
    storage_options: dict[str, Any] = key_field(default_factory=dict, job_key=True)
    # chat prompts: keyword arguments of the model's chat template, e.g. {enable_thinking: false}
    chat_template_kwargs: dict[str, Any] = key_field(default_factory=dict, job_key=True)


OUTPUT_FORMATS = ("parquet", "openai_jsonl")


class OutputConfig(Strict):
    # The job key takes the run's output folder itself (flows/job.py:job_identity).
    path: str = key_field(DEFAULT_OUTPUT_PATH, job_key=False)
    # One Parquet file per shard under <path>/<run_name>/ is the only layout: it is what makes a
    # shard the unit of resume and of atomic rename.
    partitioning: Literal["shard"] = key_field("shard", job_key=False)
    # "parquet", "openai_jsonl" or both: openai_jsonl adds <run>/output.jsonl and errors.jsonl in
    # OpenAI Batch's format. The Parquet shard files are written either way: they are the record
    # a rerun resumes from, and the JSONL files are built from the same rows, so the format does
    # not count in the job key (adding openai_jsonl to a finished job just writes its JSONL).
    format: list[str] = key_field(default_factory=lambda: ["parquet"], job_key=False)
    storage_options: dict[str, Any] = key_field(default_factory=dict, job_key=False)

    @field_validator("format", mode="before")
    @classmethod
    def _formats(cls, value: Any) -> list[str]:
        choices = " or ".join(OUTPUT_FORMATS)
        if isinstance(value, str):
            value = [value] if value in OUTPUT_FORMATS else None
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {choices}, or a list of them")
        for v in value:
            if v not in OUTPUT_FORMATS:
                raise ValueError(f"{v!r} is not an output format; must be {choices}")
        return list(dict.fromkeys(value))

    @property
    def openai_jsonl(self) -> bool:
        return "openai_jsonl" in self.format


_MODEL_FIELDS = ("dtype", "device", "trust_remote_code")   # the rest of EngineConfig is `engine:`

ModelConfig = derive_section(
    "ModelConfig", EngineConfig, fields=_MODEL_FIELDS, placeholders={"model": ""},
    overrides={"id": (str, key_field(job_key=True))}, doc="The model: EngineConfig's model fields.")

EngineSection = derive_section(
    "EngineSection", EngineConfig, exclude=("model", *_MODEL_FIELDS), placeholders={"model": ""},
    doc="EngineConfig fields other than the model's (see docs/engine-api.md).")

# n > 1 writes n output rows per input row (their `sample_index` 0..n-1; io/writer.py).
SamplingSection = derive_section(
    "SamplingSection", SamplingParams,
    doc="Default SamplingParams (vLLM's names and defaults); per-row columns may override them.")


class ShardsConfig(Strict):
    target_rows: int | None = key_field(None, job_key=True, ge=1)
    target_tokens: int | None = key_field(None, job_key=True, ge=1)


class RayOptions(Strict):
    # None: a Ray of this machine's own, one task per GPU, on the job's Prefect server and SQLite
    address: str | None = key_field(None, job_key=False)
    num_gpus_per_task: float = key_field(1.0, job_key=False, ge=0)
    init_kwargs: dict[str, Any] = key_field(default_factory=dict, job_key=False)


class TaskRunnerSection(Strict):
    """`runner:` how the flow runs its shard tasks (Prefect's task runner): here or on Ray."""

    kind: Literal["local", "ray"] = key_field("local", job_key=False)
    retries: int = key_field(1, job_key=False, ge=0)
    retry_delay_s: float = key_field(0.0, job_key=False, ge=0)
    # SIGTERM / SIGINT: how long the requests in flight may take to finish before the job stops
    drain_s: float = key_field(30.0, job_key=False, ge=0)
    # A shard's finished rows become durable (hidden part files) every this many rows or seconds
    checkpoint_rows: int = key_field(1000, job_key=False, ge=1)
    checkpoint_s: float = key_field(15.0, job_key=False, gt=0)
    ray: RayOptions = key_field(default_factory=RayOptions, job_key=False)


class DbConfig(Strict):
    # None: $LMBATCH_DB_URL if set, else sqlite:///<output.path>/lmbatch.db (io.resolve_db_url)
    url: str | None = key_field(None, job_key=False)


class CostConfig(Strict):
    price_per_device_hour: float = key_field(0.0, job_key=False, ge=0)


class DemoConfig(Strict):
    """Present only in the demo config: build the toy model and prompts here on first use."""

    dir: str = key_field(".demo", job_key=False)     # the paths it implies are in input/model
    rows: int = key_field(240, job_key=False, ge=1)


class TestingConfig(Strict):
    """Failure injection for tests and drills: the listed shard indexes raise in their task."""

    fail_shards: list[int] = key_field(default_factory=list, job_key=False)
    # None: fail every attempt; N: fail only the first N attempts (so a retry can succeed).
    fail_attempts: int | None = key_field(None, job_key=False, ge=1)


class JobConfig(Strict):
    name: str = key_field("lmbatch", job_key=False)   # the default run name's prefix
    input: InputConfig = key_field(job_key=True)
    output: OutputConfig = key_field(default_factory=OutputConfig, job_key=False)
    model: ModelConfig = key_field(job_key=True)
    engine: EngineSection = key_field(default_factory=EngineSection, job_key=True)
    sampling: SamplingSection = key_field(default_factory=SamplingSection, job_key=True)
    # Greedy outputs do not depend on the order (tests/io/test_io_end_to_end.py).
    ordering: Literal[ORDERINGS] = key_field(DEFAULT_ORDERING, job_key=False)
    shards: ShardsConfig = key_field(default_factory=ShardsConfig, job_key=True)
    runner: TaskRunnerSection = key_field(default_factory=TaskRunnerSection, job_key=False)
    db: DbConfig = key_field(default_factory=DbConfig, job_key=False)
    cost: CostConfig = key_field(default_factory=CostConfig, job_key=False)
    demo: DemoConfig | None = key_field(None, job_key=False)
    testing: TestingConfig = key_field(default_factory=TestingConfig, job_key=False)

    @model_validator(mode="before")
    @classmethod
    def _demo_defaults(cls, data: Any) -> Any:
        # The demo config names no paths: they follow from the demo's dir and row count.
        if isinstance(data, dict) and isinstance(data.get("demo"), dict):
            demo = DemoConfig.model_validate(data["demo"])
            data = dict(data)
            inp = dict(data.get("input") or {})
            inp.setdefault("path", f"{demo.dir}/prompts-{demo.rows}.parquet")
            model = dict(data.get("model") or {})
            model.setdefault("id", f"{demo.dir}/model")
            data["input"], data["model"] = inp, model
        return data

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of lmbatch.engine.EngineConfig."""
        model = self.model.model_dump()
        return {"model": model.pop("id"), **model, **self.engine.model_dump()}

    def sampling_kwargs(self) -> dict[str, Any]:
        return self.sampling.model_dump()

    def db_url(self) -> str:
        return resolve_db_url(self.db.url, self.output.path)

    def key_values(self) -> dict[str, Any]:
        """The settings that count in the job key, as JSON (flows/job.py:job_identity hashes it)."""
        return _key_values(self)


def _key_values(section: BaseModel) -> dict[str, Any]:
    out = {}
    for name, field in type(section).model_fields.items():
        if not job_key_decision(field):
            continue
        value = getattr(section, name)
        out[name] = _key_values(value) if isinstance(value, BaseModel) else _json(value)
    return out


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _format_error(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    name = str(err["loc"][-1]) if err["loc"] else ""
    if name and msg.startswith(f"{name} "):   # a setting's own check: "engine.seed must be ..."
        return f"{where}{msg[len(name):]}{shown}"
    return f"{where}: {msg}{shown}"


def validate_config(data: dict, source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        parts = [_format_error(err) for err in e.errors()]
        raise ConfigError(f"{source}: " + "; ".join(parts)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`engine.max_num_seqs=64` -> (["engine", "max_num_seqs"], 64); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. engine.max_num_seqs=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[: i + 1])} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{line}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(data, source=str(path))
