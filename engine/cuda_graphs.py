"""CUDA graphs for decode-only steps: one replay instead of ~2,000 kernel launches.

A decode step of B sequences runs the graph captured for the smallest size >= B (nano-vllm's and
vLLM's sizes: 1, 2, 4, 8, then every 16). The graph reads static device buffers; a step fills
their pinned host twin and copies it in one non-blocking transfer. The B..size rows beyond the
batch are padding: one token each that writes into the pool's scratch block and reads it back,
whose logits are never sampled. A step with prefill tokens, more sequences than the largest
graph, or a context longer than the tables' width runs eagerly.

`capture=False` keeps all the bookkeeping (sizes, padding, static buffers, the eager fallback)
and runs the forward over the static buffers at each "replay" instead of a captured graph: how the
tests check it on the CPU, where CUDA graphs do not exist.
"""

from __future__ import annotations

import logging
import math

import torch

from .attention import AttentionMetadata, step_context
from .overlap import Carry
from .varlen_inputs import TableRows, VarlenBatch, choose_segments, varlen_arrays

log = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 512


def graph_sizes(max_num_seqs: int) -> list[int]:
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [s for s in (1, 2, 4, 8) if s < top] + list(range(16, top, 16))
    return sorted(set(sizes + [top]))


def size_for(batch_size: int, sizes: list[int]) -> int | None:
    return next((s for s in sizes if s >= batch_size), None)


class StaticInputs:
    """The step arrays of the largest graph at fixed offsets of one device buffer (and pinned twins)."""

    def __init__(self, max_batch: int, table_width: int, kv_heads: int, device: torch.device, twins: int = 1):
        self.kv_heads = kv_heads
        self.shapes = {"input_ids": (max_batch,), "positions": (max_batch,), "write_index": (kv_heads * max_batch,),
                       "cu_q": (max_batch + 1,), "seq_lens": (max_batch,),
                       "block_tables": (max_batch, table_width), "tile_seq": (max_batch,), "tile_q0": (max_batch,)}
        self.offsets, total = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = total
            total += math.prod(shape)
        self.device_buffer = torch.zeros(total, dtype=torch.long, device=device)
        # With async scheduling two pinned twins, used in turn: the host fills step N+1's while step N's
        # copy may still be queued. The copy from the same twin (step N-1's) is done: the host has read
        # step N-1's tokens, which the stream sampled after that copy.
        self.host_buffers = [torch.zeros(total, dtype=torch.long, pin_memory=device.type == "cuda")
                             for _ in range(twins)]
        # The tables are written in place, row by row as they change (varlen_inputs.TableRows).
        self.tables = [TableRows(self.views(max_batch, b)["block_tables"].numpy()) for b in self.host_buffers]
        self.turn = 0

    @property
    def host_buffer(self) -> torch.Tensor:
        return self.host_buffers[self.turn]

    @property
    def table_rows(self) -> TableRows:
        return self.tables[self.turn]

    def next_buffer(self) -> None:
        self.turn = (self.turn + 1) % len(self.host_buffers)

    def views(self, size: int, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The arrays of a graph of `size` sequences: leading parts of each region."""
        buffer = self.device_buffer if buffer is None else buffer
        out = {}
        for name, shape in self.shapes.items():
            at = self.offsets[name]
            if name == "write_index":            # head-major rows of `size` tokens
                out[name] = buffer[at:at + self.kv_heads * size]
            elif name == "cu_q":
                out[name] = buffer[at:at + size + 1]
            elif name == "block_tables":
                out[name] = buffer[at:at + size * shape[1]].view(size, shape[1])
            else:
                out[name] = buffer[at:at + size]
        return out

    def fill(self, arrays: dict[str, torch.Tensor], size: int) -> None:
        host = self.views(size, self.host_buffer)
        for name, view in host.items():
            if name != "block_tables":        # already there: written in place
                view.copy_(arrays[name])

    def upload(self, transfers) -> None:
        transfers.uploads += 1
        self.device_buffer.copy_(self.host_buffer, non_blocking=True)


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int, capture: bool = True):
        self.runner = runner
        self.sizes = graph_sizes(max_num_seqs)
        self.table_width = -(-runner.max_model_len // runner.block_size)
        self.static = StaticInputs(self.sizes[-1], self.table_width, runner.num_kv_heads, runner.device,
                                   twins=2 if runner.config.async_scheduling else 1)
        self.capture = capture
        self.graphs: dict[int, tuple] = {}
        self.replays = 0
        self.pool = None
        for size in reversed(self.sizes):     # largest first: the others reuse its memory pool
            self.graphs[size] = self._capture(size) if capture else (None, None, self._metadata(size))

    def plan(self, batch, sample_rows: list[int]) -> int | None:
        """The graph size that serves this step, or None for an eager step."""
        if any(n != 1 for _, n in batch) or sample_rows != list(range(len(batch))):
            return None
        if any(seq.num_computed_tokens + 1 > self.table_width * self.runner.block_size for seq, _ in batch):
            return None
        return size_for(len(batch), self.sizes)

    def run(self, batch, size: int, carry: Carry | None = None) -> torch.Tensor:
        r = self.runner
        self.static.next_buffer()
        arrays = varlen_arrays(batch, r.block_size, r.num_kv_heads, r.gqa_group, list(range(len(batch))),
                               pad_to=size, scratch_block=r.scratch_block, table_rows=self.static.table_rows)
        self.static.fill(arrays, size)
        self.static.upload(r.transfers)
        graph, logits, meta = self.graphs[size]
        if carry is not None:
            carry.apply(meta.input_ids, r.transfers)
        self.replays += 1
        if graph is None:
            logits = self._forward(meta)
        else:
            graph.replay()
        return logits[0, :len(batch)].float()

    # ---- capture --------------------------------------------------------------------------------
    def _metadata(self, size: int) -> AttentionMetadata:
        r = self.runner
        v = self.static.views(size)
        varlen = VarlenBatch(v["cu_q"], v["seq_lens"], v["block_tables"], v["tile_seq"], v["tile_q0"],
                             num_segments=choose_segments(size, r.num_kv_heads, self.table_width, r.num_sms))
        meta = AttentionMetadata(kv_cache=r.kv_cache, write_index=v["write_index"],
                                 varlen=varlen, block_size=r.block_size)
        meta.input_ids, meta.positions = v["input_ids"], v["positions"]
        return meta

    def _forward(self, meta: AttentionMetadata) -> torch.Tensor:
        with step_context(meta):
            return self.runner.model(input_ids=meta.input_ids[None], position_ids=meta.positions[None],
                                     use_cache=False, logits_to_keep=0).logits

    def _capture(self, size: int):
        r = self.runner
        meta = self._metadata(size)
        padding = varlen_arrays([], r.block_size, r.num_kv_heads, r.gqa_group, [], pad_to=size,
                                scratch_block=r.scratch_block, table_rows=self.static.table_rows)
        self.static.fill(padding, size)
        self.static.upload(r.transfers)
        self._forward(meta)                   # warm-up: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize(r.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(meta)
        self.pool = graph.pool()
        return graph, logits, meta
