"""Prefill with resume (rwkv_engine/pipeline/prefill.py): a resumed prefill equals a cold one.

The central invariant of the state cache: whatever a prompt resumes from (a segment
checkpoint, a partial key inside a segment, the host tier, the disk tier, the state
after an accepted suggestion), the logits equal those of a cold prefill of the same
tokens (fp32 CPU: max |diff| < 1e-4 of the logit scale) and the greedy continuation is
the same. Every test also asserts that the resume really happened (PrefillResult.reused
and .tier), so none can pass by prefilling cold. Tiny random models (2 layers, C = 128).
"""
from __future__ import annotations


import pytest
import torch

from rwkv_engine.pipeline.prefill import Prefiller
from rwkv_engine.pipeline.prompt_layout import CK_MEM, CK_NONE, CK_PERSIST, Segment
from rwkv_engine.pipeline.state_cache import Snapshot, StateCache, chain_key

from pipeline_fixtures import (SOURCE_LINES, CountingModel, flat, assert_logits_close, assert_states_close,  # noqa: F401
                               cold_forward, greedy_tokens, make_request, record_prefills, type_text)


# -- helpers ----------------------------------------------------------------------------------
def toks(n: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(1000 + seed)
    return tuple(torch.randint(1, 60000, (n,), generator=g).tolist())


def seg(kind: str, n: int, seed: int, ck: int = CK_NONE) -> Segment:
    return Segment(kind, toks(n, seed), ck)


# start | chunk (persisted) | far (checkpoint) | far | far (checkpoint) | cursor line
BASE = [Segment("start", (0,)), seg("chunk", 20, 1, CK_PERSIST), seg("far", 9, 2, CK_MEM),
        seg("far", 7, 3), seg("far", 8, 4, CK_MEM), seg("cursor", 6, 5)]


def make_prefiller(model, chunk: int = 16, **cache) -> Prefiller:
    return Prefiller(model, StateCache(getattr(model, "model", model).model_id, "cpu", **cache), chunk)


def assert_equals_cold(model, snap: Snapshot, tokens) -> None:
    """``snap`` (after ``tokens``) matches a cold one-call forward of the same tokens."""
    logits, state = cold_forward(model, tokens)
    assert snap.n_tokens == len(tokens)
    assert_logits_close(snap.logits, logits)
    assert_states_close(snap.state, state)
    assert greedy_tokens(model, snap.state, snap.logits) == greedy_tokens(model, state, logits)


# -- Prefiller: resume points ----------------------------------------------------------------------
def test_resume_from_a_segment_checkpoint_equals_a_cold_prefill(tiny_model):
    p = make_prefiller(tiny_model)
    r1 = p.prefill(BASE)
    assert r1.tier is None and r1.reused == 0 and r1.fed == len(flat(BASE))
    assert_equals_cold(tiny_model, r1.snapshot, flat(BASE))

    new_line = BASE[:5] + [seg("cursor", 5, 6)]                  # the cursor line changed
    r2 = p.prefill(new_line)
    assert r2.tier == "device" and r2.reused == len(flat(BASE[:5])) and r2.fed == 5
    assert_equals_cold(tiny_model, r2.snapshot, flat(new_line))

    mid = BASE[:3] + [seg("far", 7, 7)] + BASE[4:]                # an edit two segments up
    r3 = p.prefill(mid)
    assert r3.tier == "device" and r3.reused == len(flat(BASE[:3]))  # the last checkpoint before it
    assert_equals_cold(tiny_model, r3.snapshot, flat(mid))


def test_find_resume_picks_the_longest_cached_prefix(tiny_model):
    p = make_prefiller(tiny_model)
    keys = p.segment_keys(BASE)

    def dummy(n):
        return Snapshot(tiny_model.new_state(1), None, n)

    def where():
        r = p.find_resume(BASE, keys)
        return r.segment, r.pos, (r.snapshot.n_tokens if r.snapshot else None)

    assert where() == (0, 0, None)
    p.cache.put(keys[1], dummy(21))
    assert where() == (2, 0, 21)
    p.cache.put(keys[3], dummy(37))
    assert where() == (4, 0, 37)
    p.put_partial(keys[3], BASE[4].tokens[:3], dummy(40))        # inside segment 4: longer
    p.put_partial(keys[3], BASE[4].tokens[:2], dummy(39))
    assert where() == (4, 3, 40)
    p.cache.put(keys[4], dummy(45))                               # segment 4 complete: longer still
    assert where() == (5, 0, 45)
    # a partial key is probed only under a parent remembered in partial_parents
    p.cache.put(chain_key(keys[4], BASE[5].tokens[:2]), dummy(47))
    assert where() == (5, 0, 45)
    p.partial_parents[keys[4]] = None
    assert where() == (5, 2, 47)
    p.cache.put(keys[5], dummy(51))                               # the whole prompt
    assert where() == (6, 0, 51)
    # a prompt that differs in its first token resumes from nothing
    other = [Segment("start", (1,))] + BASE[1:]
    r = p.find_resume(other, p.segment_keys(other))
    assert r.snapshot is None and (r.segment, r.pos) == (0, 0)


def test_tail_checkpoints_land_at_the_right_keys(tiny_model):
    p = make_prefiller(tiny_model)
    p.prefill(BASE, tail=4)
    keys = p.segment_keys(BASE)
    parent, cursor, before = keys[4], BASE[5].tokens, flat(BASE[:5])
    assert parent in p.partial_parents
    for n in range(1, len(cursor)):
        got = p.cache.get(chain_key(parent, cursor[:n]))
        if n < len(cursor) - 4:                                  # tail 4: the last 4 positions
            assert got is None, n
            continue
        assert got is not None, n
        snap, _ = got
        assert snap.n_tokens == len(before) + n
        logits, state = cold_forward(tiny_model, before + list(cursor[:n]))
        assert_logits_close(snap.logits, logits)
        assert_states_close(snap.state, state)
    assert p.cache.get(keys[5])[0].n_tokens == len(flat(BASE))      # the prompt's own key

    # a tail longer than the last segment stops at its start (never crosses into the parent)
    q = make_prefiller(tiny_model)
    q.prefill(BASE, tail=16)
    stored = [n for n in range(1, len(cursor)) if q.cache.tier_of(chain_key(parent, cursor[:n]))]
    assert stored == list(range(1, len(cursor)))


@pytest.mark.parametrize("edit", ["type", "backspace", "retype_middle"])
def test_typing_resumes_from_a_partial_key_and_equals_cold(tiny_model, edit):
    p = make_prefiller(tiny_model)
    p.prefill(BASE, tail=4)
    cursor, before = BASE[5].tokens, len(flat(BASE[:5]))
    if edit == "type":                  # one more token on the cursor line: the old prompt's key
        new, reused = cursor + toks(1, 8), before + len(cursor)
    elif edit == "backspace":           # one token fewer: a tail checkpoint is the whole prompt
        new, reused = cursor[:-1], before + len(cursor) - 1
    else:                               # the line changed after its 3rd token: the tail at 3
        new, reused = cursor[:3] + toks(4, 9), before + 3
    prompt = BASE[:5] + [Segment("cursor", new)]
    r = p.prefill(prompt, tail=4)
    assert r.tier == "device" and r.reused == reused and r.fed == len(flat(prompt)) - reused
    assert_equals_cold(tiny_model, r.snapshot, flat(prompt))


def test_resume_from_the_host_tier_equals_cold(tiny_model):
    p = make_prefiller(tiny_model, device_bytes=0, host_bytes=64 << 20)    # every entry demoted
    p.prefill(BASE, tail=4)
    s = p.cache.stats()
    assert s["device"]["entries"] == 0 and s["host"]["entries"] > 0
    for prompt, reused in ((BASE[:5] + [seg("cursor", 4, 10)], len(flat(BASE[:5]))),
                           (BASE[:5] + [Segment("cursor", BASE[5].tokens + toks(2, 11))],
                            len(flat(BASE)))):
        r = p.prefill(prompt)
        assert r.tier == "host" and r.reused == reused
        assert_equals_cold(tiny_model, r.snapshot, flat(prompt))


def test_resume_from_the_disk_tier_equals_cold(tiny_model, tmp_path):
    def cache():
        return StateCache(tiny_model.model_id, "cpu", device_bytes=64 << 20, host_bytes=0,
                          disk_bytes=16 << 20, disk_dir=tmp_path / "states")

    first = Prefiller(tiny_model, cache(), 16)
    first.prefill(BASE)
    assert first.cache.stats()["disk"]["entries"] == 1            # only the persisted chunk
    again = Prefiller(tiny_model, cache(), 16)                     # a new session: empty memory tiers
    prompt = BASE[:2] + [seg("far", 12, 12, CK_MEM), seg("cursor", 5, 13)]
    r = again.prefill(prompt)
    assert r.tier == "disk" and r.reused == len(flat(BASE[:2])) and r.fed == 17
    assert_equals_cold(tiny_model, r.snapshot, flat(prompt))
    # the disk round trip is exact: the chunk's state is the one the first session computed
    key = first.segment_keys(BASE)[1]
    assert again.cache.get(key)[0].state.equal(first.cache.get(key)[0].state)


# -- Prefiller: pieces, stops -----------------------------------------------------------------------
def test_pieces_end_at_prefill_chunk_checkpoints_and_tail_positions(tiny_model):
    m = CountingModel(tiny_model)
    p = make_prefiller(m, chunk=16)
    prompt = [Segment("start", (0,)), seg("far", 30, 20), seg("far", 10, 21, CK_MEM),
              seg("far", 25, 22), seg("cursor", 7, 23)]
    # offsets: 1, 31, 41 (checkpoint), 66, 73 (end); tail 3 -> 70, 71, 72
    r = p.prefill(prompt, tail=3)
    assert m.pieces == [16, 16, 9, 16, 13, 1, 1, 1]
    assert r.fed == 73 and r.reused == 0
    assert_equals_cold(tiny_model, r.snapshot, flat(prompt))
    # a resumed prefill counts its pieces from the resume point (41 here)
    m.pieces.clear()
    changed = prompt[:3] + [seg("far", 25, 24), seg("cursor", 7, 25)]
    r = p.prefill(changed, tail=3)
    assert r.reused == 41 and r.tier == "device"
    assert m.pieces == [16, 13, 1, 1, 1]
    assert_equals_cold(tiny_model, r.snapshot, flat(changed))


def test_a_stopped_prefill_keeps_its_work(tiny_model):
    m = CountingModel(tiny_model)
    p = make_prefiller(m, chunk=4)
    prompt = [Segment("start", (0,)), seg("chunk", 14, 30, CK_PERSIST), seg("cursor", 6, 31)]
    assert p.prefill(prompt, should_stop=lambda: True) is None     # stopped before any piece
    assert m.pieces == [] and not p.cache.dev.items
    r = p.prefill(prompt, should_stop=lambda: len(m.pieces) >= 2)
    assert r is None and m.pieces == [4, 4]
    # the 8 tokens fed are kept, under the partial key inside the chunk segment
    keys = p.segment_keys(prompt)
    snap, _ = p.cache.get(chain_key(keys[0], prompt[1].tokens[:7]))
    assert snap.n_tokens == 8
    m.pieces.clear()
    r = p.prefill(prompt)
    assert r.tier == "device" and r.reused == 8 and r.fed == 13
    assert m.pieces == [4, 3, 4, 2]                               # chunk ends at 15, then the line
    assert_equals_cold(tiny_model, r.snapshot, flat(prompt))


# -- through the Completer ---------------------------------------------------------------------
GREEDY = dict(temperature=0.0, top_p=1.0, candidates=1, max_tokens=4, tail_checkpoints=4)


def cold_candidates(completer_factory, request):
    cold = completer_factory(cache_disk_mb=0, **GREEDY)
    got = record_prefills(cold)
    out = cold.complete(dict(request))
    assert got[-1][2].tier is None and got[-1][2].reused == 0
    return out["candidates"]


def test_typing_through_the_completer_equals_cold(completer_factory, tiny_model):
    c = completer_factory(**GREEDY)
    got = record_prefills(c)
    lines = list(SOURCE_LINES[:24])
    row = 17
    lines[row] = "    return "
    col = len(lines[row])
    c.complete(make_request(lines, row, col))
    partial_resumes = 0
    for i, ch in enumerate("val(x)"):
        lines, col = type_text(lines, row, col, ch)
        req = make_request(lines, row, col, rid=2 + i)
        out = c.complete(req)
        _, segments, r = got[-1]
        assert r.tier == "device" and r.reused > 0, (ch, r.tier, r.reused)
        partial_resumes += r.reused > len(flat(segments[:-1]))   # resumed inside the cursor line
        assert_equals_cold(tiny_model, r.snapshot, flat(segments))
        assert out["candidates"] == cold_candidates(completer_factory, req)
    assert partial_resumes >= 3


def test_host_tier_through_the_completer_equals_cold(completer_factory, tiny_model):
    c = completer_factory(cache_device_mb=0, **GREEDY)
    got = record_prefills(c)
    lines = list(SOURCE_LINES[:24])
    c.complete(make_request(lines, 17, rid=1))
    req = make_request(lines, 17, col=4, rid=2)                   # same line, cursor moved left
    out = c.complete(req)
    _, segments, r = got[-1]
    assert r.tier == "host" and r.reused > 0
    assert_equals_cold(tiny_model, r.snapshot, flat(segments))
    assert out["candidates"] == cold_candidates(completer_factory, req)


def test_disk_chunk_checkpoints_through_the_completer_equal_cold(completer_factory, tiny_model):
    chunk = "alpha = 1\nbeta = 2\ngamma = 3\n"
    c1 = completer_factory(**GREEDY)
    c1.add_chunk(chunk, "a.py")
    while c1.prime_step():
        pass
    c2 = completer_factory(**GREEDY)                              # same cache_dir, empty memory
    c2.add_chunk(chunk, "a.py")
    c2.ring.promote()
    got = record_prefills(c2)
    req = make_request(SOURCE_LINES[:12], 9)
    out = c2.complete(req)
    _, segments, r = got[-1]
    assert r.tier == "disk" and r.reused == len(flat(segments[:2]))
    assert_equals_cold(tiny_model, r.snapshot, flat(segments))
    cold = completer_factory(cache_disk_mb=0, **GREEDY)
    cold.add_chunk(chunk, "a.py")
    cold.ring.promote()
    assert out["candidates"] == cold.complete(dict(req))["candidates"]


def insert_text(lines, row, col, text):
    """``text`` (may hold newlines) inserted at (row, byte col): (lines, row, col)."""
    raw = lines[row].encode("utf-8")
    head, tail = raw[:col].decode("utf-8"), raw[col:].decode("utf-8")
    parts = (head + text).split("\n")
    new = list(lines[:row]) + parts[:-1] + [parts[-1] + tail] + list(lines[row + 1:])
    return new, row + len(parts) - 1, len(parts[-1].encode("utf-8"))


def test_speculation_after_an_accept_equals_cold(completer_factory, tiny_model):
    c = completer_factory(**GREEDY)
    got = record_prefills(c)
    lines = list(SOURCE_LINES[:24])
    row = 17
    lines[row] = "    return "
    first = c.complete(make_request(lines, row, rid=1))
    text = first["candidates"][0]["text"].split("\n")[0] or "x"
    _, prev_segments, prev = got[-1]
    assert c.accept(1, text)
    lines, row, col = insert_text(lines, row, len(lines[row].encode("utf-8")), text)
    req = make_request(lines, row, col, rid=2)
    prompt = c.builder.build(req, list(c.ring.chunks))     # what the next request feeds (canonical)
    out = c.complete(req)
    assert out["stats"]["speculative"] is True
    kind, _, r = got[-1]
    assert kind == "speculative" and r.tier == "device"
    assert r.reused == prev.snapshot.n_tokens == len(flat(prev_segments))
    assert r.fed == len(prompt.tokens()) - len(flat(prev_segments))
    assert r.key == c.prefiller.final_key(prompt.segments)
    # speculation's state is the state after the new prompt's own (whole-text) tokens
    assert_equals_cold(tiny_model, r.snapshot, prompt.tokens())


def test_reopening_a_file_resumes_its_far_prefix_from_disk(tiny_model, tmp_path):
    """Only ring chunks were persisted: a restarted editor (fresh memory tiers, same cache
    dir) re-fed the whole file. Far-prefix checkpoints now go to disk too."""
    from rwkv_engine.pipeline.completer import Completer
    from pipeline_fixtures import SOURCE_LINES, fast_config, make_request

    lines = SOURCE_LINES * 2                          # 96 lines; cursor far below the top
    cfg = fast_config(tmp_path, n_prefix=80, near_prefix=8, n_suffix=8, candidates=1, max_tokens=1)
    req = make_request(lines, 90)
    first = Completer(cfg, model=tiny_model).complete(req)
    assert first["stats"]["cache_hits"]["miss"] == 1
    again = Completer(cfg, model=tiny_model).complete(req)     # the editor restarted
    s = again["stats"]
    assert s["cache_hits"]["disk"] == 1, s
    assert s["reused_tokens"] > s["prefilled_tokens"], s       # the far prefix came from disk
    assert s["reused_tokens"] + s["prefilled_tokens"] == first["stats"]["prompt_tokens"]
