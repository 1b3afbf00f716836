"""A temporary Prefect server that dies with the job, however the job dies.

With no PREFECT_API_URL, Prefect starts a temporary server in a subprocess and stops it at exit
(atexit). A SIGKILL (the OOM killer, `kill -9`, a lost spot instance) skips atexit, and the server
lives on, holding memory and a port; every killed run leaves one more. `lmbatch run` starts the
same server itself instead (Prefect's uvicorn app factory, loopback, UI off) with the Linux
parent-death signal set in the child, so the kernel kills it when the job's process ends, and
points Prefect at it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 120.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:   # not Linux: Prefect's own stop at exit still applies
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(port: int) -> list[str]:
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


class TemporaryServer:
    """`with TemporaryServer() as server:` starts it (at once, so that it boots while the caller
    loads its own modules); `with server.ready():` waits for it and points Prefect at it."""

    def __enter__(self) -> TemporaryServer:
        from prefect.settings import get_current_settings

        port = _free_port()
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.log = tempfile.TemporaryFile()   # a pipe nobody reads could fill and stall the server
        self.proc = subprocess.Popen(_command(port), env=env, preexec_fn=_die_with_parent,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.url = f"http://127.0.0.1:{port}/api"
        return self

    @contextlib.contextmanager
    def ready(self):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        _wait_healthy(self.proc, self.url, self.log)
        with temporary_settings(updates={PREFECT_API_URL: self.url}):
            try:
                yield self.url
            finally:
                _drain_prefect_workers()

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _drain_prefect_workers() -> None:
    """Send Prefect's queued logs and events before the server goes: at exit they would retry
    against a closed port for minutes."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 - a worker that never started has nothing to send
            pass


def _wait_healthy(proc: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the temporary Prefect server exited ({proc.returncode}): "
                               f"{log.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the temporary Prefect server did not answer within {STARTUP_TIMEOUT_S:.0f} s")
