"""Stops inside a shard: a drain keeps the rows that finished, a crash keeps the checkpointed ones,
and the retry runs only the rest (counted by the engine's prefill tokens, prefix cache off)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lmbatch import io
from lmbatch.flows import engine_cache, shard, stop
from lmbatch.flows.config import validate_config
from lmbatch.flows.job import job_identity
from lmbatch.flows.manifests import RunPlan
from lmbatch.flows.preflight import input_spec

pytestmark = pytest.mark.usefixtures("prefect_harness")


class DrainAfter(stop.StopRequest):
    """A SIGTERM that arrives after `n` requests entered the engine."""

    def __init__(self, n: int):
        super().__init__()
        self.calls, self.n = 0, n

    def draining(self) -> bool:
        self.calls += 1
        return self.calls > self.n


def one_shard_run(job_config, out: Path):
    """The whole dataset as one shard of a job writing under `out`; returns (config, run, plan)."""
    cfg = validate_config(job_config(shards={"target_rows": 36}, output={"path": str(out)},
                                     engine={"enable_prefix_caching": False, "max_num_seqs": 4},
                                     runner={"checkpoint_rows": 2}))
    spec = input_spec(cfg)
    info = io.inspect_input(spec)
    plan = io.plan_shards(info, target_rows=36)[0]
    key, run_name, output_dir = job_identity(cfg, info.fingerprint, None)
    with io.RunDB(cfg.db.url, cfg.output.path) as db:
        run_id = db.start_run(key, run_name=run_name, output_dir=output_dir)
        db.resume(key, [plan])
    run = RunPlan(run_id=run_id, run_name=run_name, job_key=key, output_dir=output_dir, spec=info.spec,
                  num_rows=info.num_rows, num_shards=1, to_run=[plan], skipped=[], shard_keys=[plan.key])
    return cfg, run, plan


def prefill_tokens(cfg) -> int:
    return engine_cache.get_engine(cfg.engine_kwargs()).stats().prefill_tokens


def completions(path: str) -> dict:
    table = pq.read_table(path)
    return dict(zip(table["id"].to_pylist(), table["completion"].to_pylist()))


def test_sigterm_mid_shard_keeps_finished_rows_and_the_rerun_skips_them(job_config, tmp_path, monkeypatch):
    cfg, run, plan = one_shard_run(job_config, tmp_path / "out")
    ref_cfg, ref_run, _ = one_shard_run(job_config, tmp_path / "reference")

    before = prefill_tokens(cfg)
    whole = shard.process_shard(ref_cfg, ref_run, plan, progress=False)
    whole_prefill = prefill_tokens(cfg) - before

    monkeypatch.setattr(stop, "_current", DrainAfter(9))
    before = prefill_tokens(cfg)
    first = shard.process_shard(cfg, run, plan, progress=False)
    first_prefill = prefill_tokens(cfg) - before
    assert first.status == "interrupted" and "finished and kept" in first.reason
    kept = io.ShardParts(run.output_dir, plan.key).load()
    assert 0 < len(kept) < 36 and not list(Path(run.output_dir).glob("*.parquet"))  # nothing visible yet
    with io.RunDB(cfg.db.url, cfg.output.path) as db:
        assert db.claim_holder(run.job_key, plan.key)["status"] == "pending"   # claimable at once

    monkeypatch.setattr(stop, "_current", stop.StopRequest())
    before = prefill_tokens(cfg)
    second = shard.process_shard(cfg, run, plan, progress=False)
    second_prefill = prefill_tokens(cfg) - before
    assert second.status == "done" and second.resumed_rows == len(kept)
    # The rerun prefilled exactly the rows the first attempt did not finish.
    kept_prompt_tokens = sum(r.prompt_tokens for r in kept.values())
    assert second_prefill == whole_prefill - kept_prompt_tokens
    assert first_prefill >= kept_prompt_tokens
    assert completions(second.path) == completions(whole.path)
    assert not Path(run.output_dir, ".parts", plan.key).exists()   # removed once done


def test_an_engine_crash_keeps_the_checkpointed_rows(job_config, tmp_path, monkeypatch):
    cfg, run, plan = one_shard_run(job_config, tmp_path / "out")
    engine = engine_cache.get_engine(cfg.engine_kwargs())
    real_step, steps = engine.step, []

    def crashing_step():
        steps.append(1)
        if len(steps) == 12:
            raise RuntimeError("device lost")
        return real_step()

    monkeypatch.setattr(engine, "step", crashing_step)
    with pytest.raises(RuntimeError, match="device lost"):
        shard.process_shard(cfg, run, plan, progress=False)
    kept = io.ShardParts(run.output_dir, plan.key).load()
    assert len(kept) > 0
    monkeypatch.setattr(engine, "step", real_step)
    done = shard.process_shard(cfg, run, plan, progress=False)
    assert done.status == "done" and done.resumed_rows == len(kept) and done.rows == 36
