"""Speculation after an accept is used only for exactly the buffer it describes.

The speculative state is (previous prompt + accepted tokens). It was checked against
only +-8 lines around the cursor, so an edit further away or a changed ring reused a
state computed for another buffer. Now the whole shared window and the ring prefix
must match (engine/pipeline/speculation.py)."""
import pytest

from pipeline_fixtures import completer_factory, make_request, one_torch_thread  # noqa: F401

LINES = []
for _i in range(40):
    LINES += [f"def g{_i}(a, b):", f"    return a * {_i} + b", ""]
ROW = 110                                     # cursor row (an empty line), 100+ lines below row 5
ACCEPTED = "def h(x):"


def _first(c, lines, rid=1):
    lines = list(lines)
    lines[ROW] = ""
    return lines, c.complete(make_request(lines, ROW, rid=rid))


def _after_accept(lines):
    after = list(lines)
    after[ROW] = ACCEPTED
    return after


@pytest.fixture
def spec_completer(completer_factory):          # noqa: F811
    # a window that covers the whole file, so a line 100 rows above the cursor is in it
    return completer_factory(n_prefix=160, n_suffix=16, near_prefix=8, near_suffix=4, candidates=1,
                             max_tokens=2)


def test_unchanged_buffer_uses_the_speculative_state(spec_completer):
    c = spec_completer
    lines, res = _first(c, LINES)
    assert c.accept(1, ACCEPTED)
    res2 = c.complete(make_request(_after_accept(lines), ROW, rid=2))
    s = res2["stats"]
    assert s["speculative"] is True
    assert s["reused_tokens"] == res["stats"]["prompt_tokens"]


def test_an_edit_100_lines_above_the_cursor_disables_speculation(spec_completer):
    c = spec_completer
    lines, _ = _first(c, LINES)
    assert c.accept(1, ACCEPTED)
    edited = _after_accept(lines)
    edited[ROW - 100] = "    return a - b   # edited far away"
    res2 = c.complete(make_request(edited, ROW, rid=2))
    assert res2["stats"]["speculative"] is False


def test_an_edit_far_below_the_cursor_disables_speculation(completer_factory):   # noqa: F811
    c = completer_factory(n_prefix=32, n_suffix=40, near_prefix=8, near_suffix=4, candidates=1, max_tokens=2)
    row = 20
    lines = list(LINES[:80])
    lines[row] = ""
    c.complete(make_request(lines, row, rid=1))
    assert c.accept(1, ACCEPTED)
    edited = list(lines)
    edited[row] = ACCEPTED
    edited[row + 35] = "CHANGED = 1"          # outside +-8 lines, inside the window
    res2 = c.complete(make_request(edited, row, rid=2))
    assert res2["stats"]["speculative"] is False


def test_a_changed_ring_disables_speculation(spec_completer):
    c = spec_completer
    lines, _ = _first(c, LINES)
    assert c.accept(1, ACCEPTED)
    c.add_chunk("alpha = 1\nbeta = 2\ngamma = 3\ndelta = 4\n", "other.py")
    c.prime_step()                            # moves the chunk into the ring
    assert len(c.ring.chunks) == 1
    res2 = c.complete(make_request(_after_accept(lines), ROW, rid=2))
    assert res2["stats"]["speculative"] is False


def test_another_buffer_or_row_disables_speculation(spec_completer):
    c = spec_completer
    lines, _ = _first(c, LINES)
    assert c.accept(1, ACCEPTED)
    req = make_request(_after_accept(lines), ROW, rid=2, buf=2)
    assert c.complete(req)["stats"]["speculative"] is False
