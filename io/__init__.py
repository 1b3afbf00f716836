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

Depends on lmbatch.engine's public API only (and imports it lazily), never on Prefect. The names
load on first use (PEP 562): a bare GPU box without SQLAlchemy can still import lmbatch.io.ordering.
"""

from lmbatch.lazy import lazy_getattr

_EXPORTS = {
    "RowResult": ".engine_feed",
    "ShardResult": ".engine_feed",
    "StopSignal": ".engine_feed",
    "run_shard": ".engine_feed",
    "rollup_metrics": ".metrics",
    "shard_metrics": ".metrics",
    "write_metrics_json": ".metrics",
    "DEFAULT_ORDERING": ".ordering",
    "ORDERINGS": ".ordering",
    "order_requests": ".ordering",
    "prefix_groups": ".ordering",
    "reusable_prefix_share": ".ordering",
    "Checkpointer": ".parts",
    "ShardParts": ".parts",
    "PreparedShard": ".prepare",
    "prepare_requests": ".prepare",
    "RunDB": ".rundb",
    "Status": ".rundb_schema",
    "configured_db_url": ".rundb",
    "describe_claim": ".rundb",
    "job_key": ".rundb",
    "resolve_db_url": ".rundb",
    "ShardPlan": ".shards",
    "iter_shard_batches": ".shards",
    "plan_shards": ".shards",
    "read_shard": ".shards",
    "InputError": ".spec",
    "InputInfo": ".spec",
    "InputSpec": ".spec",
    "inspect_input": ".validate",
    "read_columns": ".validate",
    "ShardWriter": ".writer",
    "build_output_table": ".writer",
    "count_rows": ".writer",
    "output_schema": ".writer",
    "write_shard": ".writer",
}

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

__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
