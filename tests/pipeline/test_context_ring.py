"""Context ring: llama.vim chunk semantics (skip short/duplicate, replace similar, queue, evict)."""
from __future__ import annotations

import pytest

from rwkv_engine.pipeline.context_ring import ContextRing, line_dice


def block(tag: str, n: int = 5) -> str:
    return "\n".join(f"{tag} line {i} = {i * 7}" for i in range(n))


def test_short_chunks_are_skipped():
    ring = ContextRing(4, 8, 4)
    assert not ring.add("a\nb", "x.py")
    assert not ring.add("a\n\n\nb\n", "x.py")          # blank lines do not count
    assert ring.add("a\nb\nc", "x.py")
    assert len(ring.queue) == 1


def test_exact_duplicates_are_skipped_in_queue_and_ring():
    ring = ContextRing(4, 8, 4)
    assert ring.add(block("a"), "a.py")
    assert not ring.add(block("a"), "other.py")
    assert ring.promote()
    assert not ring.add(block("a"), "a.py")
    assert len(ring.chunks) == 1 and not ring.queue


def test_chunk_is_cut_to_chunk_size_and_keeps_filename():
    ring = ContextRing(4, 8, 4)
    ring.add(block("a", 20), "src/a.py")
    ring.promote()
    (c,) = ring.chunks
    assert len(c.lines) == 8 and c.filename == "src/a.py"
    assert c.lines[0] == "a line 0 = 0"


def test_similar_chunk_replaces_queued_and_ring_entries():
    ring = ContextRing(4, 64, 4)
    base = [f"x{i} = {i}" for i in range(30)]
    ring.add("\n".join(base), "a.py")
    ring.promote()
    near = base[:29] + ["changed = 1"]                  # Dice 29/30 > 0.9
    assert line_dice(base, near) > 0.9
    assert ring.add("\n".join(near), "a.py")
    assert ring.chunks == []                             # the old ring chunk is gone
    assert list(ring.queue)[0].lines == tuple(near)
    near2 = base[:28] + ["other = 2", "more = 3"]
    ring.add("\n".join(near2), "a.py")                   # replaces the queued one
    assert [c.lines for c in ring.queue] == [tuple(near2)]


def test_dissimilar_chunks_are_kept():
    ring = ContextRing(4, 8, 4)
    ring.add(block("a"), "a.py")
    ring.add(block("b"), "b.py")
    assert len(ring.queue) == 2


def test_promote_moves_oldest_queued_to_end_and_evicts_oldest_ring_chunk():
    ring = ContextRing(2, 8, 8)
    for tag in "abc":
        ring.add(block(tag), tag + ".py")
    assert ring.promote() and ring.promote()
    assert [c.filename for c in ring.chunks] == ["a.py", "b.py"]
    assert ring.promote()
    assert [c.filename for c in ring.chunks] == ["b.py", "c.py"]   # oldest first, "a" evicted
    assert not ring.promote()


def test_a_full_ring_drops_its_oldest_half_at_once():
    ring = ContextRing(4, 8, 8)
    for tag in "abcdef":
        ring.add(block(tag), tag + ".py")
    for _ in range(4):
        ring.promote()
    assert [c.filename for c in ring.chunks] == ["a.py", "b.py", "c.py", "d.py"]
    ring.promote()
    assert [c.filename for c in ring.chunks] == ["c.py", "d.py", "e.py"]
    ring.promote()                                     # not full: nothing else is dropped
    assert [c.filename for c in ring.chunks] == ["c.py", "d.py", "e.py", "f.py"]


def test_queue_is_bounded_dropping_the_oldest():
    ring = ContextRing(4, 8, 2)
    for tag in "abc":
        ring.add(block(tag), tag + ".py")
    assert [c.filename for c in ring.queue] == ["b.py", "c.py"]


def test_chunks_similar_to_the_cursor_surroundings_are_evicted():
    ring = ContextRing(4, 8, 4)
    ring.add(block("a"), "a.py")
    ring.add(block("b"), "b.py")
    ring.promote(), ring.promote()
    around = block("b").split("\n") + ["something else"]
    assert ring.evict_similar(around) == 1
    assert [c.filename for c in ring.chunks] == ["a.py"]
    assert ring.evict_similar(["unrelated"]) == 0


def test_zero_chunks_disables_the_ring():
    ring = ContextRing(0, 8, 4)
    assert not ring.add(block("a"), "a.py")


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        ContextRing(4, 2, 4)
