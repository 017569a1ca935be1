"""Speculation: after the user accepts a suggestion, the next request continues from
the state after (previous prompt + accepted tokens) instead of a new prefill.

That state is only valid for the buffer it describes. The accepted request's whole
window with the text inserted is remembered (line number -> text) together with the
key of the ring prefix (the chunk segments); the next request uses the speculative
state only if its buffer, file and cursor match, every line its window shares with
the expected buffer is equal (an edit anywhere in the window, however far from the
cursor, disables it), and the ring is unchanged. Keys extend the same hash chain as
every other checkpoint: H(key of the previous prompt | accepted tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .prefill import Prefiller, PrefillResult
from .prompt_layout import Prompt
from .state_cache import Snapshot, chain_key


@dataclass
class LastRequest:
    """What the previous completed request saw and produced (for accepts)."""
    id: object
    request: dict             # copy: id, buf, filename, lines, first, row, col
    prompt: Prompt
    key: str                  # cache key of the state after the prompt
    ring_key: str             # cache key after the prompt's ring chunks
    rows: list                # candidates.Row of every decoded row


@dataclass
class Speculation:
    parent_key: str           # state after the accepted request's prompt
    tokens: List[int]         # accepted text as the model's tokens
    buf: object
    filename: object
    row: int                  # cursor row after the insertion
    line_prefix: str          # cursor line up to the cursor after the insertion
    line_suffix: str
    lines: Dict[int, str]     # expected buffer lines (line number -> text) after the insertion
    ring_key: str


def accepted_tokens(tokenizer, rows, text: str) -> List[int]:
    """``text`` as tokens, reusing the longest run of a decoded row's own tokens (the
    tokens the model produced, so the state matches what it generated)."""
    want = text.encode("utf-8")
    best: List[int] = []
    best_len = 0
    for r in sorted(rows, key=lambda r: -r.mean_logprob):
        toks, got = [], b""
        for t in r.tokens:
            b = tokenizer.token_bytes(t)
            if not want.startswith(got + b):
                break
            toks.append(t)
            got += b
        if len(got) > best_len:
            best, best_len = toks, len(got)
    rest = want[best_len:]
    return best + (list(tokenizer.encode(rest)) if rest else [])


def speculate(last: LastRequest, text: str, tokens: List[int]) -> Speculation:
    """The buffer after inserting ``text`` at the last request's cursor."""
    req, prompt = last.request, last.prompt
    lines, first, row = req["lines"], req["first"], req["row"]
    r = row - first
    inserted = (prompt.line_prefix + text).split("\n")
    cursor_line = inserted[-1] + prompt.line_suffix
    new_window = list(lines[:r]) + inserted[:-1] + [cursor_line] + list(lines[r + 1:])
    return Speculation(
        parent_key=last.key, tokens=tokens, buf=req.get("buf"), filename=req.get("filename"),
        row=row + len(inserted) - 1, line_prefix=inserted[-1], line_suffix=prompt.line_suffix,
        lines={first + i: ln for i, ln in enumerate(new_window)}, ring_key=last.ring_key)


def matches(spec: Speculation, request: dict, prompt: Prompt, ring_key: str) -> bool:
    """True when ``request`` shows exactly the buffer ``spec`` expects (see module doc)."""
    if request.get("buf") != spec.buf or request.get("filename") != spec.filename:
        return False
    if request["row"] != spec.row or prompt.line_prefix != spec.line_prefix \
            or prompt.line_suffix != spec.line_suffix or ring_key != spec.ring_key:
        return False
    first = request["first"]
    shared = 0
    for i, ln in enumerate(request["lines"]):
        want = spec.lines.get(first + i)
        if want is not None:
            if want != ln:
                return False
            shared += 1
    return shared > 0


class Speculator:
    """Holds at most one speculation; ``prefill`` consumes it."""

    def __init__(self, prefiller: Prefiller):
        self.prefiller = prefiller
        self.pending: Optional[Speculation] = None

    def after_accept(self, last: LastRequest, text: str, tokenizer) -> None:
        self.pending = speculate(last, text, accepted_tokens(tokenizer, last.rows, text))

    def prefill(self, request: dict, prompt: Prompt, ring_key: str) -> Optional[PrefillResult]:
        """The speculative state for ``request``, or None (then prefill as usual)."""
        spec, self.pending = self.pending, None
        if spec is None or not matches(spec, request, prompt, ring_key):
            return None
        cache, model = self.prefiller.cache, self.prefiller.model
        got = cache.get(spec.parent_key)
        if got is None:
            return None
        snap, tier = got
        key = chain_key(spec.parent_key, spec.tokens)
        have = cache.get(key)
        if have is not None:
            return PrefillResult(have[0], key, have[0].n_tokens, 0, have[1])
        piece = torch.tensor([spec.tokens], dtype=torch.long, device=model.device)   # [1, T]
        logits, state = model.forward(piece, snap.state)                              # [1, V]
        new = Snapshot(state, logits, snap.n_tokens + len(spec.tokens))
        cache.put(key, new)
        return PrefillResult(new, key, snap.n_tokens, len(spec.tokens), tier)
