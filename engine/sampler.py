"""The batched sampler: one pass over a step's logits, every request with its own parameters.

Order of operations (as vLLM's): logprobs of the raw logits, penalties, min_tokens suppression,
then greedy argmax or temperature -> top-k -> top-p -> min-p -> draw. Draws use the exponential
race (argmax of p / E with E ~ Exp(1)), which is exact categorical sampling and lets a seeded
request draw from its own generator: its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .sequence import Sequence
from .transfers import PendingDownload, Transfers

if TYPE_CHECKING:
    from .overlap import Carry


class Sampler:
    """Every row's work is batched over the step: one upload of the rows' parameters (pinned,
    non-blocking) and one download of the tokens with their logprobs, the step's one sync."""

    def __init__(self, device: torch.device, seed: int, transfers: Transfers | None = None):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.transfers = transfers or Transfers(device)

    def new_request_generator(self, seed: int, sample_index: int) -> torch.Generator:
        # Samples of one request (n > 1) must differ from each other, yet each must reproduce.
        derived = seed if sample_index == 0 else hash((seed, sample_index)) & (2**63 - 1)
        return torch.Generator(device=self.device).manual_seed(derived)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], stop_ids: list[list[int]],
                 constraints=None) -> list[int]:
        """One token per row (the sampled ids only; `sample` brings their logprobs too)."""
        return self.sample(logits, seqs, stop_ids, constraints)[0]

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], stop_ids: list[list[int]],
               constraints=None) -> list[list]:
        """Sample one token per row and read them back: [tokens] or, when a row asked for logprobs,
        [tokens, chosen, top values, top ids] (`logprob_entries` turns them into each row's entry).

        stop_ids[i] are the ids that min_tokens must keep row i from producing; `constraints`
        (constraints.StepConstraints) masks what grammars and reasoning budgets forbid. Logprobs
        are of the model's raw distribution, as vLLM's default.
        """
        tokens = self._tokens(logits, seqs, stop_ids, constraints)
        return self.transfers.download(tokens, *self._logprob_tensors(logits, tokens, seqs))

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, seqs: list[Sequence], stop_ids: list[list[int]],
               carry: Carry | None = None) -> PendingDownload:
        """`sample` without waiting for the read (async scheduling: no constraints). `carry` holds the
        step before's tokens, still on the device, that penalties must count."""
        tokens = self._tokens(logits, seqs, stop_ids, None, carry)
        return self.transfers.download_later(tokens, *self._logprob_tensors(logits, tokens, seqs))

    @staticmethod
    def _logprob_tensors(logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]) -> tuple:
        """The sampled token's logprob and the top k of the raw distribution (k: the step's largest ask)."""
        k = max((s.params.logprobs for s in seqs if s.params.logprobs is not None), default=None)
        if k is None:
            return ()
        logprobs = torch.log_softmax(logits, dim=-1)
        top = logprobs.topk(max(k, 1), dim=-1)
        return logprobs.gather(1, tokens[:, None])[:, 0], top.values, top.indices

    def _tokens(self, logits: torch.Tensor, seqs: list[Sequence], stop_ids: list[list[int]],
                constraints, pending: Carry | None = None) -> torch.Tensor:
        host = _row_arrays(seqs, stop_ids, logits.shape[1], pending)
        rows = self.transfers.upload(host) if host else {}
        raw_logits = logits
        if "penalised" in rows:
            logits = apply_penalties(logits.clone(), seqs, rows, pending)
        if "suppress_rows" in rows:
            logits = logits.clone()
            logits[rows["suppress_rows"], rows["suppress_cols"]] = float("-inf")
        if constraints is not None:
            # Logprobs are of the raw logits; without them the constraint may mask in place.
            logits = constraints.apply(logits, raw_logits, any(s.params.logprobs is not None for s in seqs))
        tokens = logits.argmax(dim=-1)
        if "sampled" in rows:
            picked = rows["sampled"]
            tokens[picked] = self._draw(logits[picked], [s for s in seqs if not s.params.greedy], rows)
        return tokens

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], rows: dict) -> torch.Tensor:
        logits = logits / rows["temperature"][:, None].to(logits.dtype)
        logits = apply_top_k_top_p_min_p(logits, seqs, rows)
        probs = torch.softmax(logits, dim=-1)
        race = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if len(unseeded) == len(seqs):
            race.exponential_(generator=self.generator)
        else:
            for i, seq in enumerate(seqs):   # a view per row: no index tensor, no transfer
                race[i].exponential_(generator=seq.generator or self.generator)
        return (probs / race).argmax(dim=-1)


def _row_arrays(seqs: list[Sequence], stop_ids: list[list[int]], vocab: int,
                pending: Carry | None = None) -> dict[str, list]:
    """What the device needs to know about the rows, as host arrays (only those the step uses)."""
    out: dict[str, list] = {}
    sup_rows, sup_cols = [], []
    for i, ids in enumerate(stop_ids):    # non-empty for a row below min_tokens (RequestFactory.suppressed_ids)
        if ids:
            sup_rows.extend([i] * len(ids))
            sup_cols.extend(ids)
    if sup_rows:
        out["suppress_rows"], out["suppress_cols"] = sup_rows, sup_cols
    sampled = [s for s in seqs if not s.params.greedy]
    if sampled:
        out["sampled"] = [i for i, s in enumerate(seqs) if not s.params.greedy]
        out["temperature"] = torch.tensor([s.params.temperature for s in sampled], dtype=torch.float64)
        out["top_k"] = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in sampled]
        out["top_p"] = torch.tensor([s.params.top_p for s in sampled], dtype=torch.float64)
        out["min_p"] = torch.tensor([s.params.min_p for s in sampled], dtype=torch.float64)
    out.update(_penalty_arrays(seqs, vocab, pending))
    return out


def logprob_entries(seqs: list[Sequence], tokens: list[int], chosen: list[float] | None = None,
                    top_values: list[list[float]] | None = None, top_ids: list[list[int]] | None = None
                    ) -> list[dict[int, float] | None]:
    """Per row, {token id: logprob} of the sampled token and the top k of the raw model distribution
    (None for a row that asked for none, or for all rows when no row did)."""
    if chosen is None:
        return [None] * len(seqs)
    out: list[dict[int, float] | None] = []
    for i, seq in enumerate(seqs):
        k = seq.params.logprobs
        if k is None:
            out.append(None)
            continue
        entry = dict(zip(top_ids[i][:k], top_values[i][:k])) if k > 0 else {}
        entry[tokens[i]] = chosen[i]
        out.append(entry)
    return out


def _penalty_arrays(seqs: list[Sequence], vocab: int, pending: Carry | None = None) -> dict[str, list]:
    """The penalised rows' new tokens since their last step (and the prompt, on their first step).

    Each request keeps its prompt mask and output counts on the device (seq.penalty_state), so a
    penalised request costs O(new tokens) per step, not O(its whole length). A pending token is
    counted from the device (`pending_rows`, `pending_from`), and once read back it is not new.
    """
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return {}
    prompt_rows, prompt_ids, new_rows, new_ids, pending_rows, pending_from = [], [], [], [], [], []
    params = {"repetition": [], "presence": [], "frequency": []}
    for r, i in enumerate(rows):
        seq = seqs[i]
        counted = 0 if seq.penalty_state is None else seq.penalty_state[2]
        if seq.penalty_state is None:
            ids = [t for t in seq.prompt_token_ids if t < vocab]
            prompt_rows.extend([r] * len(ids))
            prompt_ids.extend(ids)
        new = [t for t in seq.output_token_ids[counted:] if t < vocab]
        new_rows.extend([r] * len(new))
        new_ids.extend(new)
        source = -1 if pending is None else pending.row_of(seq)
        if source >= 0:
            pending_rows.append(r)
            pending_from.append(source)
        params["repetition"].append(seq.params.repetition_penalty)
        params["presence"].append(seq.params.presence_penalty)
        params["frequency"].append(seq.params.frequency_penalty)
    out = {"penalised": rows, "prompt_rows": prompt_rows, "prompt_ids": prompt_ids, "new_rows": new_rows,
           "new_ids": new_ids, **{f"{k}_penalty": torch.tensor(v, dtype=torch.float64) for k, v in params.items()}}
    if pending_rows:
        out["pending_rows"], out["pending_from"] = pending_rows, pending_from
    return out


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: dict | None = None,
                    pending: Carry | None = None) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens; presence and frequency over the output."""
    if rows is None:
        rows = Transfers(logits.device).upload(_penalty_arrays(seqs, logits.shape[1]))
    if "penalised" not in rows:
        return logits
    penalised = [seqs[i] for i, s in enumerate(seqs) if s.params.has_penalties]
    vocab, dev = logits.shape[1], logits.device
    fresh = [s.penalty_state is None for s in penalised]
    if any(fresh):
        for s in penalised:
            if s.penalty_state is None:
                s.penalty_state = (torch.zeros(vocab, dtype=torch.bool, device=dev), torch.zeros(vocab, device=dev), 0)
    in_prompt = torch.stack([s.penalty_state[0] for s in penalised])
    counts = torch.stack([s.penalty_state[1] for s in penalised])
    in_prompt[rows["prompt_rows"], rows["prompt_ids"]] = True
    counts.index_put_((rows["new_rows"], rows["new_ids"]), torch.ones_like(rows["new_ids"], dtype=counts.dtype),
                      accumulate=True)
    if "pending_rows" in rows:
        counts.index_put_((rows["pending_rows"], pending.tokens[rows["pending_from"]]),
                          torch.ones_like(rows["pending_rows"], dtype=counts.dtype), accumulate=True)
    for r, s in enumerate(penalised):
        s.penalty_state = (in_prompt[r], counts[r], s.num_output_tokens)
    index = rows["penalised"]
    x = logits[index]
    rep = rows["repetition_penalty"][:, None].to(x.dtype)
    seen = in_prompt | (counts > 0)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - rows["frequency_penalty"][:, None].to(x.dtype) * counts - rows["presence_penalty"][:, None].to(
        x.dtype) * (counts > 0).to(x.dtype)
    logits[index] = x
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, seqs: list[Sequence], rows: dict) -> torch.Tensor:
    """Mask tokens outside each row's top-k, nucleus (top-p) and min-p sets with -inf."""
    params = [s.params for s in seqs]
    if all(p.top_k == 0 and p.top_p >= 1.0 and p.min_p == 0.0 for p in params):
        return logits
    vocab = logits.shape[1]
    dev = logits.device
    top_k, top_p, min_p = rows["top_k"], rows["top_p"].to(logits.dtype), rows["min_p"].to(logits.dtype)

    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
