"""The job configuration: a YAML file validated by pydantic before any data or device is touched.

Every section forbids unknown keys, so a typo (`max_num_seq`) is an error instead of a silently
ignored setting that would cost a night of GPU time. Errors are raised as `ConfigError` whose
message is one line naming the file and the dotted key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmbatch.io.ordering import DEFAULT_POLICY, POLICIES

ORDERINGS = POLICIES  # Literal[...] needs a module-level tuple


class ConfigError(ValueError):
    """A configuration problem, with a one-line message meant for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Columns(_Strict):
    # None: the format's convention (OpenAI batch JSONL: custom_id and messages/prompt).
    id: str | None = None      # parquet, saved datasets: "id"
    prompt: str | None = None  # parquet, saved datasets: "prompt"
    # input column -> SamplingParams field (a list: same names; None: the format's convention,
    # e.g. body.max_tokens of OpenAI batch files); a non-null value in the row
    # overrides the `sampling` default for that row.
    sampling: dict[str, str] | list[str] | None = None
    passthrough: list[str] = Field(default_factory=list)


class InputConfig(_Strict):
    path: str  # a file, directory or glob; local or any fsspec URL (s3://, gs://, file://)
    format: Literal["auto", "parquet", "hf_disk", "openai_jsonl"] = "auto"
    columns: Columns = Field(default_factory=Columns)
    storage_options: dict[str, Any] = Field(default_factory=dict)


class OutputConfig(_Strict):
    path: str = "outputs"
    # One Parquet file per shard under <path>/<run_name>/ is the only layout: it is what makes a
    # shard the unit of resume and of atomic rename.
    partitioning: Literal["shard"] = "shard"
    storage_options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Strict):
    id: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


class EngineSection(_Strict):
    """EngineConfig fields other than the model's (see docs/engine-api.md)."""

    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_gb: float | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    seed: int = 0


class SamplingSection(_Strict):
    """Default SamplingParams (vLLM's names and defaults); per-row columns may override them."""

    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logprobs: int | None = Field(None, ge=0)
    # Exactly one output row per input row is a promise of the output format, so n is fixed at 1.
    n: Literal[1] = 1
    skip_special_tokens: bool = True

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self


class ShardsConfig(_Strict):
    target_rows: int | None = Field(None, ge=1)
    target_tokens: int | None = Field(None, ge=1)


class RayOptions(_Strict):
    address: str | None = None
    num_gpus_per_task: float = Field(1.0, ge=0)
    init_kwargs: dict[str, Any] = Field(default_factory=dict)


class RunnerConfig(_Strict):
    kind: Literal["local", "ray"] = "local"
    retries: int = Field(1, ge=0)
    retry_delay_s: float = Field(0.0, ge=0)
    # SIGTERM / SIGINT: how long the requests in flight may take to finish before the job stops
    drain_s: float = Field(30.0, ge=0)
    # A shard's finished rows become durable (hidden part files) every this many rows or seconds
    checkpoint_rows: int = Field(1000, ge=1)
    checkpoint_s: float = Field(15.0, gt=0)
    ray: RayOptions = Field(default_factory=RayOptions)


class DbConfig(_Strict):
    # None: LMBATCH_DB_URL if set, else sqlite:///<output.path>/lmbatch.db
    url: str | None = None


class CostConfig(_Strict):
    price_per_device_hour: float = Field(0.0, ge=0)


class DemoConfig(_Strict):
    """Present only in the demo config: build the toy model and prompts here on first use."""

    dir: str = ".demo"
    rows: int = Field(240, ge=1)


class TestingConfig(_Strict):
    """Failure injection for tests and drills: the listed shard indexes raise in their task."""

    fail_shards: list[int] = Field(default_factory=list)
    # None: fail every attempt; N: fail only the first N attempts (so a retry can succeed).
    fail_attempts: int | None = Field(None, ge=1)


class JobConfig(_Strict):
    name: str = "lmbatch"
    input: InputConfig
    output: OutputConfig = Field(default_factory=OutputConfig)
    model: ModelConfig
    engine: EngineSection = Field(default_factory=EngineSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    ordering: Literal[ORDERINGS] = DEFAULT_POLICY
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    db: DbConfig = Field(default_factory=DbConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    demo: DemoConfig | None = None
    testing: TestingConfig = Field(default_factory=TestingConfig)

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
        return {
            "model": self.model.id, "dtype": self.model.dtype, "device": self.model.device,
            "trust_remote_code": self.model.trust_remote_code, **self.engine.model_dump(),
        }

    def sampling_kwargs(self) -> dict[str, Any]:
        return self.sampling.model_dump()

    def db_url(self) -> str:
        if self.db.url:
            return self.db.url
        if os.environ.get("LMBATCH_DB_URL"):
            return os.environ["LMBATCH_DB_URL"]
        return f"sqlite:///{Path(self.output.path) / 'lmbatch.db'}"

    def fingerprint(self) -> str:
        """Hash of everything that changes the outputs (not the runner, db, cost or test hooks)."""
        keep = self.model_dump(include={"input", "model", "engine", "sampling", "ordering", "shards"})
        blob = json.dumps(keep, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_error(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
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
