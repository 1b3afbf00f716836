"""Runs a stock transformers causal LM over one scheduled step with the paged KV pool.

The step's tokens from all sequences are packed into one ragged row ([1, T]) with per-token
positions; the LM head runs only at the positions that are sampled (`logits_to_keep`).
"""

from __future__ import annotations

import logging

import torch

from . import attention, cpu_kernels, model_check, small_batch_linear
from .attention import AttentionMetadata, DecodeGroup, PrefillChunk
from .config import EngineConfig
from .sequence import Sequence

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
        self.model = model_check.load_model(config, self.dtype).to(self.device).eval()
        hf = self.model.config
        self.num_layers = hf.num_hidden_layers
        layout = model_check.probe_layout(self.model, self.num_layers, self.device)
        self.num_kv_heads, self.head_dim = layout.kv_heads, layout.head_dim
        self.vocab_size = hf.vocab_size
        self.num_blocks = self._num_kv_blocks()
        self._allocate_kv_cache()
        self.decode_group = CPU_DECODE_GROUP if self.device.type == "cpu" else CUDA_DECODE_GROUP
        native = self.device.type == "cpu" and self.dtype == torch.float32
        self.kernels = cpu_kernels.load() if native else None
        if self.kernels is not None:
            small_batch_linear.install(self.model)
        # Last, so that the path it checks is the one requests take.
        self.warmup_difference = model_check.check_outputs(self, layout)

    # ---- KV pool ------------------------------------------------------------------------------
    def _bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        budget = (self.config.kv_cache_gb or DEFAULT_CPU_KV_GB) * 2**30
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # Leave room for activations of one step: the logits and MLP of a full token budget.
            gpu_budget = free * self.config.gpu_memory_utilization - 2**30
            budget = min(budget, gpu_budget) if self.config.kv_cache_gb else gpu_budget
        blocks = int(budget // self._bytes_per_block())
        if blocks < 1:
            raise RuntimeError("not enough memory for a single KV block")
        return blocks

    def _allocate_kv_cache(self) -> None:
        shape = (2, self.num_layers, self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)
        self.kv_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_cache = [(self.kv_pool[0, i], self.kv_pool[1, i]) for i in range(self.num_layers)]
        log.info("KV pool: %d blocks of %d tokens (%.2f GiB)", self.num_blocks, self.block_size,
                 self.kv_pool.numel() * self.kv_pool.element_size() / 2**30)

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]], sample_rows: list[int]) -> torch.Tensor:
        """Run the forward pass; returns float32 logits for the step's tokens listed in sample_rows."""
        input_ids, positions, meta = self._prepare(batch)
        keep = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        with attention.step_context(meta):
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=keep)
        return out.logits[0].float()

    def _prepare(self, batch):
        ids, pos, slots = [], [], []
        prefills, decodes = [], []
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
        dev = self.device
        meta = AttentionMetadata(kv_cache=self.kv_cache, write_index=self._write_index(slots).to(dev),
                                 prefills=prefills, decodes=self._decode_groups(decodes), block_size=bs)
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        positions = torch.tensor([pos], dtype=torch.long, device=dev)
        return input_ids, positions, meta

    def _write_index(self, slots: list[int]) -> torch.Tensor:
        """Flat pool rows ([blocks * kv_heads * block_size]) of each new token, head-major."""
        slots = torch.tensor(slots, dtype=torch.long)
        blocks, offsets = slots // self.block_size, slots % self.block_size
        heads = torch.arange(self.num_kv_heads, dtype=torch.long)[:, None]
        return ((blocks[None, :] * self.num_kv_heads + heads) * self.block_size + offsets[None, :]).flatten()

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
        rows = [table[:max_blocks] + [0] * (max_blocks - len(table[:max_blocks])) for _, _, table in decodes]
        return torch.tensor(rows, dtype=torch.long), torch.tensor([ctx for _, ctx, _ in decodes])

    def _padded_group(self, part) -> DecodeGroup:
        tables, lengths = self._block_tables(part)
        max_len = int(lengths.max())
        mask = (torch.arange(max_len)[None, :] < lengths[:, None])[:, None, None, :]
        q_index = torch.tensor([q for q, _, _ in part], dtype=torch.long)
        dev = self.device
        # context_lens stays on the host: only the native kernel reads it, the mask carries the lengths here
        return DecodeGroup(q_index.to(dev), tables.to(dev), lengths, mask=mask.to(dev))
