"""Speculation: after the user accepts a suggestion, the next request continues from
the state after the previous prompt instead of a new prefill.

The next prompt is built as always (canonical tokens, healed at its cursor). When its
tokens start with every token the accepted request fed, the previous prompt's state
is exactly the state after that prefix, and only the rest is fed: the accepted text,
its healed tail and whatever the layout put after it. Any other change (an edit in
the window, another ring, another buffer, a window that moved) makes the tokens differ
and the request prefills as usual, so a speculative state is never one computed for
another text. The state is stored under the new prompt's own key, where any later
request with the same prompt finds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .prefill import Prefiller, PrefillResult
from .prompt_layout import Prompt
from .state_cache import Snapshot


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
    parent_tokens: List[int]  # every token that prompt fed (start token included)
    text: str                 # the accepted text (for the log and tests)


class Speculator:
    """Holds at most one speculation; ``prefill`` consumes it."""

    def __init__(self, prefiller: Prefiller):
        self.prefiller = prefiller
        self.pending: Optional[Speculation] = None

    def after_accept(self, last: LastRequest, text: str) -> None:
        self.pending = Speculation(last.key, last.prompt.tokens(), text)

    def prefill(self, prompt: Prompt, keys: Sequence[str]) -> Optional[PrefillResult]:
        """The state after ``prompt`` continued from the accepted request's, or None (then
        prefill as usual). ``keys``: the prompt's segment keys."""
        spec, self.pending = self.pending, None
        if spec is None:
            return None
        tokens = prompt.tokens()
        n = len(spec.parent_tokens)
        if len(tokens) < n or tokens[:n] != spec.parent_tokens:
            return None
        cache, model = self.prefiller.cache, self.prefiller.model
        have = cache.get(keys[-1])
        if have is not None:
            return PrefillResult(have[0], keys[-1], have[0].n_tokens, 0, have[1])
        got = cache.get(spec.parent_key)
        if got is None:
            return None
        snap, tier = got
        rest = tokens[n:]
        logits, state = snap.logits, snap.state
        if rest:
            piece = torch.tensor([rest], dtype=torch.long, device=model.device)     # [1, T]
            logits, state = model.forward(piece, snap.state)                        # [1, V]
        new = Snapshot(state, logits, snap.n_tokens + len(rest))
        cache.put(keys[-1], new)
        return PrefillResult(new, keys[-1], snap.n_tokens, len(rest), tier)
