"""The per-model accuracy gate in the service (rwkv_engine.pipeline.service,
``_precision_in_background``) and in `rwkv-nvim info`: this CPU's verdict prefers int8, the
model is served in fp32 while the gate checks int8 on it in the background, then switches
when it passes and stays fp32, saying why, when it fails."""
from __future__ import annotations

import json
import threading
import time

import pytest

from rwkv_engine.core import cpu_precision as cp
from rwkv_engine.core import model_precision as mp
from precision_fakes import TIMING_FIGURES, FakeModelGate, isolate_precision


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    isolate_precision(tmp_path, monkeypatch)
    yield
    cp.forget()


@pytest.fixture
def cpu_measured(monkeypatch, tmp_path):
    """This CPU measured already (int8 preferred), cached where fast_config puts the cache."""
    def measure(modes, shape, reference_path=None, progress=None, seed=0, threads=None, pause=None):
        return {m: dict(TIMING_FIGURES[m]) for m in modes}, {}
    monkeypatch.setattr(cp, "measure", measure)
    cp.resolve((2, 128, 65536), 1, cache_dir=tmp_path / "cache")


def _wait_for(cond, seconds=60.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _service(tmp_path, tiny_model_path, busy=False):
    """A started service; ``busy``: as if a request had just finished (the background work
    then waits for the quiet gap)."""
    from pipeline_fixtures import Recorder, fast_config

    from rwkv_engine.pipeline.service import CompletionService
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, model=str(tiny_model_path), device="cpu"), on_event=rec.on_event)
    if busy:
        svc._last_request_end = time.monotonic()
    svc.start()
    assert rec.ready.wait(120)
    return svc, rec


def test_fp32_serves_while_this_model_is_checked_then_int8_when_it_passes(cpu_measured, monkeypatch,
                                                                          tiny_model_path, tmp_path):
    from pipeline_fixtures import SOURCE_LINES, make_request
    g = FakeModelGate()
    g.release = threading.Event()
    monkeypatch.setattr(mp, "measure", g)
    svc, rec = _service(tmp_path, tiny_model_path)
    try:
        st = svc.status()
        assert st["precision"] == ("fp32 (auto: this CPU prefers int8: decode 4.0 ms vs fp32 10.0 ms; "
                                   "checking this model in the background)"), st
        assert g.started.wait(30)
        svc.submit(make_request(SOURCE_LINES[:12], 9, rid=1), None, rec.on_done)
        assert rec.finished.wait(60) and rec.done[0]["candidates"] and not rec.done[0].get("error")
        assert svc._completer.model.quant is None                      # still fp32
        g.release.set()
        want = ("int8 (auto: this CPU: decode 4.0 ms vs fp32 10.0 ms; "
                "this model: top-1 99.6 %, KL 0.0004 over 512 tokens)")
        assert _wait_for(lambda: svc.status()["precision"] == want), svc.status()
        assert svc._completer.model.quant == "int8" and g.calls == 1
        assert "this model: top-1 99.6 %" in svc.status()["precision_why"]
        rec.finished.clear()
        svc.submit(make_request(SOURCE_LINES[:12], 10, rid=2), None, rec.on_done)
        assert rec.finished.wait(60) and rec.done[1]["candidates"] and not rec.kinds("error")
    finally:
        svc.close()
    cached = json.loads((tmp_path / "cache" / mp.CACHE_NAME).read_text())["results"]
    assert [r["passed"] for r in cached] == [True]


def test_a_model_failing_the_gate_stays_fp32_with_the_reason(cpu_measured, monkeypatch, tiny_model_path, tmp_path):
    g = FakeModelGate(top1=0.96)
    monkeypatch.setattr(mp, "measure", g)
    svc, _ = _service(tmp_path, tiny_model_path)
    try:
        model = svc._completer.model
        want = "fp32 (auto: this model failed the int8 gate: top-1 96.0 % < 99 % over 512 tokens)"
        assert _wait_for(lambda: svc.status()["precision"] == want), svc.status()
        assert svc._completer.model is model and model.quant is None and g.calls == 1
        assert not model.precision.get("pending")
    finally:
        svc.close()
    # the next start finds the result cached: fp32 at once, nothing measured, no background thread
    svc, _ = _service(tmp_path, tiny_model_path)
    try:
        assert svc.status()["precision"] == want and g.calls == 1 and svc._measuring is None
    finally:
        svc.close()


def test_closing_stops_a_held_model_check(cpu_measured, monkeypatch, tiny_model_path, tmp_path):
    from rwkv_engine.pipeline import service as service_module
    g = FakeModelGate()
    monkeypatch.setattr(mp, "measure", g)
    monkeypatch.setattr(service_module, "IDLE_BEFORE_MEASURING_S", 30.0)
    svc, _ = _service(tmp_path, tiny_model_path, busy=True)
    assert _wait_for(lambda: "checking this model" in svc.status()["precision"]), svc.status()
    time.sleep(0.3)
    assert g.calls == 0                                  # held before its first step
    threads = [t for t in threading.enumerate() if t.name == "rwkv-precision"]
    svc.close()
    assert not any(t.is_alive() for t in threads)
    assert not (tmp_path / "cache" / mp.CACHE_NAME).exists()


def test_rwkv_nvim_info_says_what_this_model_runs_and_why(cpu_measured, monkeypatch, tiny_model_path, tmp_path,
                                                          capsys):
    from rwkv_engine.cli import main
    g = FakeModelGate(top1=0.96)
    monkeypatch.setattr(mp, "measure", g)
    cache = str(tmp_path / "cache")
    assert main(["info", str(tiny_model_path), "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert ("precision          fp32 (auto: this CPU prefers int8; not checked on this model yet: checked when "
            "the plugin first loads it, or: rwkv-nvim info --measure-precision)") in out and g.calls == 0
    cp.forget()
    assert main(["info", str(tiny_model_path), "--cache-dir", cache, "--measure-precision"]) == 0
    out = capsys.readouterr().out
    assert "precision          fp32 (auto: this model failed the int8 gate: top-1 96.0 % < 99 %" in out
    assert g.calls == 1
    assert main(["info", str(tiny_model_path), "--cache-dir", cache, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["precision_model_check"]["passed"] is False and info["precision_model_check"]["top1"] == 0.96
    assert g.calls == 1
