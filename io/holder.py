"""Who holds a shard claim: host, pid and the process's start time, and whether it still lives.

A claim records its holder so that a run on the same host can tell a dead claim from a live one
at once, instead of waiting for the heartbeat to go stale: the OOM killer, `kill -9` or a crash
leave a claim whose process is gone. The start time (Linux: /proc/<pid>/stat, in clock ticks
since boot) makes a reused pid fail the check. Claims of other hosts cannot be checked from here
and keep the heartbeat timeout.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start: str   # the process start time, "" where the platform does not say

    @classmethod
    def current(cls) -> Holder:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start(pid))

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def is_dead_here(self) -> bool:
        """True when this host can tell that the holding process no longer exists."""
        if not self.is_local() or self.pid <= 0:
            return False
        if not _pid_exists(self.pid) or _stat_fields(self.pid)[:1] == ["Z"]:   # gone, or a zombie
            return True
        return bool(self.start) and process_start(self.pid) not in ("", self.start)  # pid reused

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or "" elsewhere."""
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""   # field 22 of the whole line


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (the state) on; [] where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return []
    # The command name (field 2) may hold spaces and parentheses: split after its closing ')'.
    return stat[stat.rindex(")") + 2:].split()


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True
