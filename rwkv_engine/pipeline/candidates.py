"""Candidates: fork the prompt state into N rows, decode them in one batch, stop each
row on its own rules, then filter and rank.

Per step the whole batch is one ``model.forward(tokens [B, 1], state)`` call; rows
that stop are dropped from the batch (``State.select`` / ``Sampler.select``). Each
row samples from its own seeded generator, so row i of a forked decode equals a
single-row decode with seed i.

Stop rules per row: token 0 (end of text), a stop string, leaving the block (a
non-empty line indented less than the cursor line; at top level, a blank line
after some code), ``max_lines`` lines,
``max_tokens`` tokens, or the request's deadline (all rows). Afterwards candidates
that are whitespace-only, that only repeat the text already after the cursor, or
that duplicate a better one are dropped; the rest are ranked by mean log-probability.

Streaming (``on_partial``, shown as ghost text while the rows decode) never makes the
text jump: it starts with the best row and afterwards moves only to a better row whose
text extends what already shows, so the ghost text only grows. The row streamed last is
marked (``Row.streamed``) and ranked first, so the final suggestion is the text the user
has been reading, extended; the other candidates follow by mean log-probability.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .candidate_rules import (LINE_TOKENS, Row, StopRules, apply_text_rules, clean_text,  # noqa: F401
                              echoes_after_cursor, rank_candidates, repeats_after_cursor, stream_row)
from .prompt_layout import FIM_MARK
from ..core.sampler import Sampler, SamplingParams
from ..core.vocab_index import vocab_index

EOS = 0


def stop_token_ids(tokenizer) -> Tuple[int, ...]:
    """End of text, and the FIM marker "✿" when the vocabulary has it as one token (G1
    knows it only as a FIM marker; candle and rwkv_lightning stop FIM generation on it)."""
    marker = tokenizer.encode(FIM_MARK)
    return (EOS,) + (tuple(marker) if len(marker) == 1 else ())


class HealMask:
    """Logit masks that make a row re-produce the text healed at the cursor (token
    healing): while ``pending`` bytes are owed, only tokens that start with them or are a
    proper prefix of them may be sampled (``VocabIndex.continuing``)."""

    def __init__(self, tokenizer, vocab: int, device):
        self.index = vocab_index(tokenizer)
        self.vocab, self.device = vocab, device
        self._masks: dict = {}                                          # pending -> [V] fp32 (0 / -inf)

    def mask(self, pending: bytes) -> torch.Tensor:
        m = self._masks.get(pending)
        if m is None:
            m = torch.full((self.vocab,), float("-inf"), dtype=torch.float32, device=self.device)
            ids = [i for i in self.index.continuing(pending) if i < self.vocab]
            m[torch.as_tensor(ids, dtype=torch.long, device=self.device)] = 0.0
            self._masks[pending] = m
        return m

    def apply(self, logits: torch.Tensor, pending: Sequence[bytes]) -> torch.Tensor:
        """logits [B, V] with row j masked for ``pending[j]`` (rows with b"" unchanged)."""
        if not any(pending):
            return logits
        logits = logits.clone()
        for j, p in enumerate(pending):
            if p:
                logits[j] += self.mask(p)
        return logits


def decode_candidates(model, state, logits: torch.Tensor, n: int, params: SamplingParams,
                      seeds: Sequence[int], rules: StopRules,
                      should_stop: Optional[Callable[[], bool]] = None,
                      on_partial: Optional[Callable[[str], None]] = None,
                      after_lines: Sequence[str] = (), heal: bytes = b"") -> Optional[List[Row]]:
    """Decode ``n`` rows forked from a batch-1 ``state`` whose last logits are ``logits`` [1, V].

    Returns the rows, or None when ``should_stop`` said the request was superseded. With
    ``on_partial`` the row whose text it showed last is marked ``streamed``; a row that
    only repeats ``after_lines`` (the text after the cursor) is never streamed. ``heal``:
    the bytes the prompt left out at the cursor; every row's first tokens re-produce them
    (masked) and its text is what follows them.
    """
    tok = model.tokenizer
    V = logits.shape[-1]
    state = state.fork(n) if state.batch != n else state               # [n, ...]
    logits = logits.reshape(1, V).expand(n, V)                          # [n, V] fp32
    sampler = Sampler(params, n, V, seeds=seeds, device=logits.device)
    rows = [Row() for _ in range(n)]
    streams = [tok.stream() for _ in range(n)]
    pending = [bytes(heal)] * n                                         # healed bytes each row still owes
    healer = HealMask(tok, V, logits.device) if heal else None
    stops = set(stop_token_ids(tok))
    active = list(range(n))                                             # row ids in batch order
    shown, streamed = None, None                                        # text on_partial showed, its row
    while True:
        if should_stop is not None and should_stop():
            return None
        if healer is not None:
            logits = healer.apply(logits, [pending[rid] for rid in active])
        tokens, logps = sampler.sample(logits)                          # [B], [B]
        t_list, lp_list = tokens.tolist(), logps.tolist()
        keep = []
        for j, rid in enumerate(active):
            row = rows[rid]
            row.logprobs.append(float(lp_list[j]))
            t = int(t_list[j])
            if t in stops and not pending[rid]:
                row.done, row.reason = True, "eos"
                row.first_line_at = row.first_line_at or time.perf_counter()
                continue
            row.tokens.append(t)
            if pending[rid]:
                b, owed = tok.token_bytes(t), pending[rid]
                pending[rid] = b"" if b.startswith(owed) else owed[len(b):]
                row.raw += streams[rid].feed_bytes(b[len(owed):]) if not pending[rid] else ""
            else:
                row.raw += streams[rid].feed(t)
            row.text, reason = apply_text_rules(row.raw, rules)
            if not reason and len(row.tokens) >= rules.max_tokens:
                reason = "max_tokens"
            if reason:
                row.done, row.reason = True, reason
            else:
                keep.append(j)
            if row.first_line_at is None and (reason or "\n" in row.text or len(row.tokens) >= LINE_TOKENS):
                row.first_line_at = time.perf_counter()
        if on_partial is not None:
            streamed = stream_row(rows, streamed, shown, after_lines)
            if streamed is not None and rows[streamed].text != shown:
                shown = rows[streamed].text
                on_partial(shown)
        if not keep:
            break
        if rules.deadline is not None and time.monotonic() >= rules.deadline:
            for j in keep:
                rows[active[j]].done, rows[active[j]].reason = True, "time"
                rows[active[j]].first_line_at = rows[active[j]].first_line_at or time.perf_counter()
            break
        if len(keep) < len(active):
            state = state.select(keep)
            sampler.select(keep)
            tokens = tokens[torch.as_tensor(keep, device=tokens.device)]
            active = [active[j] for j in keep]
        logits, state = model.forward(tokens[:, None], state)           # [B, V], state [B, ...]
    for rid in active:
        rows[rid].text, _ = apply_text_rules(rows[rid].raw + streams[rid].flush(), rules)
    if streamed is not None:
        rows[streamed].streamed = True
    return rows
