"""CompletionService: worker thread, latest request wins, events, chunks, priming, accept."""
from __future__ import annotations

import re
import threading

import pytest

from rwkv_engine.pipeline.service import CompletionService

from pipeline_fixtures import Recorder, SOURCE_LINES, fast_config, make_request

WAIT = 60.0   # generous: the machine may be busy; tests never assert on time


@pytest.fixture
def service(tiny_model, tmp_path):
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, max_tokens=4), on_event=rec.on_event, model=tiny_model)
    svc.start()
    assert rec.ready.wait(WAIT)
    yield svc, rec
    svc.close()


def wait_until(cond, timeout=WAIT):
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if cond():
            return True
        done.wait(0.05)
    return cond()


def test_ready_event_then_a_result_with_stats(service):
    svc, rec = service
    assert [k for k, _ in rec.events] == ["loading", "ready"]
    ready = rec.events[1][1]
    assert ready["device"] == "cpu" and ready["dtype"] == "float32" and "load_ms" in ready
    # :RwkvStatus and :checkhealth name the CPU kernels' instruction-set path in use
    assert re.fullmatch(r"q8: (avx512-vnni|avx512bw|avx2|neon-dotprod|neon|scalar)", svc.status()["cpu_kernels"])
    rid = svc.submit(make_request(SOURCE_LINES[:12], 9, rid=7), rec.on_partial, rec.on_done)
    assert rid == 7 and rec.finished.wait(WAIT)
    (res,) = rec.done
    assert res["id"] == 7 and res["candidates"]
    assert all(set(c) == {"text", "logprob"} for c in res["candidates"])
    s = res["stats"]
    for key in ("reused_tokens", "prefilled_tokens", "decoded_tokens", "ms_prefill", "ms_decode",
                "ms_total", "candidates"):
        assert key in s
    assert set(s["cache_hits"]) == {"device", "host", "disk", "miss"}
    assert rec.partials and all(p["id"] == 7 for p in rec.partials)
    st = svc.status()
    assert st["loaded"] and st["error"] is None and st["last"] == s
    assert st["load"] == {"submitted": 1, "finished": 1, "superseded": 0, "running": 0, "max_running": 1}
    assert st["cache"]["device"]["entries"] > 0


def test_a_superseded_request_yields_nothing(service):
    svc, rec = service
    first_done, second = [], Recorder()
    started = threading.Event()

    def first_partial(p):
        if not started.is_set():
            started.set()
            # a newer request arrives while the first one is decoding
            svc.submit(make_request(SOURCE_LINES[:12], 10, rid=2), second.on_partial, second.on_done)

    svc.submit(make_request(SOURCE_LINES[:12], 9, rid=1), first_partial, first_done.append)
    assert second.finished.wait(WAIT)
    assert started.is_set() and first_done == []
    assert [r["id"] for r in second.done] == [2]
    assert wait_until(lambda: svc.status()["load"]["superseded"] == 1)
    load = svc.status()["load"]
    assert load["max_running"] == 1 and load["finished"] == 1 and load["submitted"] == 2


def test_only_the_latest_of_queued_requests_runs(tiny_model, tmp_path):
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, max_tokens=2), on_event=rec.on_event, model=tiny_model)
    try:
        for i in range(1, 4):                      # queued before the worker even starts
            svc.submit(make_request(SOURCE_LINES[:12], 9, rid=i), None, rec.on_done)
        svc.start()
        assert rec.finished.wait(WAIT)
        svc.close()
        assert [r["id"] for r in rec.done] == [3]
    finally:
        svc.close()


def test_cancel_drops_the_pending_request(tiny_model, tmp_path):
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path), on_event=rec.on_event, model=tiny_model)
    svc.submit(make_request(SOURCE_LINES[:12], 9), None, rec.on_done)
    svc.cancel()
    svc.start()
    assert rec.ready.wait(WAIT)
    svc.close()
    assert rec.done == []


def test_chunks_and_priming_fill_the_ring(service):
    svc, rec = service
    svc.add_chunk("alpha = 1\nbeta = 2\ngamma = 3\n", "a.py")
    svc.prime()
    assert wait_until(lambda: svc.status()["cache"]["ring"]["chunks"] == 1)
    assert wait_until(lambda: not svc._prime_wanted)
    svc.submit(make_request(SOURCE_LINES[:12], 9), None, rec.on_done)
    assert rec.finished.wait(WAIT)
    s = rec.done[0]["stats"]
    assert s["cache_hits"]["device"] == 1 and s["reused_tokens"] > 10     # start token + the chunk


def test_accept_continues_from_the_state_after_the_accepted_text(service):
    svc, rec = service
    lines = SOURCE_LINES[:12]
    svc.submit(make_request(lines, 9, rid=1), None, rec.on_done)
    assert rec.finished.wait(WAIT)
    texts = [c["text"].split("\n")[0] for c in rec.done[0]["candidates"]]
    text = next((t for t in texts if t), None)
    if text is None:
        pytest.skip("the random model proposed no single-line text to accept")
    rec.finished.clear()
    svc.accept(1, text)
    after = list(lines)
    after[9] = lines[9] + text
    svc.submit(make_request(after, 9, rid=2), None, rec.on_done)
    assert rec.finished.wait(WAIT)
    s = rec.done[1]["stats"]
    assert s["speculative"] is True
    assert s["reused_tokens"] == rec.done[0]["stats"]["prompt_tokens"]
    assert 0 < s["prefilled_tokens"] <= 4 + len(text.encode("utf-8"))   # only the accepted text


def test_a_missing_model_reports_one_clear_error(tmp_path):
    rec = Recorder()
    missing = tmp_path / "nope.pth"
    svc = CompletionService(fast_config(tmp_path, model=str(missing)), on_event=rec.on_event)
    svc.start()
    try:
        assert rec.ready.wait(WAIT)
        kind, info = rec.events[-1]
        assert kind == "error" and "nope" in info["message"] and "\n" not in info["message"]
        svc.submit(make_request(SOURCE_LINES[:12], 9), None, rec.on_done)
        assert rec.finished.wait(WAIT)
        assert rec.done[0]["candidates"] == [] and "nope" in rec.done[0]["error"]
        assert svc.status()["loaded"] is False
    finally:
        svc.close()


def test_a_malformed_request_gets_an_error_result(service):
    svc, rec = service
    svc.submit({"id": 5, "lines": ["x"], "first": 0, "row": 4, "col": 0}, None, rec.on_done)
    assert rec.finished.wait(WAIT)
    assert rec.done[0]["id"] == 5 and "outside" in rec.done[0]["error"]


def test_an_engine_failure_is_reported_and_the_worker_survives(service, monkeypatch):
    svc, rec = service
    real = svc._completer.complete

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory\nsecond line")
    monkeypatch.setattr(svc._completer, "complete", boom)
    svc.submit(make_request(SOURCE_LINES[:12], 9, rid=1), None, rec.on_done)
    assert rec.finished.wait(WAIT)
    assert rec.done[0]["error"] == "CUDA out of memory"
    assert ("error", {"message": "CUDA out of memory"}) in rec.events
    monkeypatch.setattr(svc._completer, "complete", real)
    rec.finished.clear()
    svc.submit(make_request(SOURCE_LINES[:12], 9, rid=2), None, rec.on_done)
    assert rec.finished.wait(WAIT) and rec.done[1]["candidates"]


class BatchOomModel:
    """Delegates to a real model but runs out of memory for batches of more than one row."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward(self, tokens, state=None):
        if tokens.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self._inner.forward(tokens, state)


def test_out_of_memory_in_batched_decode_lowers_the_candidate_count_once(tiny_model, tmp_path):
    from rwkv_engine.pipeline.completer import Completer
    warnings = []
    c = Completer(fast_config(tmp_path, candidates=4), model=BatchOomModel(tiny_model),
                  on_warning=warnings.append)
    res = c.complete(make_request(SOURCE_LINES[:12], 9))
    assert len(res["candidates"]) == 1 and c.rows == 1
    assert len(warnings) == 1 and "4 candidates" in warnings[0] and "1 candidate" in warnings[0]
    c.complete(make_request(SOURCE_LINES[:12], 9, rid=2))
    assert len(warnings) == 1


# -- configuration -----------------------------------------------------------------------------
def test_config_from_dict_coerces_lua_values_and_rejects_bad_ones():
    from rwkv_engine.pipeline.config import EngineConfig
    cfg = EngineConfig.from_dict({"candidates": 6.0, "stop": {}, "model": None, "temperature": 1})
    assert cfg.candidates == 6 and cfg.stop == [] and cfg.model is None and cfg.temperature == 1.0
    small = EngineConfig.from_dict({"n_prefix": 10, "n_suffix": 2})
    assert small.near_prefix == 10 and small.near_suffix == 2     # the FIM window shrinks along
    for bad, name in [({"bogus": 1}, "bogus"), ({"candidates": 17}, "candidates"),
                      ({"candidates": 2.5}, "candidates"), ({"device": "tpu"}, "device"),
                      ({"top_p": 0}, "top_p"), ({"n_prefix": -1}, "n_prefix"),
                      ({"stop": [""]}, "stop")]:
        with pytest.raises(ValueError, match=name) as info:
            EngineConfig.from_dict(bad)
        assert "\n" not in str(info.value)


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    from rwkv_engine.pipeline.config import EngineConfig
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert EngineConfig().resolved_cache_dir() == tmp_path / "rwkv.nvim"
    assert EngineConfig(cache_dir=str(tmp_path / "x")).resolved_cache_dir() == tmp_path / "x"


def test_model_resolution_errors_name_the_missing_file(monkeypatch, tmp_path):
    from rwkv_engine.core import download
    from rwkv_engine.pipeline import loading as completion
    from rwkv_engine.core.checkpoint import CheckpointError
    from rwkv_engine.pipeline.config import EngineConfig
    monkeypatch.setattr(completion, "DEFAULT_MODEL", tmp_path / "default-model.pth")
    with pytest.raises(CheckpointError, match="default-model.pth"):
        completion.resolve_model_path(EngineConfig())
    monkeypatch.setattr(download, "resolve_local", lambda name, local_dir=None: None)
    with pytest.raises(CheckpointError, match="rwkv-nvim download g1-0.1b"):
        completion.resolve_model_path(EngineConfig(model="g1-0.1b"))
    found = tmp_path / "m.pth"
    found.write_bytes(b"x")
    assert completion.resolve_model_path(EngineConfig(model=str(tmp_path / "m"))) == tmp_path / "m"


@pytest.mark.parametrize("after_ms", [0, 50])
def test_the_neighbouring_lines_are_primed_once_idle_after_a_suggestion(tiny_model, tmp_path, after_ms):
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, max_tokens=2, prime_after_ms=after_ms),
                            on_event=rec.on_event, model=tiny_model)
    svc.start()
    try:
        assert rec.ready.wait(WAIT)
        svc.submit(make_request(SOURCE_LINES[:12], 9, rid=1), rec.on_partial, rec.on_done)
        assert rec.finished.wait(WAIT)
        c = svc._completer
        if after_ms:
            # without any prime() call (the editor's CursorHold), the lines next to the cursor
            assert wait_until(lambda: (c.last_prime or {}).get("what", "").startswith("line"))
        else:
            threading.Event().wait(0.5)
            assert not c.last_prime
    finally:
        svc.close()
