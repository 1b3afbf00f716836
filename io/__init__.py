"""lmbatch.io: everything between a dataset on storage and the engine, and back to Parquet.

One shard of a job, as a flow runs it::

    from lmbatch import io

    info = io.inspect_input(io.InputSpec(path="data/*.parquet", id_column="id",
                                         prompt_column="prompt"))          # InputError if bad
    shards = io.plan_shards(info, target_tokens=1_000_000)                 # deterministic keys
    db = io.RunDB(output_dir="out")                                        # or any SQLAlchemy URL
    key = io.job_key(key_values, info.fingerprint)  # JobConfig.key_values()
    run_id = db.start_run(key, run_name="nightly", model=model)
    to_run, done = db.resume(key, shards)
    for shard in to_run:
        if not db.claim_shard(run_id, key, shard.key):
            continue                                                       # another run has it
        table = io.read_shard(info.spec, shard)
        prepared = io.prepare_requests(table, info.spec, engine.tokenizer, {"max_tokens": 64},
                                       engine.max_model_len)
        result = io.run_shard(engine, prepared, ordering="prefix_longest_first")
        out = io.build_output_table(prepared.input_columns, result.rows, engine.model_name,
                                    run_id, prepared.with_logprobs)
        path = f"out/nightly/{shard.filename}"
        io.write_shard(out, path)                                          # atomic
        m = io.shard_metrics(result, device="cpu")
        db.complete_shard(run_id, key, shard.key, output_path=path, num_rows=out.num_rows,
                          error_rows=result.num_errors, metrics=m)
    run_metrics = io.rollup_metrics(db.done_metrics(key), wall_s=...)
    io.write_metrics_json(run_metrics, "out/nightly/metrics.json")
    db.finish_run(run_id, io.Status.DONE, run_metrics)

Depends on lmbatch.engine's public API only (and imports it lazily), never on Prefect.
"""

from lmbatch.io.engine_feed import RowResult, ShardResult, StopSignal, run_shard
from lmbatch.io.metrics import rollup_metrics, shard_metrics, write_metrics_json
from lmbatch.io.ordering import DEFAULT_ORDERING, ORDERINGS, order_requests, prefix_groups, reusable_prefix_share
from lmbatch.io.parts import Checkpointer, ShardParts
from lmbatch.io.prepare import PreparedShard, prepare_requests
from lmbatch.io.rundb import RunDB, Status, configured_db_url, describe_claim, job_key, resolve_db_url
from lmbatch.io.shards import ShardPlan, iter_shard_batches, plan_shards, read_shard
from lmbatch.io.spec import InputError, InputInfo, InputSpec
from lmbatch.io.validate import inspect_input, read_columns
from lmbatch.io.writer import ShardWriter, build_output_table, count_rows, output_schema, write_shard

__all__ = [
    "Checkpointer",
    "DEFAULT_ORDERING",
    "ORDERINGS",
    "InputError",
    "InputInfo",
    "InputSpec",
    "PreparedShard",
    "RowResult",
    "RunDB",
    "ShardParts",
    "ShardPlan",
    "ShardResult",
    "StopSignal",
    "ShardWriter",
    "Status",
    "configured_db_url",
    "build_output_table",
    "count_rows",
    "describe_claim",
    "inspect_input",
    "iter_shard_batches",
    "job_key",
    "order_requests",
    "output_schema",
    "plan_shards",
    "prefix_groups",
    "prepare_requests",
    "read_columns",
    "read_shard",
    "resolve_db_url",
    "reusable_prefix_share",
    "rollup_metrics",
    "run_shard",
    "shard_metrics",
    "write_metrics_json",
    "write_shard",
]
