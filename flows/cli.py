"""`lmbatch`: run, plan, inspect and schedule batch-inference jobs.

Every command validates the config first; a config or input problem is printed as one line on
stderr with exit status 2, before any model is loaded or any file written.
"""

from __future__ import annotations

import argparse
import os
import sys

from lmbatch.openmp import set_default_wait_policy
from lmbatch.quiet import set_quiet_defaults

set_quiet_defaults()       # before Prefect loads
set_default_wait_policy()  # before torch loads libgomp (src/lmbatch/openmp.py)

EXIT_FAILED, EXIT_USAGE = 1, 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML job config, e.g. configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set engine.max_num_seqs=64 (repeatable)")


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="take the run database from this job config")
    p.add_argument("--db", help="run database URL (default: LMBATCH_DB_URL, else "
                                "sqlite:///outputs/lmbatch.db)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lmbatch", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a job (resumes: shards already done are skipped)")
    _config_args(p)
    p.add_argument("--run-name", help="name of the output folder (default: <name>-<fingerprint>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("plan", help="show the shards and token estimates, without compute")
    _config_args(p)
    p.add_argument("--run-name", help="show the done/new status of this run name's shards")
    p = sub.add_parser("status", help="runs and shards from the run database")
    p.add_argument("run", nargs="?", help="a run name or id (default: list recent runs)")
    _db_args(p)
    p.add_argument("--release", action="store_true",
                   help="free the run's job's shard claims (a host that died for good holds them)")
    p = sub.add_parser("report", help="metrics table and PNG plots of a run")
    p.add_argument("run", help="a run name or id")
    _db_args(p)
    p.add_argument("--out", help="folder for the PNG plots (default: the run's output folder)")
    p = sub.add_parser("serve", help="schedule the job on a real Prefect server (blocks)")
    _config_args(p)
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    p.add_argument("--name", help="deployment name (default: the config's name)")
    p.add_argument("--start-server", action="store_true",
                   help="start `prefect server start` on loopback for this process when "
                        "PREFECT_API_URL is not set")
    p.add_argument("--server-home", default=".prefect-server",
                   help="PREFECT_HOME of the started server (SQLite lives there)")
    return ap


def _cmd_run(args) -> int:
    from lmbatch.flows.job import run_job
    from lmbatch.flows.preflight import prepare
    from lmbatch.flows.report import format_metrics
    from lmbatch.flows.stop import drain_on_signals

    with _prefect_server() as server:   # boots while the config and model are checked
        cfg = prepare(args.config, args.overrides)
        try:
            with drain_on_signals(cfg.runner.drain_s) as stop_request, server.ready():
                result = run_job(cfg, run_name=args.run_name, progress=False if args.quiet else None,
                                 input_checked=True)  # prepare() has checked it
        except Exception as e:  # noqa: BLE001 - Prefect has logged the traceback; say it in one line
            print(f"lmbatch: run failed: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_FAILED
    if result.get("interrupted"):
        print(f"lmbatch: run {result['run_name']} {result['message']}", file=sys.stderr)
        return stop_request.exit_code
    print(format_metrics(result["metrics"], title=f"run {result['run_name']}"))
    print(f"outputs: {result['output_dir']}")
    if result["failed_shards"]:
        print(f"lmbatch: run {result['run_name']} FAILED: {result['message']}", file=sys.stderr)
        return EXIT_FAILED
    return 0


class _UsersServer:
    """PREFECT_API_URL is set: nothing to start."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def ready(self):
        import contextlib

        return contextlib.nullcontext()


def _prefect_server():
    """The user's server if PREFECT_API_URL is set, else a temporary one that dies with this process."""
    from prefect.settings import PREFECT_API_URL

    from lmbatch.flows.temporary_server import TemporaryServer

    return _UsersServer() if PREFECT_API_URL.value() else TemporaryServer()


def _cmd_plan(args) -> int:
    from lmbatch.flows.job import plan_only
    from lmbatch.flows.preflight import prepare
    from lmbatch.flows.report import format_plan

    cfg = prepare(args.config, args.overrides, build_demo=True)
    print(format_plan(plan_only(cfg, args.run_name, input_checked=True)))  # prepare() has checked it
    return 0


def _db_url(args) -> str:
    if args.db:
        return args.db
    if args.config:
        from lmbatch.flows.config import load_config

        return load_config(args.config).db_url()
    from lmbatch import io

    return io.resolve_db_url(None, io.rundb.DEFAULT_OUTPUT_PATH)


def _cmd_status(args) -> int:
    from lmbatch.flows.report import release_text, status_text

    if args.release:
        if not args.run:
            print("lmbatch: status --release needs a run name or id", file=sys.stderr)
            return EXIT_USAGE
        print(release_text(_db_url(args), args.run))
    print(status_text(_db_url(args), args.run))
    return 0


def _cmd_report(args) -> int:
    from lmbatch.flows.report import write_report

    text, plots = write_report(_db_url(args), args.run, args.out)
    print(text)
    for path in plots:
        print(f"plot: {path}")
    return 0


def _cmd_serve(args) -> int:
    from lmbatch.flows.preflight import prepare
    from lmbatch.flows.serve import serve_job, start_server

    cfg = prepare(args.config, args.overrides)
    server = None
    try:
        if args.start_server and not os.environ.get("PREFECT_API_URL"):
            server = start_server(args.server_home, ui=True)
            print(f"Prefect server: {server.url.removesuffix('/api')} (log: {server.log_path})", flush=True)
        serve_job(cfg, args.cron, args.name, api_url=server.url if server else None)
    except RuntimeError as e:
        print(f"lmbatch: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if server:
            server.stop()
    return 0


COMMANDS = {"run": _cmd_run, "plan": _cmd_plan, "status": _cmd_status, "report": _cmd_report,
            "serve": _cmd_serve}


def main(argv: list[str] | None = None) -> int:
    from lmbatch.flows.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"lmbatch: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as e:  # unknown run name in status/report
        print(f"lmbatch: {e.args[0] if e.args else e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lmbatch: interrupted; finished shards and checkpointed rows are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
