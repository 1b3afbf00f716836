"""`.ci/start-postgres.sh` after its server was killed with -9, as a session's processes are before CI.

The dead server leaves postmaster.pid and the socket's lock file behind. When their PID still looks
alive (a zombie nobody reaped, or a reused PID), `pg_ctl status` reports the dead server running and
the server itself refuses to start: CI then failed on connect. The script must bring a server up.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from lmbatch.flows.serve import free_port

SCRIPT = Path(__file__).parents[1] / ".ci" / "start-postgres.sh"
AS_ROOT = os.geteuid() == 0


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    return found[-1] if found else None


pytestmark = pytest.mark.skipif(
    _postgres_bin() is None and os.environ.get("CI") != "true",   # under CI, .ci/run installed it
    reason="PostgreSQL is not installed (.ci/start-postgres.sh installs it as root)")


@pytest.fixture
def pg_dir():
    # Under /tmp, not pytest's tmp_path: as root the server runs as `postgres`, which cannot enter
    # root's private pytest folders.
    path = Path(tempfile.mkdtemp(prefix="lmbatch-pg-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    data = path / "data"
    if (data / "postmaster.pid").exists():
        _as_server_user([str(_postgres_bin() / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
    shutil.rmtree(path, ignore_errors=True)


def _as_server_user(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if AS_ROOT else []
    return subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=120, **kw)


def _start(pg_dir: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMBATCH_PG_DIR": str(pg_dir), "LMBATCH_PG_PORT": str(port)}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=180)


def _answers(url: str) -> bool:
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as c:
            return c.execute(text("select 1")).scalar() == 1
    finally:
        engine.dispose()


def _kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace") if Path(f"/proc/{pid}").exists() else ""
        if ") Z" in stat:
            break
        time.sleep(0.05)


def test_start_postgres_recovers_from_a_server_killed_with_sigkill(pg_dir):
    port = free_port()
    first = _start(pg_dir, port)
    assert first.returncode == 0, first.stderr
    url = first.stdout.strip().splitlines()[-1]
    assert url.endswith(f"@127.0.0.1:{port}/lmbatch_test") and _answers(url)

    pid_file = pg_dir / "data" / "postmaster.pid"
    _kill_and_wait(int(pid_file.read_text().splitlines()[0]))
    # The dead server's lock files now name a live process of the server's user.
    impostor = subprocess.Popen(["sleep", "120"], user="postgres" if AS_ROOT else None)
    try:
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(impostor.pid), *lines[1:]]) + "\n")
        (pg_dir / f".s.PGSQL.{port}.lock").write_text(f"{impostor.pid}\n")
        status = _as_server_user([str(_postgres_bin() / "pg_ctl"), "-D", str(pg_dir / "data"), "status"])
        assert status.returncode == 0, "pg_ctl must take the dead server for a live one, or this test shows nothing"

        again = _start(pg_dir, port)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip().splitlines()[-1] == url
        assert _answers(url)
        assert impostor.poll() is None, "the script must not kill a process that is not its server"
    finally:
        impostor.kill()
        impostor.wait()
