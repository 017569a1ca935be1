"""Batched token sampler: penalties with decay, temperature, top-p, top-k, per-row seeds.

Per step and row (as in the rwkv package's sampler):
    logit[n] -= alpha_presence * [n seen] + occurrences[n] * alpha_frequency
    occurrences *= alpha_decay ; then softmax -> top_k -> top_p -> softmax(logit / T)
The nucleus is cut on the untempered distribution (as in the rwkv package and
llama.cpp, temperature last); temperature then scales the kept LOGITS (never
``probs ** (1/T)``, which underflows to all zeros for small T on a flat distribution).
Temperature 0 is greedy. Each row draws from its own torch.Generator, so a row's
tokens depend only on its seed and its own logits: N forked rows decoded together
equal N separate decodes with the same seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0                 # 0 = off
    alpha_presence: float = 0.0
    alpha_frequency: float = 0.2
    alpha_decay: float = 0.996

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.alpha_decay <= 1:
            raise ValueError(f"alpha_decay must be in [0, 1], got {self.alpha_decay}")


class Sampler:
    """Samples one token per row from logits [B, V]; keeps per-row penalty counts."""

    POOL = 1024   # candidate tokens considered for top-p when top_k is off

    def __init__(self, params: SamplingParams, batch: int, vocab: int,
                 seeds: Optional[Sequence[int]] = None, device="cpu"):
        self.params = params
        self.batch = batch
        self.device = torch.device(device)
        self.occurrences = torch.zeros(batch, vocab, dtype=torch.float32, device=self.device)  # [B, V]
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=self.device)             # [B, V]
        seeds = list(seeds) if seeds is not None else list(range(batch))
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} rows")
        # generators live on the CPU: sampling happens on a [V] row copied there
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (rows that stopped are dropped from the batch)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        self.occurrences = self.occurrences.index_select(0, idx)
        self.seen = self.seen.index_select(0, idx)
        self.generators = [self.generators[i] for i in rows]
        self.batch = len(rows)

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] fp32 after presence/frequency penalties."""
        p = self.params
        logits = logits.float()
        if p.alpha_presence or p.alpha_frequency:
            logits = logits - self.seen.float() * p.alpha_presence - self.occurrences * p.alpha_frequency
        return logits

    def sample(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (tokens [B] long, log-probabilities [B] under the penalized model)."""
        p = self.params
        logits = self.penalized(logits)
        logp = torch.log_softmax(logits, dim=-1)                                  # [B, V]
        if p.temperature == 0:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample_rows(logits, logp)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)
        self.update(tokens)
        return tokens, chosen

    def _sample_rows(self, logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """logits, log-probabilities [B, V] -> tokens [B]: top-k, top-p, temperature, per-row RNG.

        The nucleus is taken within the POOL most likely tokens (one batched topk
        instead of sorting the whole vocabulary per row and step).
        """
        p = self.params
        pool = min(logp.shape[-1], p.top_k or self.POOL)
        top_logp, idx = torch.topk(logp, pool, dim=-1)                            # [B, K] descending
        keep = torch.ones_like(top_logp, dtype=torch.bool)
        if p.top_p < 1:
            probs = top_logp.exp()
            keep = (torch.cumsum(probs, dim=-1) - probs) < p.top_p               # keeps the first token
        tempered = logits.gather(1, idx) / p.temperature                          # [B, K]
        vals = torch.softmax(tempered.masked_fill(~keep, float("-inf")), dim=-1).float().cpu()
        idx = idx.cpu()
        tokens = torch.empty(self.batch, dtype=torch.long)
        for b in range(self.batch):
            j = int(torch.multinomial(vals[b], 1, generator=self.generators[b]))
            tokens[b] = idx[b, j]
        return tokens.to(self.device)

    def update(self, tokens: torch.Tensor) -> None:
        """Record sampled tokens [B] for the penalties."""
        p = self.params
        if p.alpha_decay != 1.0:
            self.occurrences *= p.alpha_decay
        rows = torch.arange(self.batch, device=self.device)
        self.occurrences[rows, tokens] += 1.0
        self.seen[rows, tokens] = True
