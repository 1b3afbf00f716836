"""The failure drill: `lmbatch run` killed at moments spread over the whole run, then rerun at once.

10 SIGKILL trials (the main process only, as the OOM killer does) and 3 SIGTERM trials, each on a
job of its own, at moments spread from the start (server start, planning) through the shards
(mid-shard, between a shard's write and its rename, its "done") to the roll-up. After each:
- no process the job started is left (its descendants, recorded by pid and start time while it ran);
- the immediate rerun of the same command exits 0;
- one row per input id, none duplicated, none missing, completions equal to an uninterrupted run.
SIGTERM trials, sent while the shards run, must also exit 128 + 15 with one line.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from lmbatch.flows.demo import demo_prompts
from lmbatch.io.holder import process_start
from lmbatch.quiet import QUIET_ENV

ROWS, SHARD_ROWS = 240, 24
SIGKILL_TRIALS, SIGTERM_TRIALS = 10, 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drill(toy_assets, tmp_path_factory):
    model, _ = toy_assets
    root = tmp_path_factory.mktemp("drill")
    data = root / "prompts.parquet"
    pq.write_table(demo_prompts(ROWS, seed=3), data, row_group_size=SHARD_ROWS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(QUIET_ENV, PREFECT_HOME=str(root / "prefect-home"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")

    def config(name: str) -> Path:
        cfg = {"name": "drill", "input": {"path": str(data), "format": "parquet",
                                          "columns": {"id": "id", "prompt": "prompt", "passthrough": ["category"]}},
               "output": {"path": str(root / name)}, "model": {"id": str(model), "dtype": "float32"},   # exact reruns
               "engine": {"num_kv_blocks": 256, "max_num_seqs": 16, "max_num_batched_tokens": 256},
               "sampling": {"max_tokens": 48, "temperature": 0.0}, "shards": {"target_rows": SHARD_ROWS},
               "runner": {"retries": 0, "drain_s": 20, "checkpoint_rows": 4}}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    reference = run(config("reference"), env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return config, env, completions(root / "reference"), reference.wall_s, shard_phase_s(root / "reference")


class Watched:
    """`lmbatch run` in a subprocess, its descendants recorded (pid, start time) while it lives."""

    def __init__(self, config: Path, env: dict):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "lmbatch.flows.cli", "run", str(config), "--quiet"],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.seen: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.seen |= {(pid, process_start(pid)) for pid in descendants(self.proc.pid)}
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> Watched:
        self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        self.returncode, self.wall_s = self.proc.returncode, time.monotonic() - self.t0
        self._stop.set()
        self._thread.join()
        return self

    def survivors(self, grace_s: float = 10.0) -> list[int]:
        deadline = time.monotonic() + grace_s
        while True:
            alive = [pid for pid, start in self.seen if start and process_start(pid) == start]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run(config: Path, env: dict) -> Watched:
    return Watched(config, env).finish()


def completions(out_root: Path) -> dict:
    (run_dir,) = [p for p in out_root.iterdir() if p.is_dir()]
    ids, texts = [], []
    for f in sorted(run_dir.glob("*.parquet")):
        t = pq.read_table(f, columns=["id", "completion"])
        ids += t["id"].to_pylist()
        texts += t["completion"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicated ids"
    return dict(zip(ids, texts))


def shard_phase_s(out_root: Path) -> float:
    """How long a run writes shard files: from its first part file to its last (their mtimes)."""
    times = sorted(f.stat().st_mtime for f in out_root.glob("*/part-*.parquet"))
    return times[-1] - times[0]


def moments(n: int, wall_s: float, seed: int) -> list[float]:
    """n kill times spread over [0, wall_s + 1): one in each of n equal slices, at random inside it."""
    rng = random.Random(seed)
    return [(i + rng.random()) * (wall_s + 1.0) / n for i in range(n)]


def after_first_shard(out_root: Path, extra_s: float, timeout_s: float = 120.0) -> None:
    """Wait until the run has written its first shard file, then `extra_s` more: mid-run."""
    deadline = time.monotonic() + timeout_s
    while not list(out_root.glob("*/part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(extra_s)


def trial(drill, name: str, signum: int, delay: float, mid_run: bool = False) -> Watched:
    config, env, reference, *_ = drill
    path = config(name)
    victim = Watched(path, env)
    if mid_run:
        after_first_shard(Path(yaml.safe_load(path.read_text())["output"]["path"]), delay)
    else:
        time.sleep(delay)
    if victim.proc.poll() is None:
        victim.proc.send_signal(signum)
    victim.finish()
    assert victim.survivors() == [], f"{name}: processes left after the {signal.Signals(signum).name}"
    rerun = run(path, env)
    assert rerun.returncode == 0, f"{name} (signal at {delay:.1f} s): rerun failed: {rerun.stderr[-3000:]}"
    assert rerun.survivors() == []
    got = completions(Path(yaml.safe_load(path.read_text())["output"]["path"]))
    assert sorted(got) == sorted(reference) and got == reference
    print(f"{name}: {signal.Signals(signum).name} at {delay:.1f} s -> exit {victim.returncode}; "
          f"rerun {rerun.wall_s:.1f} s, exit 0")
    return victim


def test_sigkill_at_any_moment_then_an_immediate_rerun(drill):
    *_, wall_s, _ = drill
    for i, delay in enumerate(moments(SIGKILL_TRIALS, wall_s, seed=1)):
        trial(drill, f"kill{i}", signal.SIGKILL, delay)


def test_sigterm_mid_run_drains_exits_143_with_one_line_then_the_rerun_completes(drill):
    rng = random.Random(2)
    phase = drill[-1]                 # the shards' span in the reference run: a faster machine, a shorter span
    assert phase > 0.5, f"the shards ran for {phase:.2f} s: too little run to interrupt mid-run; give them more work"
    for i in range(SIGTERM_TRIALS):   # within the first ~third of the shards
        victim = trial(drill, f"term{i}", signal.SIGTERM, rng.uniform(0.0, min(1.0, phase / 3)), mid_run=True)
        assert victim.returncode == 128 + signal.SIGTERM, victim.stderr[-3000:]
        last = [line for line in victim.stderr.splitlines() if line.startswith("lmbatch: run")]
        assert len(last) == 1 and "interrupted by SIGTERM" in last[0], victim.stderr[-3000:]
