"""lmbatch.flows: the job as a Prefect flow, its config, the `lmbatch` CLI and deployments.

Entry points: `lmbatch.flows.job.batch_inference` (the flow), `lmbatch.flows.config.load_config`
(the validated job config), `lmbatch.flows.cli.main` (the console script). Kept import-light so
that `lmbatch status` does not pay for Prefect, torch or the engine.
"""
