"""Prefill with resume: the longest cached prefix of a prompt, the rest through the
model, checkpoints stored on the way.

A prompt is a list of segments; checkpoint keys form a hash chain over them
(``state_cache``): key_i = H(key_{i-1} | segment i). Resume points are

* a segment boundary whose key is cached (any tier), or
* a *partial* key inside segment i, H(key_{i-1} | tokens[:p]), stored by an earlier
  prefill at one of its last token positions ("tail" checkpoints: typing on the cursor
  line resumes from the previous keystroke's state). Partial keys are probed only under
  parents remembered in ``partial_parents`` (one probe per position otherwise).

Forward pieces span segments and end only at ``prefill_chunk`` tokens, at a
checkpointed boundary, or (in the tail) after every token. The state after a resumed
prefill equals the state of a cold prefill of the same tokens (tests/pipeline/test_prefill.py).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .fim_window import PrefillSpeed
from .prompt_layout import CK_NONE, CK_PERSIST, Segment
from .state_cache import Snapshot, StateCache, chain_key, partial_keys

PARTIAL_PARENTS = 256      # segment starts remembered as having checkpoints inside the segment

ShouldStop = Optional[Callable[[], bool]]


@dataclass
class PrefillResult:
    snapshot: Snapshot        # state + logits after the whole prompt
    key: str                  # cache key of the whole prompt
    reused: int               # tokens taken from the cache
    fed: int                  # tokens run through the model
    tier: Optional[str]       # tier of the resume checkpoint (None = cold start)


@dataclass
class Resume:
    snapshot: Optional[Snapshot]   # None = cold start from a zero state
    tier: Optional[str]
    segment: int                   # first segment (index) not fully covered by the snapshot
    pos: int                       # tokens of that segment already in the snapshot


class Prefiller:
    """Runs prompts through ``model`` resuming from and storing into ``cache``."""

    def __init__(self, model, cache: StateCache, prefill_chunk: int):
        self.model = model
        self.cache = cache
        self.prefill_chunk = prefill_chunk
        self.partial_parents: "OrderedDict[str, None]" = OrderedDict()
        self.speed = PrefillSpeed()       # tokens/s of this model's prefills (fim_window)

    # -- keys ----------------------------------------------------------------------------
    def segment_keys(self, segments: Sequence[Segment]) -> List[str]:
        """Chain key after each segment."""
        keys, k = [], self.cache.root
        for s in segments:
            k = chain_key(k, s.tokens)
            keys.append(k)
        return keys

    def final_key(self, segments: Sequence[Segment]) -> str:
        return self.segment_keys(segments)[-1]

    def is_cached(self, segments: Sequence[Segment]) -> bool:
        return self.cache.tier_of(self.final_key(segments)) is not None

    def find_resume(self, segments: Sequence[Segment], keys: Sequence[str]) -> Resume:
        """The longest cached prefix of ``segments`` (boundary or partial key)."""
        for i in range(len(segments) - 1, -1, -1):
            if self.cache.tier_of(keys[i]) is not None:
                got = self.cache.get(keys[i])
                if got is not None:
                    return Resume(got[0], got[1], i + 1, 0)
            parent = keys[i - 1] if i else self.cache.root
            if parent in self.partial_parents and len(segments[i].tokens) > 1:
                pks = partial_keys(parent, segments[i].tokens[:-1])
                for p in range(len(pks), 0, -1):
                    if self.cache.tier_of(pks[p - 1]) is not None:
                        got = self.cache.get(pks[p - 1])
                        if got is not None:
                            return Resume(got[0], got[1], i, p)
        return Resume(None, None, 0, 0)

    # -- prefill -------------------------------------------------------------------------
    def prefill(self, segments: Sequence[Segment], should_stop: ShouldStop = None,
                tail: int = 0, keys: Optional[Sequence[str]] = None) -> Optional[PrefillResult]:
        """Run the uncached part of ``segments``; checkpoints go to the cache as they are
        reached. ``tail`` extra checkpoints are stored at the last token positions.
        None when ``should_stop`` said so (the work done so far stays cached). ``keys``:
        ``segment_keys(segments)`` when the caller has them already (hashed once per request)."""
        model, cache = self.model, self.cache
        keys = self.segment_keys(segments) if keys is None else keys
        res = self.find_resume(segments, keys)
        snap, si, pos = res.snapshot, res.segment, res.pos
        reused = snap.n_tokens if snap is not None else 0
        state = snap.state if snap is not None else model.new_state(1)
        logits = snap.logits if snap is not None else None                  # [1, V] fp32
        # flat view of what is left: offsets are relative to the resume point
        flat: List[int] = list(segments[si].tokens[pos:]) if si < len(segments) else []
        starts: Dict[int, int] = {si: -pos}
        ends: Dict[int, int] = {}
        for i in range(si, len(segments)):
            if i > si:
                starts[i] = len(flat)
                flat.extend(segments[i].tokens)
            ends[i] = len(flat)
        last = len(segments) - 1
        stops = {ends[i]: i for i in ends if segments[i].checkpoint != CK_NONE or i == last}
        tail_at = set()
        if tail > 0 and si <= last:
            lo = max(starts[last] + 1, ends[last] - tail, 1)
            tail_at = set(range(lo, ends[last]))
        marks = sorted(set(stops) | tail_at)
        cur, mi = 0, 0
        t0 = time.perf_counter()
        while cur < len(flat):
            if should_stop is not None and should_stop():
                if cur > 0:                          # keep the work done so far
                    self._put_at(cur, segments, keys, starts, ends, Snapshot(state, logits, reused + cur))
                return None
            while mi < len(marks) and marks[mi] <= cur:
                mi += 1
            nxt = min(len(flat), cur + self.prefill_chunk, marks[mi] if mi < len(marks) else len(flat))
            piece = torch.tensor([flat[cur:nxt]], dtype=torch.long, device=model.device)   # [1, T]
            logits, state = model.forward(piece, state)                                     # [1, V]
            cur = nxt
            if cur in stops:
                i = stops[cur]
                cache.put(keys[i], Snapshot(state, logits, reused + cur),
                          persist=segments[i].checkpoint == CK_PERSIST)
            elif cur in tail_at:
                self._put_at(cur, segments, keys, starts, ends, Snapshot(state, logits, reused + cur))
        if logits is None:
            raise RuntimeError("empty prompt")       # segments always start with token 0
        self.speed.add(len(flat), time.perf_counter() - t0)      # pieces + checkpoint copies
        final = Snapshot(state, logits, reused + len(flat))
        return PrefillResult(final, keys[last], reused, len(flat), res.tier)

    def _put_at(self, cur: int, segments, keys, starts, ends, snap: Snapshot) -> None:
        """Store ``snap`` under the key of flat offset ``cur`` (a boundary or inside a segment)."""
        for i in sorted(ends):
            if cur == ends[i]:
                self.cache.put(keys[i], snap)
                return
            if cur < ends[i]:
                parent = keys[i - 1] if i else self.cache.root
                self.put_partial(parent, segments[i].tokens[:cur - starts[i]], snap)
                return

    def put_partial(self, parent: str, tokens: Sequence[int], snap: Snapshot) -> None:
        """Store ``snap`` as the state after ``tokens`` of the segment that follows ``parent``."""
        self.cache.put(chain_key(parent, tokens), snap)
        self.partial_parents[parent] = None
        self.partial_parents.move_to_end(parent)
        while len(self.partial_parents) > PARTIAL_PARENTS:
            self.partial_parents.popitem(last=False)
