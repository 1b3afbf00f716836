"""KV pool sizing on CUDA: what is left of total x utilisation after the weights, the CUDA context,
one full step's measured peak and the graphs' reserve; a clear error when nothing is left."""

from __future__ import annotations

import pytest

from lmbatch.engine.kv_sizing import GiB, MemoryReport, blocks_that_fit, cuda_kv_blocks

MiB = 2**20


def test_budget_subtracts_what_the_weights_and_a_step_use():
    r = MemoryReport(total=80 * GiB, used_before_kv=3 * GiB, peak_activation=2 * GiB, utilization=0.9,
                     reserve=256 * MiB)
    assert r.kv_budget == int(72 * GiB) - 5 * GiB - 256 * MiB
    per_block = 2 * MiB
    assert cuda_kv_blocks(r, per_block, cap_gb=None) == r.kv_budget // per_block
    assert cuda_kv_blocks(r, per_block, cap_gb=1.0) == 512       # kv_cache_gb caps it


def test_a_larger_step_leaves_fewer_blocks():
    small = MemoryReport(80 * GiB, 3 * GiB, 1 * GiB, 0.9)
    large = MemoryReport(80 * GiB, 3 * GiB, 6 * GiB, 0.9)
    assert cuda_kv_blocks(large, 2 * MiB, None) < cuda_kv_blocks(small, 2 * MiB, None)


def test_nothing_left_is_a_clear_error():
    r = MemoryReport(total=24 * GiB, used_before_kv=20 * GiB, peak_activation=2 * GiB, utilization=0.9)
    with pytest.raises(RuntimeError, match="no memory left for the KV cache .*max_num_batched_tokens"):
        cuda_kv_blocks(r, 2 * MiB, None)
    with pytest.raises(RuntimeError, match="kv_cache_gb"):
        blocks_that_fit(MiB, 2 * MiB, "kv_cache_gb 0.001")
