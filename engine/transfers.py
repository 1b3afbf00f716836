"""Host <-> device traffic of a step, in as few transfers as the step allows, and counted.

A CUDA step waits on the device only once: when the sampled tokens (with their logprobs) come
back. Everything the host sends (token ids, positions, slots, block tables, sampling parameters)
goes as integer or float arrays packed into one pinned buffer and copied without blocking; a
`torch.tensor(list, device="cuda")` per array would instead wait for the stream each time (a copy
from pageable memory does). The counters are what the tests and the GPU bench read: uploads and
syncs per step.
"""

from __future__ import annotations

import torch


class Transfers:
    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self.uploads = 0
        self.syncs = 0

    def upload(self, arrays: dict[str, torch.Tensor | list]) -> dict[str, torch.Tensor]:
        """Host arrays -> device tensors of the same shapes, through one int64 buffer and one copy.

        Lists become int64; float tensors travel as the bits of their float64 values and come out
        float64 (exact), so integers and floats share the one copy.
        """
        host = {k: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.long) for k, v in arrays.items()}
        parts = [t.reshape(-1).double().view(torch.long) if t.is_floating_point() else t.reshape(-1).long()
                 for t in host.values()]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        self.uploads += 1
        if self.device.type != "cpu":
            flat = flat.pin_memory() if self.pin else flat
            flat = flat.to(self.device, non_blocking=True)
        out, at = {}, 0
        for name, t in host.items():
            part = flat[at:at + t.numel()]
            out[name] = (part.view(torch.float64) if t.is_floating_point() else part).view(t.shape)
            at += t.numel()
        return out

    def download(self, *tensors: torch.Tensor) -> list[list]:
        """Device tensors -> Python lists: the step's one wait on the device."""
        self.syncs += 1
        return _unpack(_packed(tensors).tolist(), tensors)

    def drain(self) -> None:
        """Wait for all the device's queued work, not only a step's read-back: after an error, a
        launch that failed half-way may have queued copies from a pinned buffer the next step refills."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def download_later(self, *tensors: torch.Tensor) -> PendingDownload:
        """Start copying device tensors back without waiting: the host goes on (async scheduling)."""
        return PendingDownload(tensors, self)


class PendingDownload:
    """Device tensors on their way to the host: one non-blocking copy into pinned memory and an event.

    `tensor` (the first) stays readable on the device: the next step takes its input ids from it.
    `result()` waits for the copy alone, not for work queued after it, and counts as the step's sync.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], transfers: Transfers):
        self.tensor = tensors[0]
        self.tensors = tensors
        self.transfers = transfers
        self.event = None
        flat = _packed(tensors)
        if flat.device.type == "cuda":
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flat

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def result(self) -> list[list]:
        self.transfers.syncs += 1
        self.wait()
        return _unpack(self.host.tolist(), self.tensors)


def _packed(tensors) -> torch.Tensor:
    """One tensor to copy back: the only one as it is, or all of them as float64 (exact for ids)."""
    return tensors[0] if len(tensors) == 1 else torch.cat([t.reshape(-1).double() for t in tensors])


def _unpack(flat: list, tensors) -> list[list]:
    if len(tensors) == 1:
        return [flat]
    out, at = [], 0
    for t in tensors:
        part = flat[at:at + t.numel()]
        at += t.numel()
        out.append(_reshape(part, t.shape, t.dtype))
    return out


def _reshape(values: list[float], shape: torch.Size, dtype: torch.dtype) -> list:
    if not dtype.is_floating_point:
        values = [int(v) for v in values]
    if len(shape) <= 1:
        return values
    row = shape[-1]
    return [values[i:i + row] for i in range(0, len(values), row)] if len(shape) == 2 else values
