"""Runs a stock transformers causal LM over one scheduled step with the paged KV pool.

The step's tokens from all sequences are packed into one ragged row ([1, T]) with per-token
positions; the LM head runs only at the positions that are sampled (`logits_to_keep`).

The attention backend (attention_backend.py) decides how a step is described: for the Triton
kernel (CUDA) as one ragged batch whose arrays go to the device in one non-blocking copy
(varlen_inputs.py, transfers.py), with decode-only steps replayed as CUDA graphs (cuda_graphs.py);
for the CPU kernels and SDPA as prefill chunks and decode groups (attention.py). On CUDA the pool
is sized after a measured warm-up step (kv_sizing.py).
"""

from __future__ import annotations

import gc
import logging
import math

import torch

from . import attention, attention_backend, cpu_kernels, fused_norms, kv_sizing, model_check, small_batch_linear
from .attention import AttentionMetadata, DecodeGroup, PrefillBatch, PrefillChunk
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .overlap import Carry
from .sequence import Sequence
from .transfers import Transfers
from .varlen_inputs import VarlenBatch, choose_segments, varlen_arrays, write_index

log = logging.getLogger(__name__)

CPU_DECODE_GROUP = 16      # decode sequences per padded attention call on the CPU (bounds padding)
CUDA_DECODE_GROUP = 64     # on CUDA: fewer, larger launches; sorting keeps the padding small
DEFAULT_CPU_KV_GB = 2.0


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        self.block_size = config.block_size
        self.model = self._load()
        hf = self.model.config
        self.num_layers = hf.num_hidden_layers
        self.max_model_len = resolve_max_model_len(hf, config.max_model_len)
        layout = model_check.probe_layout(self.model, self.num_layers, self.device)
        self.num_kv_heads, self.head_dim = layout.kv_heads, layout.head_dim
        self.gqa_group = _num_heads(hf) // self.num_kv_heads
        self.vocab_size = hf.vocab_size
        self.transfers = Transfers(self.device)
        # Read once: the split-K choice of every step needs it, and the query is not free.
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if self.device.type == "cuda" else 1
        self.backend = attention_backend.choose(config.attention_backend, self.device, self.dtype, layout,
                                                self.block_size)
        self.decode_group = CPU_DECODE_GROUP if self.device.type == "cpu" else CUDA_DECODE_GROUP
        self.kernels = cpu_kernels.load() if self.backend == "native" else None
        if self.kernels is not None:
            small_batch_linear.install(self.model)
        self.prefill_kernel = self.kernels if self._prefill_kernel_fits() else None
        if self.kernels is not None and self.dtype == torch.bfloat16:
            fused_norms.install(self.model)
        self.memory = None
        self.graphs = None
        self.num_blocks = self._num_kv_blocks()   # on CUDA: runs a measured warm-up step
        self._allocate_kv_cache()
        # Last but the graphs, so that the path it checks is the one requests take.
        self.warmup_difference = model_check.check_outputs(self, layout)
        if self.backend == "triton" and self.device.type == "cuda" and config.cuda_graphs:
            self.graphs = DecodeGraphs(self, config.max_num_seqs)

    def _load(self):
        try:
            return model_check.load_model(self.config, self.dtype).to(self.device).eval()
        except torch.OutOfMemoryError as e:
            total = torch.cuda.get_device_properties(self.device).total_memory
            raise RuntimeError(kv_sizing.model_too_large(_checkpoint_bytes(self.config, self.dtype), total,
                                                         self.device)) from e

    # ---- KV pool ------------------------------------------------------------------------------
    def _bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            self.memory = self._measure_memory()
            return kv_sizing.cuda_kv_blocks(self.memory, self._bytes_per_block(), self.config.kv_cache_gb)
        budget = (self.config.kv_cache_gb or DEFAULT_CPU_KV_GB) * 2**30
        return kv_sizing.blocks_that_fit(budget, self._bytes_per_block(), f"kv_cache_gb {budget / 2**30:g}")

    def _measure_memory(self) -> kv_sizing.MemoryReport:
        """The peak of one full step, run over a pool just large enough for it, then freed."""
        budget = self.config.max_num_batched_tokens
        self.num_blocks = -(-budget // self.block_size) + 1
        self._allocate_kv_cache()
        seq = Sequence(-1, -1, [0] * budget, None, block_table=list(range(self.num_blocks - 1)))
        rows = list(range(budget - min(budget, self.config.max_num_seqs), budget))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.execute([(seq, budget)], rows)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del self.kv_pool, self.kv_cache
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return kv_sizing.MemoryReport(total, total - free, peak, self.config.gpu_memory_utilization)

    def _allocate_kv_cache(self) -> None:
        # One block more than the block manager hands out: the scratch block that padded rows of a
        # CUDA graph write to and read from.
        shape = (2, self.num_layers, self.num_blocks + 1, self.num_kv_heads, self.block_size, self.head_dim)
        self.kv_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_cache = [(self.kv_pool[0, i], self.kv_pool[1, i]) for i in range(self.num_layers)]
        self.scratch_block = self.num_blocks
        log.info("KV pool: %d blocks of %d tokens (%.2f GiB)", self.num_blocks, self.block_size,
                 self.kv_pool.numel() * self.kv_pool.element_size() / 2**30)

    def close(self) -> None:
        """Free the weights, the KV pool and the graphs now, whoever still holds this runner.

        A GPU process that builds a second engine (another model, a benchmark's next system) needs
        the first one's memory back; waiting for the garbage collector to find every reference
        to a 100 GiB pool is not a plan.
        """
        self.graphs = None
        self.kv_cache = []
        self.kv_pool = None
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]], sample_rows: list[int], carry: Carry | None = None
                ) -> torch.Tensor:
        """Run the forward pass; returns float32 logits for the step's tokens listed in sample_rows.

        `carry` names input ids still on the device (async scheduling, overlap.py)."""
        if self.backend == "triton":
            return self._execute_varlen(batch, sample_rows, carry)
        input_ids, positions, meta = self._prepare(batch)
        if carry is not None:
            carry.apply(input_ids[0], self.transfers)
        keep = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        with attention.step_context(meta):
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=keep)
        return out.logits[0].float()

    def _execute_varlen(self, batch, sample_rows: list[int], carry: Carry | None) -> torch.Tensor:
        size = self.graphs.plan(batch, sample_rows) if self.graphs is not None else None
        if size is not None:
            return self.graphs.run(batch, size, carry)
        arrays = varlen_arrays(batch, self.block_size, self.num_kv_heads, self.gqa_group, sample_rows)
        d = self.transfers.upload(arrays)
        if carry is not None:
            carry.apply(d["input_ids"], self.transfers)
        max_blocks = d["block_tables"].shape[1]
        segments = choose_segments(len(arrays["tile_seq"]), self.num_kv_heads, max_blocks, self.num_sms)
        varlen = VarlenBatch(d["cu_q"], d["seq_lens"], d["block_tables"], d["tile_seq"], d["tile_q0"], segments)
        meta = AttentionMetadata(kv_cache=self.kv_cache, write_index=d["write_index"], varlen=varlen,
                                 block_size=self.block_size)
        with attention.step_context(meta):
            out = self.model(input_ids=d["input_ids"][None], position_ids=d["positions"][None], use_cache=False,
                             logits_to_keep=d["sample_rows"])
        return out.logits[0].float()

    def _prepare(self, batch):
        ids, pos, slots = [], [], []
        prefills, prefill_tables, decodes = [], [], []
        bs = self.block_size
        for seq, n in batch:
            start = seq.num_computed_tokens
            q_start = len(ids)
            ids.extend(seq.tokens_between(start, start + n))
            pos.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                decodes.append((q_start, start + 1, table))
            else:
                prefills.append(self._prefill_chunk(q_start, start, n, table))
                prefill_tables.append(table)
        dev = self.device
        rows = write_index(torch.tensor(slots, dtype=torch.long), bs, self.num_kv_heads).to(dev)
        meta = AttentionMetadata(kv_cache=self.kv_cache, write_index=rows, prefills=prefills,
                                 decodes=self._decode_groups(decodes), block_size=bs,
                                 prefill_batch=self._prefill_batch(prefills, prefill_tables))
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        positions = torch.tensor([pos], dtype=torch.long, device=dev)
        return input_ids, positions, meta

    def _prefill_chunk(self, q_start: int, start: int, n: int, table: list[int]) -> PrefillChunk:
        if start == 0:
            return PrefillChunk(q_start, n)
        # A later chunk or a prefix hit: query i sees keys 0 .. start + i.
        past = torch.tensor(table[: -(-start // self.block_size)], dtype=torch.long).to(self.device)
        if self.device.type == "cpu":
            return PrefillChunk(q_start, n, start, past)  # attention merges past and chunk by LSE
        ctx = start + n
        mask = torch.arange(ctx)[None, :] <= torch.arange(start, ctx)[:, None]
        return PrefillChunk(q_start, n, start, past, mask.to(self.device))

    def _prefill_kernel_fits(self) -> bool:
        """The native prefill kernel's domain: a bf16 pool, AVX512-BF16, head dim 64 or 128 and whole
        16-key steps per block."""
        return (self.kernels is not None and self.dtype == torch.bfloat16 and self.head_dim in (64, 128)
                and self.block_size % 16 == 0 and self.kernels.paged_prefill_attention_available())

    def _prefill_batch(self, chunks: list[PrefillChunk], tables: list[list[int]]) -> PrefillBatch | None:
        if self.prefill_kernel is None or not chunks:
            return None
        ends = [c.start + c.q_len for c in chunks]
        column = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return PrefillBatch(self.prefill_kernel, _padded_tables(tables, -(-max(ends) // self.block_size)),
                            column([c.q_start for c in chunks]), column([c.q_len for c in chunks]),
                            column([c.start for c in chunks]), max(ends))

    def _decode_groups(self, decodes) -> list[DecodeGroup]:
        """Batch the one-token queries: one group for the native kernel, else padded groups."""
        if not decodes:
            return []
        if self.kernels is not None:
            tables, lengths = self._block_tables(decodes)
            q_index = torch.tensor([q for q, _, _ in decodes], dtype=torch.long)
            return [DecodeGroup(q_index, tables, lengths, kernel=self.kernels)]
        decodes.sort(key=lambda d: d[1])  # similar lengths together: less padding
        return [self._padded_group(decodes[i:i + self.decode_group])
                for i in range(0, len(decodes), self.decode_group)]

    def _block_tables(self, decodes) -> tuple[torch.Tensor, torch.Tensor]:
        max_blocks = -(-max(ctx for _, ctx, _ in decodes) // self.block_size)
        return _padded_tables([t for _, _, t in decodes], max_blocks), torch.tensor([ctx for _, ctx, _ in decodes])

    def _padded_group(self, part) -> DecodeGroup:
        tables, lengths = self._block_tables(part)
        max_len = int(lengths.max())
        mask = (torch.arange(max_len)[None, :] < lengths[:, None])[:, None, None, :]
        q_index = torch.tensor([q for q, _, _ in part], dtype=torch.long)
        dev = self.device
        # context_lens stays on the host: only the native kernel reads it, the mask carries the lengths here
        return DecodeGroup(q_index.to(dev), tables.to(dev), lengths, mask=mask.to(dev))


def _padded_tables(tables: list[list[int]], width: int) -> torch.Tensor:
    """[len(tables), width] block tables, cut or padded with block 0 (never read: past every length)."""
    return torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], dtype=torch.long)


def resolve_max_model_len(hf, asked: int | None) -> int:
    """The engine's context limit: the config's, within the model's own (2048 when it names none)."""
    limit = getattr(hf, "max_position_embeddings", None) or 2048
    if asked and asked > limit:
        raise ValueError(f"max_model_len {asked} exceeds the model's limit {limit}")
    return asked or limit


def _num_heads(hf) -> int:
    return getattr(hf, "num_attention_heads", None) or hf.n_head


def _checkpoint_bytes(config: EngineConfig, dtype: torch.dtype) -> int:
    """The weights' size in `dtype`, from the checkpoint's safetensors headers (0 when unknown)."""
    import json
    import struct
    from pathlib import Path

    total = 0
    for path in Path(config.model).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total * torch.empty((), dtype=dtype).element_size()
