"""Ring buffer of extra-context chunks (other files, yanks), llama.vim semantics.

* ``add(text, filename)`` cuts the text to at most ``chunk_size`` lines and puts it
  in a small *queue*; chunks of fewer than 3 lines and exact duplicates (of a ring
  or queued chunk) are skipped; a queued or ring chunk very similar to the new one
  (line Dice > 0.9) is replaced by it.
* ``promote()`` (on idle) moves the oldest queued chunk to the END of the ring; a
  full ring first drops its oldest half. The ring is ordered oldest first, so the
  prompt prefix of older chunks stays stable and their cached states stay valid.
* ``evict_similar(lines)`` (at each request) drops ring chunks too similar to the
  text around the cursor (Dice > 0.5): they make the model repeat what is there.

No torch import here.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Deque, List, Sequence, Tuple

MIN_CHUNK_LINES = 3
REPLACE_SIMILARITY = 0.9     # a new chunk this similar to an old one replaces it
CURSOR_SIMILARITY = 0.5      # ring chunks this similar to the cursor's surroundings are dropped


@dataclass(frozen=True)
class Chunk:
    filename: str
    lines: Tuple[str, ...]                    # without trailing newlines
    _counts: Counter = field(default=None, compare=False, hash=False, repr=False)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def counts(self) -> Counter:
        if self._counts is None:
            object.__setattr__(self, "_counts", Counter(self.lines))
        return self._counts


def line_dice(a: Sequence[str], b: Sequence[str]) -> float:
    """Dice coefficient over lines (as multisets): 2 |a ∩ b| / (|a| + |b|)."""
    if not a and not b:
        return 1.0
    ca = a.counts() if isinstance(a, Chunk) else Counter(a)
    cb = b.counts() if isinstance(b, Chunk) else Counter(b)
    na = len(a.lines) if isinstance(a, Chunk) else len(a)
    nb = len(b.lines) if isinstance(b, Chunk) else len(b)
    common = sum((ca & cb).values())
    return 2.0 * common / (na + nb)


class ContextRing:
    """Ordered (oldest first) ring of chunks plus a queue of pending ones."""

    def __init__(self, n_chunks: int = 16, chunk_size: int = 64, queue_size: int = 16):
        if n_chunks < 0 or chunk_size < MIN_CHUNK_LINES or queue_size < 1:
            raise ValueError("ring needs n_chunks >= 0, chunk_size >= 3 and queue_size >= 1")
        self.n_chunks = n_chunks
        self.chunk_size = chunk_size
        self.queue_size = queue_size
        self.chunks: List[Chunk] = []
        self.queue: Deque[Chunk] = deque()

    # -- input ------------------------------------------------------------------
    def make_chunk(self, text: str, filename: str) -> Chunk:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return Chunk(filename=filename or "", lines=tuple(lines[: self.chunk_size]))

    def add(self, text: str, filename: str = "") -> bool:
        """Queue a chunk; returns False when it was skipped (too short or a duplicate)."""
        if self.n_chunks == 0:
            return False
        chunk = self.make_chunk(text, filename)
        if sum(1 for ln in chunk.lines if ln.strip()) < MIN_CHUNK_LINES:
            return False
        for old in list(self.chunks) + list(self.queue):
            if old.lines == chunk.lines:
                return False
        kept = deque(c for c in self.queue if line_dice(c, chunk) <= REPLACE_SIMILARITY)
        self.queue = kept
        self.chunks = [c for c in self.chunks if line_dice(c, chunk) <= REPLACE_SIMILARITY]
        self.queue.append(chunk)
        while len(self.queue) > self.queue_size:
            self.queue.popleft()
        return True

    def promote(self) -> bool:
        """Move the oldest queued chunk into the ring (idle step); False when none is queued."""
        if not self.queue:
            return False
        chunk = self.queue.popleft()
        if len(self.chunks) >= self.n_chunks:
            # Dropping a chunk invalidates the cached states of every chunk after it (an
            # RNN cannot forget the middle of its past), so evict the oldest HALF at once:
            # the survivors are re-primed once per n/2 promotions (about 2 chunks of
            # prefill per promotion instead of n when dropping one at a time).
            del self.chunks[: max(1, self.n_chunks // 2)]
        self.chunks.append(chunk)
        return True

    def evict_similar(self, around_cursor: Sequence[str], threshold: float = CURSOR_SIMILARITY) -> int:
        """Drop ring chunks too similar to ``around_cursor`` lines; returns how many."""
        kept = self.kept_after_evict(around_cursor, threshold)
        dropped = len(self.chunks) - len(kept)
        if dropped:
            self.chunks = kept
        return dropped

    def kept_after_evict(self, around_cursor: Sequence[str],
                         threshold: float = CURSOR_SIMILARITY) -> List[Chunk]:
        """The ring chunks ``evict_similar(around_cursor)`` would keep (changes nothing)."""
        if not self.chunks or not around_cursor:
            return list(self.chunks)
        ctx = Counter(around_cursor)
        n_ctx = len(around_cursor)
        kept = []
        for c in self.chunks:
            common = sum((c.counts() & ctx).values())
            # similarity relative to the smaller side: a chunk fully contained in the
            # window is a repeat even when the window is much longer than the chunk
            denom = min(len(c.lines), n_ctx) * 2
            if denom and 2.0 * common / denom > threshold:
                continue
            kept.append(c)
        return kept

    def clear(self) -> None:
        self.chunks.clear()
        self.queue.clear()

    def __len__(self) -> int:
        return len(self.chunks)
