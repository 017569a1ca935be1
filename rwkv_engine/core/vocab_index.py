"""What the vocabulary says about token boundaries: built once per tokenizer.

Two questions the prompt layout and the decoder ask about a greedy longest-match
vocabulary (``tokenizer.WorldTokenizer``, full or trimmed):

* **Can a token cross this boundary?** ``joins(left, right)`` is True when some token
  holds the last byte of ``left`` followed by the first byte of ``right``. When it is
  False no token of ``encode(left + right)`` can span the boundary, so
  ``encode(left) + encode(right) == encode(left + right)``: greedy matching at every
  position before the boundary sees the same candidates as in ``left`` alone, and it
  restarts at the boundary. The pipeline cuts prompts into segments only at such
  boundaries, so cached segments concatenate to the whole-text tokenization the model
  was trained on. In the World vocabulary only "\\t", "\\n", "\\r", " " and the last bytes
  of "…", "。", "，" join a following newline.
* **Which tokens continue this text?** ``continuing(pending)`` lists the ids whose bytes
  start with ``pending`` or are a non-empty proper prefix of it (token healing: the first
  generated tokens must re-produce the text removed at the cursor), and
  ``extends(text)`` says whether a token longer than ``text`` starts with it (the cursor
  may still grow the last token).

No torch import here.
"""
from __future__ import annotations

import bisect
from functools import lru_cache
from typing import Dict, List, Tuple

_MAX_TAIL = b"\xff" * 256      # longer than any token: prefix + this sorts after all its extensions


class VocabIndex:
    """Byte-pair table and sorted token list of one tokenizer."""

    def __init__(self, tokenizer):
        self.vocab_size = tokenizer.vocab_size
        pairs = bytearray(256 * 256)                       # [left byte * 256 + right byte] -> 0/1
        entries: List[Tuple[bytes, int]] = []
        self._exact: Dict[bytes, int] = {}
        for tid in range(1, tokenizer.vocab_size):         # id 0 (end of text) has no bytes
            b = tokenizer.token_bytes(tid)
            if not b:
                continue
            for i in range(len(b) - 1):
                pairs[b[i] * 256 + b[i + 1]] = 1
            entries.append((b, tid))
            self._exact.setdefault(b, tid)
        entries.sort()
        self._pairs = bytes(pairs)
        self._sorted = [e[0] for e in entries]             # token bytes, sorted
        self._ids = [e[1] for e in entries]                # their ids, same order
        self._continuing: Dict[bytes, Tuple[int, ...]] = {}

    # -- boundaries ----------------------------------------------------------------------
    def joins_bytes(self, left: int, right: int) -> bool:
        """True when some token holds byte ``left`` directly followed by byte ``right``."""
        return bool(self._pairs[left * 256 + right])

    def joins(self, left: bytes, right: bytes) -> bool:
        """True when a token may span the boundary between ``left`` and ``right`` (False
        for an empty side: nothing to span)."""
        return bool(left) and bool(right) and self.joins_bytes(left[-1], right[0])

    # -- prefixes ------------------------------------------------------------------------
    def _range(self, prefix: bytes) -> Tuple[int, int]:
        """[lo, hi) of the tokens starting with ``prefix`` (contiguous in byte order)."""
        lo = bisect.bisect_left(self._sorted, prefix)
        hi = bisect.bisect_right(self._sorted, prefix + _MAX_TAIL, lo)
        return lo, hi

    def starting_with(self, prefix: bytes) -> List[int]:
        """Ids of every token whose bytes start with ``prefix``."""
        lo, hi = self._range(prefix)
        return self._ids[lo:hi]

    def extends(self, text: bytes) -> bool:
        """True when a token strictly longer than ``text`` starts with it."""
        lo, hi = self._range(text)
        return hi - lo > (1 if text in self._exact else 0)

    def continuing(self, pending: bytes) -> Tuple[int, ...]:
        """Ids that can come next while ``pending`` bytes must still be produced: tokens
        starting with ``pending`` and tokens that are a non-empty proper prefix of it."""
        got = self._continuing.get(pending)
        if got is None:
            ids = set(self.starting_with(pending))
            for k in range(1, len(pending)):
                tid = self._exact.get(pending[:k])
                if tid is not None:
                    ids.add(tid)
            got = tuple(sorted(ids))
            if len(self._continuing) > 4096:
                self._continuing.clear()
            self._continuing[pending] = got
        return got


@lru_cache(maxsize=4)
def vocab_index(tokenizer) -> VocabIndex:
    """The index of ``tokenizer`` (built once per tokenizer object, ~0.3 s for 65k tokens)."""
    return VocabIndex(tokenizer)
