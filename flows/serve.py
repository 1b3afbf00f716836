"""Scheduled runs: a Prefect deployment of the job with a cron schedule, on a real Prefect server.

Prefect's temporary server (what a plain `lmbatch run` uses) runs no scheduler, so schedules need
`prefect server start`; `start_server` launches one on loopback with SQLite under a directory of
our choosing, which is what `make serve` and the tests use.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lmbatch.flows.config import JobConfig
from lmbatch.quiet import QUIET_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrefectServer:
    process: subprocess.Popen
    url: str  # the API URL, ending in /api
    log_path: Path

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(home: str | Path, port: int | None = None, timeout: float = 120,
                 extra_env: dict[str, str] | None = None, ui: bool = False) -> PrefectServer:
    """`prefect server start` on 127.0.0.1 with its database under `home`; waits until healthy."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(home), **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)  # the server must not talk to another server
    log_path = home / "server.log"
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect) if prefect.exists() else "prefect", "server", "start",
           "--host", "127.0.0.1", "--port", str(port), "--ui" if ui else "--no-ui",
           "--analytics-off"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = PrefectServer(proc, f"http://127.0.0.1:{port}/api", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {log_path}")
        if _healthy(server.url):
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"prefect server did not become healthy in {timeout:.0f} s; see {log_path}")


def build_deployment(cfg: JobConfig, cron: str, name: str | None = None, run_name: str | None = None):
    """A RunnerDeployment of batch_inference with the validated config as its parameter."""
    from prefect.deployments.runner import EntrypointType

    from lmbatch.flows.job import batch_inference

    # Module path, not file path: the flow lives in an installed package (flows/ is mapped to
    # lmbatch.flows), and loading flows/job.py by file would bypass that mapping.
    return batch_inference.to_deployment(
        name=name or cfg.name, cron=cron, entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"config": cfg.model_dump(mode="json"), "run_name": run_name},
        description=f"lmbatch job {cfg.name}: {cfg.input.path} -> {cfg.output.path}",
        tags=["lmbatch"],
    )


def serve_job(cfg: JobConfig, cron: str, name: str | None = None, api_url: str | None = None) -> None:
    """Register the deployment and run its scheduled flow runs in this process (blocks).

    `api_url` (a server started here) wins over PREFECT_API_URL; Prefect reads its settings
    once at import, so it is applied as a settings context rather than through the environment.
    """
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = api_url or PREFECT_API_URL.value()
    if not url:
        raise RuntimeError("lmbatch serve needs a real Prefect server: set PREFECT_API_URL "
                           "(e.g. http://127.0.0.1:4200/api after `prefect server start`) or pass "
                           "--start-server")
    with temporary_settings({PREFECT_API_URL: url}):
        serve(build_deployment(cfg, cron, name), print_starting_message=True)
