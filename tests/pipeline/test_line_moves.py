"""One-line cursor moves (issue 12, item 5): what a move re-feeds, and that it stays exact.

The FIM window is suffix-first, so a one-line move changes the prompt from the near
suffix on; cold, it re-feeds the whole FIM window. The completer's idle priming
(``Completer.prime_step``) therefore also primes the prompts of the lines next to the
last request's cursor: after an idle moment a one-line move down or up re-feeds no
token, and its state and candidates equal a cold prefill's. A move at column 0 stores
no tail checkpoints inside a full line (each one a single-token forward).
Tiny random model (2 layers, C = 128), small windows (``fast_config``).
"""
from __future__ import annotations


import pytest

from rwkv_engine.pipeline import completer as completer_mod

from pipeline_fixtures import (SOURCE_LINES, CountingModel, flat, assert_logits_close, assert_states_close,  # noqa: F401
                               cold_forward, greedy_tokens, make_request, record_prefills)

GREEDY = dict(temperature=0.0, top_p=1.0, candidates=1, max_tokens=4, tail_checkpoints=4)
ROW = 30            # "    return y + 7": a non-blank line with lines above and below


def idle(c) -> int:
    """Run idle priming until it has nothing left; returns the prime steps taken."""
    n = 0
    while c.prime_step():
        n += 1
        assert n < 50, "idle priming does not finish"
    return n


def assert_equals_cold(model, snap, tokens) -> None:
    logits, state = cold_forward(model, tokens)
    assert snap.n_tokens == len(tokens)
    assert_logits_close(snap.logits, logits)
    assert_states_close(snap.state, state)
    assert greedy_tokens(model, snap.state, snap.logits) == greedy_tokens(model, state, logits)


def cold_candidates(completer_factory, request):
    cold = completer_factory(cache_disk_mb=0, **GREEDY)
    got = record_prefills(cold)
    out = cold.complete(dict(request))
    assert got[-1][2].tier is None and got[-1][2].reused == 0
    return out["candidates"]


@pytest.mark.parametrize("step", [1, -1], ids=["down", "up"])
@pytest.mark.parametrize("col", ["start", "end"])
def test_a_move_after_idle_refeeds_nothing_and_equals_cold(completer_factory, tiny_model, step, col):
    c = completer_factory(cache_disk_mb=0, **GREEDY)
    got = record_prefills(c)
    lines = list(SOURCE_LINES)
    c.complete(make_request(lines, ROW, 0 if col == "start" else None, rid=1))
    idle(c)
    req = make_request(lines, ROW + step, 0 if col == "start" else None, rid=2)
    out = c.complete(req)
    _, segments, r = got[-1]
    assert r.fed == 0 and r.reused == len(flat(segments)), (r.fed, r.reused)
    assert r.tier == "device"
    assert_equals_cold(tiny_model, r.snapshot, flat(segments))
    assert out["candidates"] == cold_candidates(completer_factory, req)
    assert out["stats"]["prefilled_tokens"] == 0


def test_idle_primes_the_direction_of_the_last_move_first(completer_factory):
    def primed_lines(c):
        out = []
        while c.prime_step():
            out.append(c.last_prime["what"])
        return [w for w in out if w.startswith("line ")]

    c = completer_factory(cache_disk_mb=0, **GREEDY)
    lines = list(SOURCE_LINES)
    c.complete(make_request(lines, ROW, 0, rid=1))
    assert primed_lines(c) == [f"line {ROW + 1}", f"line {ROW - 1}"]     # down first by default
    c.complete(make_request(lines, ROW - 2, 0, rid=2))                   # moved up
    assert primed_lines(c) == [f"line {ROW - 3}"]          # line ROW - 1: primed already


def test_moves_keep_within_the_windows_lines_and_ring(completer_factory, tiny_model):
    """With a ring chunk in front and the cursor on the window's last line, priming only
    builds requests inside the window and still resumes exactly."""
    c = completer_factory(cache_disk_mb=0, **GREEDY)
    c.add_chunk("alpha = 1\nbeta = 2\ngamma = 3\n", "a.py")
    got = record_prefills(c)
    window = list(SOURCE_LINES[8:32])                             # buffer lines 8..31
    c.complete(make_request(window, 31, 0, first=8, rid=1))       # last line of the window
    idle(c)
    assert c.ring.chunks, "the ring chunk was promoted"
    req = make_request(window, 30, 0, first=8, rid=2)
    out = c.complete(req)
    _, segments, r = got[-1]
    assert r.fed == 0, r.fed
    assert segments[1].kind == "chunk"
    assert_equals_cold(tiny_model, r.snapshot, flat(segments))


def test_a_cold_move_refeeds_only_the_fim_window(completer_factory, tiny_model):
    """Without idle time a move resumes at the far/near split (re-feeding the FIM window)."""
    c = completer_factory(cache_disk_mb=0, **GREEDY)
    got = record_prefills(c)
    lines = list(SOURCE_LINES)
    c.complete(make_request(lines, ROW, 0, rid=1))
    c.complete(make_request(lines, ROW + 1, 0, rid=2))
    _, segments, r = got[-1]
    marker = next(i for i, s in enumerate(segments) if s.kind == "marker")
    assert r.reused == len(flat(segments[:marker]))
    assert r.fed == len(flat(segments[marker:]))
    assert_equals_cold(tiny_model, r.snapshot, flat(segments))


def test_a_move_to_column_0_stores_no_tail_checkpoints(completer_factory):
    """Tail checkpoints are single-token forwards; at column 0 there is no cursor-line
    segment to resume inside, so the move's prefill has no one-token pieces."""
    c = completer_factory(cache_disk_mb=0, **GREEDY)
    lines = list(SOURCE_LINES)
    c.complete(make_request(lines, ROW, 0, rid=1))
    m = CountingModel(c.prefiller.model)
    c.prefiller.model = m
    c.complete(make_request(lines, ROW + 1, 0, rid=2))
    assert m.pieces and min(m.pieces) > 1, m.pieces
    # typing on the line still gets them
    m.pieces.clear()
    lines[ROW + 1] = "xy = 12345678"
    c.complete(make_request(lines, ROW + 1, None, rid=3))
    assert m.pieces.count(1) >= 3, m.pieces


def test_no_neighbours_primed_when_disabled(completer_factory, monkeypatch):
    monkeypatch.setattr(completer_mod, "PRIME_NEIGHBOURS", 0)
    c = completer_factory(cache_disk_mb=0, **GREEDY)
    got = record_prefills(c)
    lines = list(SOURCE_LINES)
    c.complete(make_request(lines, ROW, 0, rid=1))
    idle(c)
    c.complete(make_request(lines, ROW + 1, 0, rid=2))
    assert got[-1][2].fed > 0
