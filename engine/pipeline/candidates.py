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

import re
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .prompt_layout import FIM_MARK, indent_width
from ..core.sampler import Sampler, SamplingParams
from ..core.vocab_index import vocab_index

EOS = 0


@dataclass
class StopRules:
    max_tokens: int = 64
    max_lines: int = 8
    stop_strings: Sequence[str] = ()
    indent: int = 0                      # cursor line indentation; a dedent below it ends the block
    blank_line_ends_block: bool = False  # at top level (indent 0): a blank line after code ends it
    deadline: Optional[float] = None     # time.monotonic() value after which every row stops


LINE_TOKENS = 10     # a line of code is about this many tokens (~40 characters): what the
                     # float needs of a row that has not reached its newline yet (stats only)


@dataclass
class Row:
    tokens: List[int] = field(default_factory=list)      # sampled tokens (without the final 0)
    logprobs: List[float] = field(default_factory=list)  # of every sampled token (with the final 0)
    raw: str = ""                                        # decoded text of ``tokens``
    text: str = ""                                       # raw text cut by the stop rules
    done: bool = False
    reason: str = ""                                     # eos|stop|block|max_lines|max_tokens|time
    streamed: bool = False                               # the row on_partial showed last
    first_line_at: Optional[float] = None                # perf_counter() when its first line was whole
                                                         # (a newline, the end, or LINE_TOKENS tokens)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")


def apply_text_rules(text: str, rules: StopRules):
    """(text cut at the first text-based stop, reason or "") for a row's decoded text."""
    cut, reason = len(text), ""
    for s in rules.stop_strings:
        i = text.find(s)
        if 0 <= i < cut:
            cut, reason = i, "stop"
    lines = text[:cut].split("\n")
    pos = len(lines[0])
    seen_code = bool(lines[0].strip())
    for n, line in enumerate(lines[1:], start=1):
        if n >= rules.max_lines:              # the max_lines-th newline ends the candidate
            return text[:pos], "max_lines"
        if line.strip() and indent_width(line) < rules.indent:
            return text[:pos], "block"        # cut before the newline that starts the dedented line
        if rules.blank_line_ends_block and seen_code and not line.strip() and n < len(lines) - 1:
            return text[:pos], "block"        # a finished blank line after code at top level
        seen_code = seen_code or bool(line.strip())
        pos += 1 + len(line)
    return text[:cut], reason


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
            streamed = _stream_row(rows, streamed, shown, after_lines)
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


def _stream_row(rows: Sequence[Row], current: Optional[int], shown: Optional[str],
                after_lines: Sequence[str] = ()) -> Optional[int]:
    """The row to stream: the best (mean log-probability) row with non-blank text among
    those whose text extends ``shown`` (all, before anything shows); ``current`` when none
    does (its text was cut by a stop rule): the ghost text never switches to another text."""
    best = None
    for i, r in enumerate(rows):
        if not r.text.strip() or (shown is not None and not r.text.startswith(shown)):
            continue
        if after_lines and echoes_after_cursor(r.text, after_lines):
            continue                           # (so far) only what follows the cursor: not shown
        if best is None or r.mean_logprob > rows[best].mean_logprob:
            best = i
    return current if best is None else best


_TRAILING_BLANK_LINES = re.compile(r"(\n[ \t]*)+\Z")


def clean_text(text: str) -> str:
    """Drop trailing blank lines (a suggestion never ends with empty lines)."""
    return _TRAILING_BLANK_LINES.sub("", text)


def repeats_after_cursor(text: str, after_lines: Sequence[str]) -> bool:
    """True when ``text`` only repeats what already follows the cursor (line by line,
    ignoring surrounding whitespace and blank lines)."""
    cand = [ln.strip() for ln in text.split("\n") if ln.strip()]
    after = [ln.strip() for ln in after_lines if ln.strip()]
    return bool(cand) and cand == after[: len(cand)]


def echoes_after_cursor(text: str, after_lines: Sequence[str]) -> bool:
    """True when ``text`` so far is only the start of what follows the cursor (line by line,
    ignoring surrounding whitespace and blank lines; its last line may be cut short): such a
    row would show nothing new, and once complete it is dropped by ``repeats_after_cursor``."""
    cand = [ln.strip() for ln in text.split("\n") if ln.strip()]
    after = [ln.strip() for ln in after_lines if ln.strip()]
    if not cand or len(cand) > len(after):
        return False
    return cand[:-1] == after[:len(cand) - 1] and after[len(cand) - 1].startswith(cand[-1])


def rank_candidates(rows: Sequence[Row], after_lines: Sequence[str]) -> List[dict]:
    """Filtered, deduplicated candidates: [{"text": str, "logprob": float, "row": int}].

    The streamed row's candidate (``Row.streamed``: the text the user has been reading)
    comes first; among duplicates it is the one kept. When the filters dropped it (it only
    repeats the text after the cursor), the best candidate that extends its text comes
    first, if any. The rest follow by mean log-probability, best first.
    """
    best_by_text = {}
    streamed_text = None                       # the streamed row's cleaned text, filtered or not
    for i, r in enumerate(rows):
        text = clean_text(r.text)
        if r.streamed:
            streamed_text = text
        if not text.strip() or repeats_after_cursor(text, after_lines):
            continue
        norm = "\n".join(ln.rstrip() for ln in text.split("\n"))
        lp = r.mean_logprob
        old = best_by_text.get(norm)
        if old is None or r.streamed or (lp > old["logprob"] and not old["streamed"]):
            best_by_text[norm] = {"text": text, "logprob": lp, "row": i, "streamed": r.streamed}
    ranked = sorted(best_by_text.values(), key=lambda c: -c["logprob"])
    first = next((c for c in ranked if c["streamed"]), None)
    if first is None and streamed_text is not None and streamed_text.strip():
        first = next((c for c in ranked if c["text"].startswith(streamed_text.rstrip())), None)
    if first is not None:
        ranked.remove(first)
        ranked.insert(0, first)
    for c in ranked:
        del c["streamed"]
    return ranked
