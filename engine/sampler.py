"""The batched sampler: one pass over a step's logits, every request with its own parameters.

Order of operations (as vLLM's): logprobs of the raw logits, penalties, min_tokens suppression,
then greedy argmax or temperature -> top-k -> top-p -> min-p -> draw. Draws use the exponential
race (argmax of p / E with E ~ Exp(1)), which is exact categorical sampling and lets a seeded
request draw from its own generator: its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from .sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def new_request_generator(self, seed: int, sample_index: int) -> torch.Generator:
        # Samples of one request (n > 1) must differ from each other, yet each must reproduce.
        derived = seed if sample_index == 0 else hash((seed, sample_index)) & (2**63 - 1)
        return torch.Generator(device=self.device).manual_seed(derived)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], stop_ids: list[list[int]],
                 constraints=None) -> list[int]:
        """Sample one token per row; records logprobs on the sequences that asked for them.

        stop_ids[i] are the ids that min_tokens must keep row i from producing; `constraints`
        (constraints.StepConstraints) masks what grammars and reasoning budgets forbid. Logprobs
        are of the model's raw distribution, as vLLM's default.
        """
        raw_logits = logits
        if any(s.params.has_penalties for s in seqs):
            logits = apply_penalties(logits.clone(), seqs)
        logits = self._suppress_early_stop(logits, seqs, stop_ids)
        if constraints is not None:
            # Logprobs are of the raw logits; without them the constraint may mask in place.
            logits = constraints.apply(logits, raw_logits, any(s.params.logprobs is not None for s in seqs))
        tokens = logits.argmax(dim=-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            tokens[rows] = self._draw(logits[rows], [seqs[i] for i in rows])
        if any(s.params.logprobs is not None for s in seqs):
            _record_logprobs(torch.log_softmax(raw_logits, dim=-1), seqs, tokens)
        return tokens.tolist()

    def _suppress_early_stop(self, logits, seqs, stop_ids):
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            if len(seq.output_token_ids) < seq.params.min_tokens:
                rows.extend([i] * len(stop_ids[i]))
                cols.extend(stop_ids[i])
        if rows:
            logits = logits.clone()
            logits[rows, cols] = float("-inf")
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        logits = logits / temps[:, None]
        logits = apply_top_k_top_p_min_p(logits, seqs)
        probs = torch.softmax(logits, dim=-1)
        race = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            race[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(
                generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                race[i].exponential_(generator=seq.generator)
        return (probs / race).argmax(dim=-1)


def _record_logprobs(logprobs: torch.Tensor, seqs: list[Sequence], tokens: torch.Tensor) -> None:
    """Append {token id: logprob} (the sampled token and the top-k) of the raw model distribution."""
    for i, seq in enumerate(seqs):
        k = seq.params.logprobs
        if k is None:
            continue
        entry = {}
        if k > 0:
            top = logprobs[i].topk(k)
            entry = dict(zip(top.indices.tolist(), top.values.tolist()))
        token = int(tokens[i])
        entry[token] = float(logprobs[i, token])
        if seq.logprobs is None:
            seq.logprobs = []
        seq.logprobs.append(entry)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens; presence and frequency over the output."""
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        in_prompt, counts = _token_counts(seq, logits.shape[1], logits.device)
        if p.repetition_penalty != 1.0:
            seen = in_prompt | (counts > 0)
            row = logits[i]
            logits[i] = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty,
                                                      row * p.repetition_penalty), row)
        if p.presence_penalty or p.frequency_penalty:
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def _token_counts(seq: Sequence, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt-token mask, output-token counts) over the vocabulary, kept on the sequence.

    Built once per request and updated with the tokens sampled since the last step, so a
    penalised request costs O(new tokens) per step, not O(its whole length).
    """
    if seq.penalty_state is None:
        prompt = torch.tensor([t for t in seq.prompt_token_ids if t < vocab], dtype=torch.long, device=device)
        in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
        in_prompt[prompt] = True
        seq.penalty_state = (in_prompt, torch.zeros(vocab, device=device), 0)
    in_prompt, counts, counted = seq.penalty_state
    new = [t for t in seq.output_token_ids[counted:] if t < vocab]
    if new:
        idx = torch.tensor(new, dtype=torch.long, device=device)
        counts.index_add_(0, idx, torch.ones(len(new), device=device))
    seq.penalty_state = (in_prompt, counts, len(seq.output_token_ids))
    return in_prompt, counts


def apply_top_k_top_p_min_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Mask tokens outside each row's top-k, nucleus (top-p) and min-p sets with -inf."""
    params = [s.params for s in seqs]
    if all(p.top_k == 0 and p.top_p >= 1.0 and p.min_p == 0.0 for p in params):
        return logits
    vocab = logits.shape[1]
    dev = logits.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)

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
