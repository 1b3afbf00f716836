"""What the flow's tasks hand each other: small typed records, never tables.

plan -> RunPlan -> one shard task per ShardPlan -> ShardManifest (or a ShardFailure) -> roll-up.
They travel by pickle (Prefect in-process, Ray to a worker); the flow's own result is their
`as_dict()` forms, so the CLI, a deployment and the tests read plain JSON-able dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

from lmbatch import io


class ShardOutcome(StrEnum):
    DONE = "done"                 # written and recorded by this run
    HELD = "held"                 # a live run of the same job holds it: left to that run
    INTERRUPTED = "interrupted"   # drained by a signal: finished rows kept, the rest not done


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    run_name: str
    job_key: str
    output_dir: str
    spec: io.InputSpec            # resolved: format and columns filled in
    num_rows: int
    num_shards: int
    to_run: list[io.ShardPlan]
    skipped: list[int]            # shard indexes done by earlier runs
    shard_keys: list[str]         # every shard of this plan (the roll-up counts only these)
    prompt_kind: str = "text"     # io.InputInfo.prompt_kind: "messages" makes OpenAI chat.completion bodies

    @property
    def chat(self) -> bool:
        return self.prompt_kind == "messages"


@dataclass(frozen=True)
class ShardManifest:
    shard: int
    key: str
    status: ShardOutcome
    reason: str | None = None     # held / interrupted: why
    path: str | None = None       # done: the shard's Parquet file
    rows: int = 0
    error_rows: int = 0
    completion_tokens: int = 0
    resumed_rows: int = 0         # rows taken from an earlier attempt's checkpoints
    wall_s: float = 0.0
    host: str | None = None       # where it ran (on Ray: which worker on which node)
    pid: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ShardFailure:
    shard: int
    key: str
    message: str
    held: bool = False
    interrupted: bool = False

    def as_dict(self) -> dict:
        d = {"shard": self.shard, "key": self.key, "message": self.message}
        d.update({k: True for k in ("held", "interrupted") if getattr(self, k)})
        return d
