"""The CUDA path of the engine, run on the CPU: the Triton kernel under TRITON_INTERPRET, decode steps
through the graph bookkeeping (static buffers, padding, sizes) with the capture itself skipped, and
the host-device traffic of a step counted.

The float32 greedy output must equal transformers' generate token for token here too.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmbatch.engine import EngineConfig, LLMEngine, SamplingParams
from lmbatch.engine.cuda_graphs import DecodeGraphs, graph_sizes, size_for

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the CUDA path")

# The interpreter runs each kernel program in numpy (~8 ms per block of keys): short prompts with a
# shared two-block prefix, and few tokens, keep this file near a minute.
MAX_TOKENS = 6


def triton_engine(model_dir, graphs: bool, **overrides) -> LLMEngine:
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(model_dir), attention_backend="triton", **overrides))
    assert engine.runner.backend == "triton" and engine.runner.kernels is None
    if graphs:
        engine.runner.graphs = DecodeGraphs(engine.runner, engine.config.max_num_seqs, capture=False)
    return engine


@pytest.fixture(scope="module")
def short_cases(model_dirs, references, hf_reference):
    """Per model: 5 prompts of 3-45 tokens (four share a 32-token prefix) and transformers' greedy outputs."""
    from transformers import AutoModelForCausalLM

    cases = {}
    for arch in ("llama", "qwen2"):
        long_prompts = references(arch)[0]
        prefix = long_prompts[0][:32]
        prompts = [prefix + long_prompts[1][-5:], prefix + long_prompts[2][-13:], long_prompts[3][-3:],
                   prefix + long_prompts[5][-1:], prefix + long_prompts[6][-9:]]
        model = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=torch.float32).eval()
        cases[arch] = (prompts, [hf_reference(model, p, MAX_TOKENS) for p in prompts])
    return cases


def greedy(engine, prompts):
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    engine.block_manager.assert_no_leaks()
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("regime", [
    dict(num_kv_blocks=512),                                           # prefix hits: chunks with past
    dict(num_kv_blocks=5, max_num_batched_tokens=20),                  # chunked prefill, preemption
])
def test_triton_path_greedy_matches_transformers(model_dirs, short_cases, regime):
    prompts, refs = short_cases["llama"]
    engine = triton_engine(model_dirs["llama"], graphs=False, **regime)
    assert greedy(engine, prompts) == refs
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0 if regime["num_kv_blocks"] > 100 else stats.preemptions > 0


def test_decode_graph_bookkeeping_keeps_greedy_exact(model_dirs, short_cases):
    """Decode steps replay through padded static buffers; batches of 1..5 land on sizes 1, 2, 4, 5."""
    prompts, refs = short_cases["qwen2"]
    engine = triton_engine(model_dirs["qwen2"], graphs=True, num_kv_blocks=512, max_num_seqs=5)
    graphs = engine.runner.graphs
    assert graphs.sizes == [1, 2, 4, 5] and len(graphs.static.host_buffers) == 1
    assert greedy(engine, prompts) == refs
    assert graphs.replays > 0
    # The scratch block (the padding's) is outside what the block manager hands out.
    assert engine.runner.scratch_block == engine.block_manager.num_blocks


def test_async_steps_through_the_graph_bookkeeping_keep_greedy_exact(model_dirs, short_cases):
    """Async scheduling over the graph path: a decode step's ids come from the step before on the device,
    written into the static buffer after its upload; the two host twins take turns."""
    prompts, refs = short_cases["qwen2"]
    engine = triton_engine(model_dirs["qwen2"], graphs=True, num_kv_blocks=512, max_num_seqs=5,
                           async_scheduling=True)
    graphs = engine.runner.graphs
    assert len(graphs.static.host_buffers) == 2     # a synchronous engine has one
    assert greedy(engine, prompts) == refs
    assert graphs.replays > 1 and engine.stats().steps > graphs.replays


def test_graph_sizes_and_fallback():
    assert graph_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and graph_sizes(256)[-1] == 256
    assert graph_sizes(3) == [1, 2, 3]
    assert graph_sizes(4096)[-1] == 512
    assert size_for(9, graph_sizes(256)) == 16 and size_for(600, graph_sizes(4096)) is None


def test_graph_plan_runs_prefill_and_long_contexts_eagerly(model_dirs):
    engine = triton_engine(model_dirs["llama"], graphs=True, num_kv_blocks=64, max_num_seqs=8, max_model_len=64)
    graphs = engine.runner.graphs

    class Seq:
        def __init__(self, computed):
            self.num_computed_tokens = computed

    assert graphs.plan([(Seq(5), 1), (Seq(9), 1), (Seq(3), 1)], [0, 1, 2]) == 4
    assert graphs.plan([(Seq(5), 1), (Seq(0), 7)], [0, 7]) is None          # a prefill chunk
    assert graphs.plan([(Seq(5), 1)] * 9, list(range(9))) is None             # beyond the largest graph
    assert graphs.plan([(Seq(64), 1)], [0]) is None                           # wider than the tables


def test_padded_static_inputs_write_into_the_scratch_block(model_dirs):
    engine = triton_engine(model_dirs["llama"], graphs=True, num_kv_blocks=64, max_num_seqs=8)
    runner, graphs = engine.runner, engine.runner.graphs
    engine.add_request(0, [5, 6, 7, 8, 9], SamplingParams(max_tokens=3, temperature=0.0))
    engine.step()                                           # the prefill
    seq = engine.scheduler.running[0]
    graphs.run([(seq, 1)], 4)
    v = graphs.static.views(4)
    bs, kvh = runner.block_size, runner.num_kv_heads
    assert v["seq_lens"].tolist() == [seq.num_computed_tokens + 1, 1, 1, 1]
    assert v["cu_q"].tolist() == [0, 1, 2, 3, 4]
    assert v["block_tables"][1:, 0].tolist() == [runner.scratch_block] * 3
    rows = v["write_index"].view(kvh, 4)
    scratch_rows = [(runner.scratch_block * kvh + h) * bs for h in range(kvh)]
    assert rows[:, 1:].tolist() == [[r] * 3 for r in scratch_rows]
    engine.abort_all()


class HostSyncs(TorchDispatchMode):
    """Ops that make the host wait for a CUDA device: reading a scalar, or a data-dependent shape."""
    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "item", "unique", "equal", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
def test_one_upload_and_one_sync_per_step(model_dirs, graphs, overlap):
    """One upload and one wait per step, logprobs included; an overlapped step (async scheduling) adds
    one small copy: the rows whose input ids it takes from the step before."""
    engine = triton_engine(model_dirs["llama"], graphs=graphs, num_kv_blocks=256, async_scheduling=overlap)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)
    for i, prompt in enumerate([[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]):
        engine.add_request(i, prompt, params)
    transfers = engine.runner.transfers
    uploads, syncs = [], []
    while engine.has_unfinished():
        before = transfers.uploads, transfers.syncs
        with HostSyncs() as mode:
            engine.step()
        assert mode.seen == [], f"step {len(syncs) + 1} synced in {mode.seen}"
        uploads.append(transfers.uploads - before[0])
        syncs.append(transfers.syncs - before[1])
    if overlap:   # each call reads the step before back; the last call launches nothing
        assert (uploads, syncs) == ([1] + [2] * 5 + [0], [0] + [1] * 6)
    else:
        assert (uploads, syncs) == ([1] * 6, [1] * 6)
