"""A terminal progress bar for a shard: rows done, output tokens/s and ETA.

tqdm's `disable=None` turns the bar off when stderr is not a TTY, so logs of scheduled runs and
CI stay clean; the Prefect progress artifact covers those.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class ShardProgress:
    def __init__(self, total_rows: int, desc: str, enabled: bool | None = None):
        # enabled=None: on a TTY only
        disable = None if enabled is None else not enabled
        self.bar = tqdm(total=total_rows, desc=desc, unit="row", disable=disable, file=sys.stderr,
                        dynamic_ncols=True, leave=False)
        self.start = time.monotonic()
        self.tokens = 0
        self.rows = 0

    def update(self, rows: int = 1, output_tokens: int = 0) -> None:
        self.rows += rows
        self.tokens += output_tokens
        if self.bar.disable:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
