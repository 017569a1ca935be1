"""Speculation after an accept is used only for exactly the tokens it describes.

The speculative state is the previous prompt's; the next prompt continues from it only
when its own (whole-text) tokens start with every token the previous prompt fed. An
edit anywhere in the prompt or a changed ring disables it; an edit outside the prompt's
window, or the same text in another buffer, keeps it (the state is exactly right)."""
import pytest
import torch

from pipeline_fixtures import make_request

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


def test_an_edit_outside_the_prompt_keeps_speculation_and_its_state_is_exact(completer_factory):   # noqa: F811
    from pipeline_fixtures import assert_logits_close, record_prefills
    c = completer_factory(n_prefix=32, n_suffix=40, near_prefix=8, near_suffix=4, candidates=1, max_tokens=2)
    row = 20
    lines = list(LINES[:80])
    lines[row] = ""
    c.complete(make_request(lines, row, rid=1))
    assert c.accept(1, ACCEPTED)
    edited = list(lines)
    edited[row] = ACCEPTED
    edited[row + 35] = "CHANGED = 1"          # inside the request's window, outside the prompt's suffix
    req = make_request(edited, row, rid=2)
    got = record_prefills(c)
    res2 = c.complete(req)
    assert res2["stats"]["speculative"] is True
    prompt = c.builder.build(req, list(c.ring.chunks))
    logits, _ = c.model.forward(torch.tensor([prompt.tokens()]), c.model.new_state(1))
    kind, _, r = got[-1]
    assert kind == "speculative"
    assert_logits_close(r.snapshot.logits, logits)
    edited[row + 2] = "CHANGED = 2"           # inside the prompt's suffix: the tokens differ
    c.accept(2, "x")
    assert c.complete(make_request(edited, row, rid=3))["stats"]["speculative"] is False


def test_a_changed_ring_disables_speculation(spec_completer):
    c = spec_completer
    lines, _ = _first(c, LINES)
    assert c.accept(1, ACCEPTED)
    c.add_chunk("alpha = 1\nbeta = 2\ngamma = 3\ndelta = 4\n", "other.py")
    c.prime_step()                            # moves the chunk into the ring
    assert len(c.ring.chunks) == 1
    res2 = c.complete(make_request(_after_accept(lines), ROW, rid=2))
    assert res2["stats"]["speculative"] is False


def test_another_row_disables_speculation(spec_completer):
    c = spec_completer
    lines, _ = _first(c, LINES)
    assert c.accept(1, ACCEPTED)
    req = make_request(_after_accept(lines), ROW - 3, rid=2)
    assert c.complete(req)["stats"]["speculative"] is False
