"""State cache: hash-chain keys, tier budgets, the disk tier, and reuse through the pipeline."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from rwkv_engine.core.state import State
from rwkv_engine.pipeline.state_cache import Snapshot, StateCache, chain_key, partial_keys, root_key

from rwkv_engine.pipeline import state_cache as state_cache_mod
from pipeline_fixtures import (SOURCE_LINES, cache_reachable_bytes, logical_bytes, make_request,
                               reachable_bytes, snapshot_tensors, type_text)


def random_snapshot(seed: int, n_tokens: int = 5) -> Snapshot:
    g = torch.Generator().manual_seed(seed)
    st = State.zeros(2, 1, 64, 1, 64, torch.float32, "cpu")
    st = State([torch.randn(t.shape, generator=g) for t in st.att_x],
               [torch.randn(t.shape, generator=g) for t in st.wkv],
               [torch.randn(t.shape, generator=g) for t in st.ffn_x])
    return Snapshot(st, torch.randn(1, 50, generator=g), n_tokens)


def snap_equal(a: Snapshot, b: Snapshot) -> bool:
    return a.state.equal(b.state) and torch.equal(a.logits, b.logits) and a.n_tokens == b.n_tokens


# -- keys -------------------------------------------------------------------------------
def test_keys_chain_over_segments_and_name_the_model():
    r = root_key("model-a")
    assert r != root_key("model-b")
    k1 = chain_key(r, [1, 2, 3])
    assert chain_key(k1, [4]) != chain_key(r, [1, 2, 3, 4])      # segment boundaries matter
    assert partial_keys(r, [1, 2, 3]) == [chain_key(r, [1]), chain_key(r, [1, 2]), k1]


# -- memory tiers ----------------------------------------------------------------------------
def test_device_overflow_demotes_to_host_and_host_overflow_drops():
    size = random_snapshot(0).nbytes
    cache = StateCache("m", "cpu", device_bytes=2 * size, host_bytes=2 * size)
    for i in range(5):
        cache.put(f"k{i}", random_snapshot(i))
    assert cache.tier_of("k4") == cache.tier_of("k3") == "device"
    assert cache.tier_of("k2") == cache.tier_of("k1") == "host"
    assert cache.tier_of("k0") is None
    s = cache.stats()
    assert s["device"]["bytes"] <= 2 * size and s["host"]["bytes"] <= 2 * size
    snap, tier = cache.get("k1")                 # a host hit is promoted to the device tier
    assert tier == "host" and cache.tier_of("k1") == "device"
    assert snap_equal(snap, random_snapshot(1))
    assert cache.tier_of("k3") == "host"         # ... pushing the LRU device entry down


def test_zero_budgets_keep_nothing():
    cache = StateCache("m", "cpu", device_bytes=0, host_bytes=0)
    cache.put("k", random_snapshot(0))
    assert cache.tier_of("k") is None and cache.get("k") is None


def test_only_batch_one_states_are_cached():
    snap = random_snapshot(0)
    with pytest.raises(ValueError):
        StateCache("m").put("k", Snapshot(snap.state.fork(2), None, 1))


# -- disk tier ----------------------------------------------------------------------------------
def disk_cache(tmp_path, budget=1 << 20):
    return StateCache("model-x", "cpu", device_bytes=1 << 20, host_bytes=0, disk_bytes=budget,
                      disk_dir=tmp_path / "rwkv.nvim" / "states")


def test_disk_tier_is_private_and_persists_only_marked_entries(tmp_path):
    cache = disk_cache(tmp_path)
    cache.put("global", random_snapshot(1), persist=True)
    cache.put("local", random_snapshot(2))
    d = tmp_path / "rwkv.nvim" / "states"
    files = list(d.glob("*.rwst"))
    assert [f.stem for f in files] == ["global"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "rwkv.nvim").stat().st_mode) == 0o700
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert not list(d.glob(".tmp-*"))             # atomic write leaves no temp file


def test_disk_round_trip_is_bit_exact_across_processes(tmp_path):
    d = tmp_path / "states"
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{os.path.dirname(__file__)!r}, {os.path.join(os.path.dirname(os.path.dirname(__file__)), "support")!r}]
        from test_state_cache import random_snapshot
        from rwkv_engine.pipeline.state_cache import StateCache
        c = StateCache("model-x", "cpu", 1 << 20, 0, 1 << 20, {str(d)!r})
        c.put("abc", random_snapshot(7, n_tokens=42), persist=True)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    cache = StateCache("model-x", "cpu", 1 << 20, 0, 1 << 20, d)
    snap, tier = cache.get("abc")
    assert tier == "disk"
    assert snap_equal(snap, random_snapshot(7, n_tokens=42))
    # a different model never sees it
    assert StateCache("model-y", "cpu", 1 << 20, 0, 1 << 20, d).get("abc") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_disk_entries_are_ignored_and_rebuilt(tmp_path, damage):
    d = tmp_path / "rwkv.nvim" / "states"
    disk_cache(tmp_path).put("k", random_snapshot(3), persist=True)
    f = d / "k.rwst"
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[-7] ^= 0x10
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"not a snapshot at all" * 10)
    else:
        raw = bytearray()
    f.write_bytes(bytes(raw))
    cache = disk_cache(tmp_path)                  # a new session: memory tiers are empty
    assert cache.tier_of("k") == "disk"
    assert cache.get("k") is None                 # detected, dropped, counted as a miss
    assert not f.exists()
    cache.put("k", random_snapshot(3), persist=True)
    snap, tier = disk_cache(tmp_path).get("k")
    assert tier == "disk" and snap_equal(snap, random_snapshot(3))


def test_disk_budget_evicts_least_recently_used_files(tmp_path):
    size = len(__import__("rwkv_engine.pipeline.state_cache", fromlist=["x"]).encode_snapshot(
        "k0", "model-x", random_snapshot(0)))
    cache = disk_cache(tmp_path, budget=int(2.5 * size))
    for i in range(4):
        cache.put(f"k{i}", random_snapshot(i), persist=True)
    d = tmp_path / "rwkv.nvim" / "states"
    assert sorted(f.stem for f in d.glob("*.rwst")) == ["k2", "k3"]
    assert cache.stats()["disk"]["bytes"] <= 2.5 * size


# -- reuse through the pipeline (tiny random model) -------------------------------------------
def test_typing_on_one_line_refeeds_at_most_8_tokens_per_keystroke(completer_factory):
    c = completer_factory(candidates=1, max_tokens=1, tail_checkpoints=4)
    lines = list(SOURCE_LINES[:24])
    row = 17
    lines[row] = "    return "
    col = len(lines[row])
    first = c.complete(make_request(lines, row, col))
    assert first["stats"]["reused_tokens"] == 0
    for ch in "val(x) + 1":
        lines, col = type_text(lines, row, col, ch)
        s = c.complete(make_request(lines, row, col))["stats"]
        assert s["prefilled_tokens"] <= 8, (ch, s)
        assert s["reused_tokens"] + s["prefilled_tokens"] == s["prompt_tokens"]
        assert s["cache_hits"]["device"] == 1


def test_moving_one_line_refeeds_no_more_than_the_near_window(completer_factory):
    from rwkv_engine.pipeline.prompt_layout import window_split
    c = completer_factory(candidates=1, max_tokens=1, n_prefix=40, near_prefix=8, near_suffix=4)
    enc = c.builder.lines.encode
    prev_split = None
    for row in (30, 31, 32, 33, 32, 31):         # crosses the 8-line alignment at 32 both ways
        req = make_request(SOURCE_LINES, row)
        prompt = c.build_prompt(req)
        start, split = window_split(0, row, 40, 8)
        assert start == 0                         # the far start does not move in this range
        s = c.complete(req)["stats"]
        if prev_split is not None:
            window = sum(len(seg.tokens) for seg in prompt.segments
                         if seg.kind in ("marker", "suffix", "near", "cursor"))
            moved = sum(len(enc(ln + "\n")) for ln in SOURCE_LINES[prev_split:split])  # near -> far
            assert s["prefilled_tokens"] <= window + moved, (row, s)
            assert s["reused_tokens"] >= s["prompt_tokens"] - window - moved
        prev_split = split


def test_a_new_ring_chunk_costs_only_its_own_tokens(completer_factory):
    c = completer_factory()
    c.add_chunk("alpha = 1\nbeta = 2\ngamma = 3\n", "a.py")
    c.add_chunk("def helper(z):\n    return z * 2\n# end\n", "b.py")
    while c.prime_step():
        pass
    c.add_chunk("class K:\n    x = 1\n    y = 2\n", "c.py")
    assert c.prime_step()
    new_seg = c.builder.chunk_segment(c.ring.chunks[-1], first=False)
    assert c.last_prime["what"] == "chunks"
    assert c.last_prime["prefilled_tokens"] == len(new_seg.tokens)


def test_priming_yields_to_a_request_within_one_prefill_piece(completer_factory):
    c = completer_factory(prefill_chunk=4)
    c.add_chunk("\n".join(f"line_{i} = {i}" for i in range(4)), "big.py")
    calls = []
    real_forward = c.model.forward

    def counting_forward(*a, **k):
        calls.append(1)
        return real_forward(*a, **k)

    flag = {"stop": False}
    c.model.forward = counting_forward
    try:
        def should_stop():
            if len(calls) >= 2:
                flag["stop"] = True               # "a request arrived" after the 2nd piece
            return flag["stop"]
        assert c.prime_step(should_stop)
        assert len(calls) == 2 and c.last_prime["done"] is False
    finally:
        del c.model.forward
    # the work done so far is kept: finishing the prime feeds only the rest
    total = 1 + len(c.builder.chunk_segment(c.ring.chunks[0]).tokens)
    assert c.prime_step()
    done = 2 * 4                                  # two pieces of prefill_chunk = 4 tokens
    assert c.last_prime["reused_tokens"] == done and c.last_prime["prefilled_tokens"] == total - done


def test_chunk_checkpoints_survive_a_new_session_on_disk(completer_factory):
    c1 = completer_factory()
    c1.add_chunk("alpha = 1\nbeta = 2\ngamma = 3\n", "a.py")
    while c1.prime_step():
        pass
    c2 = completer_factory()                      # same cache_dir, empty memory tiers
    c2.add_chunk("alpha = 1\nbeta = 2\ngamma = 3\n", "a.py")
    c2.ring.promote()
    s = c2.complete(make_request(SOURCE_LINES[:12], 9))["stats"]
    assert s["cache_hits"]["disk"] == 1
    assert s["reused_tokens"] == 1 + len(c2.builder.chunk_segment(c2.ring.chunks[0]).tokens)


def test_stale_temp_files_are_cleaned_and_never_indexed(tmp_path):
    d = tmp_path / "rwkv.nvim" / "states"
    disk_cache(tmp_path).put("k", random_snapshot(1), persist=True)
    stale, fresh = d / ".tmp-old.rwst", d / ".tmp-new.rwst"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    cache = disk_cache(tmp_path)
    assert list(cache.disk.index) == ["k"]
    assert not stale.exists() and fresh.exists()      # a concurrent writer's file is left alone


# -- memory: what a cached state really holds (issue 11, defect 1) ----------------------------
def _tokens(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 60000, (n,), generator=g).tolist()


@pytest.mark.parametrize("T", [1, 64, 512])
def test_a_prefilled_state_holds_only_its_own_bytes(tiny_model, T):
    """The token-shift rows must not be views of the [B, T, C] activations: after a
    T-token forward the storage reachable from the state is exactly its size, and
    State.nbytes says so."""
    logits, st = tiny_model.forward(torch.tensor([_tokens(T)]), tiny_model.new_state(1))
    held = reachable_bytes(st.tensors())
    assert held == logical_bytes(st.tensors()) == tiny_model.state_bytes(1), (T, held)
    assert st.nbytes == held
    assert reachable_bytes([logits]) == logical_bytes([logits])
    snap = Snapshot(st, logits, T)
    assert snap.nbytes == reachable_bytes(snapshot_tensors(snap))


def test_nbytes_never_under_counts_a_view():
    """Whatever a caller hands in, nbytes is at least what keeping the tensors holds."""
    big = torch.randn(3, 512, 64)                      # an activation buffer
    st = State([big[:1, -1]], [torch.zeros(1, 1, 64, 64)], [big[1:2, -1]])
    assert st.nbytes == reachable_bytes(st.tensors()) > logical_bytes(st.tensors())
    snap = Snapshot(st, big[2:3, -1], 1)               # logits: a view of the same buffer
    assert snap.nbytes == reachable_bytes(snapshot_tensors(snap))


def test_state_value_operations_return_compact_tensors(tiny_model):
    _, st3 = tiny_model.forward(torch.tensor([_tokens(8, 1), _tokens(8, 2), _tokens(8, 3)]),
                                tiny_model.new_state(3))
    for name, op in [("fork(1)", lambda: st3.fork(1, row=1)), ("fork(2)", lambda: st3.fork(2, row=2)),
                     ("select", lambda: st3.select([2])),
                     ("copy", st3.copy), ("to", lambda: st3.select([1]).to("cpu"))]:
        out = op()
        assert reachable_bytes(out.tensors()) == logical_bytes(out.tensors()), name
    # a state made of views (rows of a batch) is compacted, values unchanged
    views = State([t[1:2] for t in st3.att_x], [t[1:2] for t in st3.wkv], [t[1:2] for t in st3.ffn_x])
    assert reachable_bytes(views.tensors()) > logical_bytes(views.tensors())
    out = views.compact()
    assert reachable_bytes(out.tensors()) == logical_bytes(out.tensors()) and out.equal(views)
    one = st3.fork(1, row=1)
    assert torch.equal(one.wkv[0][0], st3.wkv[0][1]) and torch.equal(one.att_x[1][0], st3.att_x[1][1])


def test_a_snapshot_read_from_disk_does_not_hold_the_file_buffer(tmp_path):
    cache = disk_cache(tmp_path)
    cache.put("k", random_snapshot(4), persist=True)
    snap, tier = disk_cache(tmp_path).get("k")
    assert tier == "disk" and snap_equal(snap, random_snapshot(4))
    assert reachable_bytes(snap.state.tensors()) == logical_bytes(snap.state.tensors())
    assert reachable_bytes([snap.logits]) == logical_bytes([snap.logits])
    assert snap.nbytes == logical_bytes(snapshot_tensors(snap))


def test_cache_stays_within_its_budgets_in_real_bytes(tiny_model):
    """Prefill long pieces (prefill_chunk 512) through a cache whose tiers hold about
    three snapshots: the bytes really reachable from each tier stay within its budget."""
    from rwkv_engine.pipeline.prefill import Prefiller
    from rwkv_engine.pipeline.prompt_layout import CK_MEM, Segment
    snap_size = tiny_model.state_bytes(1) + 4 * tiny_model.shape.vocab_size     # state + fp32 logits
    budget = 3 * snap_size + snap_size // 2
    cache = StateCache("m", "cpu", device_bytes=budget, host_bytes=budget)
    pre = Prefiller(tiny_model, cache, prefill_chunk=512)
    for i in range(4):
        segs = [Segment("start", (0,))] + [Segment("far", tuple(_tokens(512, 10 * i + j)), CK_MEM)
                                           for j in range(2)]
        pre.prefill(segs, tail=0)
        for tier, lru in (("device", cache.dev), ("host", cache.host)):
            real = cache_reachable_bytes(cache, tier)
            assert real <= lru.budget, (i, tier, real, lru.budget)
            assert real == lru.storage_bytes <= lru.bytes
        stats = cache.stats()
        assert stats["device"]["storage_bytes"] <= stats["device"]["budget"]
    assert len(cache.dev.items) == 3 and len(cache.host.items) == 3
    assert cache_reachable_bytes(cache) <= 2 * budget


# -- keys name the engine (issue 11, defect 3) ----------------------------------------------------
@pytest.mark.parametrize("what, other", [("STATE_FORMAT", 1), ("ENGINE_VERSION", "0.0.1-old")])
def test_snapshots_written_by_another_engine_version_are_not_found(tmp_path, monkeypatch, what, other):
    d = tmp_path / "states"
    toks = [0, 11, 22, 33]
    monkeypatch.setattr(state_cache_mod, what, other, raising=False)
    old = StateCache("model-x", "cpu", 1 << 20, 0, 1 << 20, d)
    old.put(chain_key(old.root, toks), random_snapshot(5), persist=True)
    monkeypatch.undo()
    new = StateCache("model-x", "cpu", 1 << 20, 0, 1 << 20, d)
    key = chain_key(new.root, toks)
    assert new.root != old.root
    assert new.tier_of(key) is None and new.get(key) is None
    # the same engine still finds its own files
    new.put(key, random_snapshot(6), persist=True)
    again = StateCache("model-x", "cpu", 1 << 20, 0, 1 << 20, d)
    snap, tier = again.get(chain_key(again.root, toks))
    assert tier == "disk" and snap_equal(snap, random_snapshot(6))


def test_chunk_checkpoints_of_an_older_engine_are_not_reused(completer_factory, monkeypatch):
    chunk = "alpha = 1\nbeta = 2\ngamma = 3\n"
    monkeypatch.setattr(state_cache_mod, "ENGINE_VERSION", "0.0.1-old", raising=False)
    c1 = completer_factory()
    c1.add_chunk(chunk, "a.py")
    while c1.prime_step():
        pass
    assert c1.cache.stats()["disk"]["entries"] >= 1
    monkeypatch.undo()
    c2 = completer_factory()                      # same cache_dir, the current engine
    c2.add_chunk(chunk, "a.py")
    c2.ring.promote()
    s = c2.complete(make_request(SOURCE_LINES[:12], 9))["stats"]
    assert s["cache_hits"]["disk"] == 0 and s["reused_tokens"] == 0
