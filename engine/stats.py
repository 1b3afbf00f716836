"""EngineStats: what the engine has done so far, as one typed record.

Counters are cumulative over the engine's life (one engine serves many shards of a job), so a
caller measures a piece of work as `after.since(before)`; the KV gauges are a snapshot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

_GAUGES = ("kv_blocks_total", "kv_blocks_in_use", "kv_blocks_cached")


@dataclass(frozen=True)
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0           # prompt tokens computed (prefix-cache hits are not)
    decode_tokens: int = 0
    prefix_cache_queries: int = 0     # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0        # of which found cached
    preemptions: int = 0
    kv_blocks_total: int = 0          # gauges: the pool now
    kv_blocks_in_use: int = 0
    kv_blocks_cached: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @classmethod
    def counters(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in _GAUGES)

    def since(self, earlier: EngineStats) -> EngineStats:
        """The counters accumulated after `earlier`; gauges as they are now."""
        delta = {k: getattr(self, k) - getattr(earlier, k) for k in self.counters()}
        return EngineStats(**{**asdict(self), **delta})

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "prefix_cache_hit_rate": self.prefix_cache_hit_rate}
