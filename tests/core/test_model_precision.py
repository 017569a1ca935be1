"""The accuracy gate on the user's own model (rwkv_engine.core.model_precision): the file's
identity (sampled, never read whole), the decision, the cache, and how loading applies it
on top of the per-CPU verdict (rwkv_engine.pipeline.loading.cpu_precision_for)."""
from __future__ import annotations

import builtins
import json
import os
import stat
from pathlib import Path

import pytest

from rwkv_engine.core import cpu_precision as cp
from rwkv_engine.core import model_precision as mp
from precision_fakes import TIMING_FIGURES, FakeModelGate, isolate_precision
from rwkv_engine.pipeline.config import EngineConfig


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    isolate_precision(tmp_path, monkeypatch)
    yield
    cp.forget()


@pytest.fixture
def cpu_int8(monkeypatch):
    """This CPU's verdict: int8 (faked figures), counting measurements."""
    calls = []

    def measure(modes, shape, reference_path=None, progress=None, seed=0, threads=None, pause=None):
        calls.append(1)
        return {m: dict(TIMING_FIGURES[m]) for m in modes}, {}
    monkeypatch.setattr(cp, "measure", measure)
    return calls


def gate(monkeypatch, **kw) -> FakeModelGate:
    g = FakeModelGate(**kw)
    monkeypatch.setattr(mp, "measure", g)
    return g


def _file(tmp_path, size: int, name="m.pth") -> Path:
    p = tmp_path / name
    with open(p, "wb") as fh:
        fh.write(os.urandom(min(size, 4096)))
        if size > 4096:
            fh.truncate(size)            # sparse: a "multi-GB" file costs no disk
    return p


# -- the file's identity -------------------------------------------------------------------
def test_the_same_file_has_the_same_key_a_touched_or_changed_one_a_new_one(tmp_path):
    p = _file(tmp_path, 100_000)
    k = mp.gate_key(p, "int8")
    assert mp.gate_key(p, "int8") == k
    assert mp.gate_key(p, "int4") != k                        # the mode is part of the key
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # touched
    assert mp.gate_key(p, "int8") != k
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert mp.gate_key(p, "int8") == k
    data = bytearray(p.read_bytes())
    data[50_000] ^= 0xFF                                       # same size, same mtime, new content
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert mp.gate_key(p, "int8") != k


def test_a_big_file_is_sampled_not_read_whole(tmp_path, monkeypatch):
    size = 64 * 2**20 + 12345
    p = _file(tmp_path, size, "big.pth")
    read = []

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

        def seek(self, at):
            return self.fh.seek(at)

        def read(self, n=-1):
            data = self.fh.read(n)
            read.append(len(data))
            return data
    monkeypatch.setattr(mp, "open", lambda *a, **k: Counting(builtins.open(*a, **k)), raising=False)
    ident = mp.file_identity(p)
    assert ident["size"] == size and sum(read) == 3 * mp.SAMPLE
    # a change in a sampled region (the middle) is a new identity even with the same mtime
    st = p.stat()
    with builtins.open(p, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"changed")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert mp.file_identity(p)["sample"] != ident["sample"]


# -- the decision --------------------------------------------------------------------------
def test_the_gate_passes_on_top1_and_kl_and_says_why_it_fails():
    assert mp.decide("int8", 0.996, 0.0004, 512) == {"passed": True,
                                                      "why": "top-1 99.6 %, KL 0.0004 over 512 tokens"}
    assert mp.decide("int8", 0.96, 0.0004, 512) == {"passed": False, "why": "top-1 96.0 % < 99 % over 512 tokens"}
    assert mp.decide("int8", 0.995, 0.2, 512) == {"passed": False, "why": "KL 0.2000 > 0.05 over 512 tokens"}


# -- the cache -----------------------------------------------------------------------------
def test_a_result_is_measured_once_then_cached_per_file_and_mode(tmp_path, monkeypatch, tiny_model_path):
    g = gate(monkeypatch)
    r = mp.check(tiny_model_path, "int8", cache_dir=tmp_path / "c")
    assert r["passed"] and r["checked"] and r["source"] == "measured" and g.calls == 1
    f = tmp_path / "c" / mp.CACHE_NAME
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    r2 = mp.check(tiny_model_path, "int8", cache_dir=tmp_path / "c")
    assert r2["source"] == "cache" and g.calls == 1 and r2["why"] == r["why"]
    assert mp.check(tiny_model_path, "int4", cache_dir=tmp_path / "c", measure_now=False) is None
    monkeypatch.setattr(mp, "code_fingerprint", lambda: "a new kernel")      # new engine code: anew
    assert mp.check(tiny_model_path, "int8", cache_dir=tmp_path / "c", measure_now=False) is None
    mp.check(tiny_model_path, "int8", cache_dir=tmp_path / "c")
    assert g.calls == 2 and len(json.loads(f.read_text())["results"]) == 2


def test_a_failing_result_is_cached_too_and_a_mode_that_cannot_run_fails(tmp_path, monkeypatch, tiny_model_path):
    g = gate(monkeypatch, top1=0.9)
    assert mp.check(tiny_model_path, "int8", cache_dir=tmp_path)["passed"] is False
    assert mp.check(tiny_model_path, "int8", cache_dir=tmp_path)["source"] == "cache" and g.calls == 1
    gate(monkeypatch, error=RuntimeError("no kernel for this shape"))
    r = mp.check(tiny_model_path, "int4", cache_dir=tmp_path)
    assert not r["passed"] and r["checked"] and r["why"] == "fails to run: no kernel for this shape"


def test_a_model_whose_fp32_copy_does_not_fit_is_checked_against_int8(tmp_path, monkeypatch, tiny_model_path):
    """A 7B model is 29 GB in fp32: int8 is the reference (and runs unchecked, not cached),
    q4a8 is checked against it, under a key of its own."""
    g = gate(monkeypatch, per_mode={"q4a8": (0.995, 0.01)})
    monkeypatch.setattr(mp, "available_memory", lambda: 1 << 20)
    assert mp.reference_mode(tiny_model_path)[0] == "int8" and mp.safe_mode(tiny_model_path) == "int8"
    r = mp.check(tiny_model_path, "int8", cache_dir=tmp_path)
    assert r["passed"] and not r["checked"] and g.calls == 0
    assert r["why"].startswith("the reference, unchecked (its fp32 reference needs ") and "GiB available" in r["why"]
    assert not (tmp_path / mp.CACHE_NAME).exists()
    r = mp.check(tiny_model_path, "q4a8", cache_dir=tmp_path)
    assert r["passed"] and r["checked"] and g.modes == ["q4a8"] and g.references[0].mode == "int8"
    assert r["why"].startswith("top-1 99.5 %, KL 0.0100 over 512 tokens against int8 (its fp32 reference needs ")
    assert r["key"]["reference"] == "int8" and r["key"] != mp.gate_key(tiny_model_path, "q4a8")
    monkeypatch.setattr(mp, "available_memory", lambda: 1 << 40)                 # fp32 fits: a new key
    assert mp.check(tiny_model_path, "q4a8", cache_dir=tmp_path, measure_now=False) is None


def test_the_real_gate_runs_int8_against_fp32_on_real_code(tmp_path, monkeypatch, tiny_model_path):
    monkeypatch.setattr(mp, "TOKENS_PER_FILE", 16)
    steps = []
    f = mp.measure(tiny_model_path, "int8", steps.append)
    assert f["tokens"] == 64 and 0.0 <= f["top1"] <= 1.0 and 0.0 <= f["kl"] < 1.0
    assert any("file 4/4" in s for s in steps)
    same = mp.measure(tiny_model_path, "fp32")
    assert same["top1"] == 1.0 and same["kl"] < 1e-9


# -- loading applies it --------------------------------------------------------------------
def test_auto_loads_int8_only_after_this_model_passes(cpu_int8, monkeypatch, tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    g = gate(monkeypatch)
    cfg = EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path / "c"))
    m = load_configured_model(cfg)
    assert m.quant == "int8" and g.calls == 1 and len(cpu_int8) == 1
    assert m.precision["summary"] == ("int8 (auto: this CPU: decode 4.0 ms vs fp32 10.0 ms; "
                                      "this model: top-1 99.6 %, KL 0.0004 over 512 tokens)")
    assert m.precision["model_check"]["passed"]
    assert load_configured_model(cfg).quant == "int8" and g.calls == 1          # cached


def test_a_model_failing_the_gate_runs_fp32_with_the_reason(cpu_int8, monkeypatch, tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    gate(monkeypatch, top1=0.96)
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path)))
    assert m.quant is None and m.precision["mode"] == "fp32"
    assert m.precision["summary"] == "fp32 (auto: this model failed the int8 gate: top-1 96.0 % < 99 % over 512 tokens)"
    assert "this model: top-1 96.0 %" in m.precision["why"]


def test_without_a_cached_result_the_model_loads_fp32_pending(cpu_int8, monkeypatch, tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    cfg = EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path))
    g = gate(monkeypatch)
    cp.resolve((2, 128, 65536), 1, cache_dir=tmp_path)                   # this CPU: measured
    m = load_configured_model(cfg, measure_now=False)
    assert m.quant is None and m.precision["pending"] and g.calls == 0
    assert m.precision["summary"] == ("fp32 (auto: this CPU prefers int8: decode 4.0 ms vs fp32 10.0 ms; "
                                      "checking this model in the background)")


def test_no_gate_for_an_explicit_mode_the_override_or_an_fp32_verdict(cpu_int8, monkeypatch, tiny_model_path,
                                                                       tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    g = gate(monkeypatch)
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu", dtype="int8"))
    assert m.quant == "int8" and g.calls == 0
    monkeypatch.setenv(cp.ENV, "int8")
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path)))
    assert m.quant == "int8" and g.calls == 0 and m.precision["summary"] == f"int8 ({cp.ENV})"


def test_a_model_too_big_for_fp32_serves_int8_and_says_why(cpu_int8, monkeypatch, tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    g = gate(monkeypatch)
    monkeypatch.setattr(mp, "available_memory", lambda: 1 << 20)
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path)))
    assert m.quant == "int8" and g.calls == 0
    assert m.precision["summary"].startswith("int8 (auto: this CPU: decode 4.0 ms vs fp32 10.0 ms; this model: "
                                             "the reference, unchecked (its fp32 reference needs "), m.precision["summary"]


def test_before_this_cpu_is_measured_a_model_too_big_for_fp32_serves_int8(monkeypatch, tiny_model_path, tmp_path):
    """fp32 is the safe mode only where it fits: a 7B model would not even load."""
    from rwkv_engine.pipeline.loading import load_configured_model
    monkeypatch.setattr(mp, "available_memory", lambda: 1 << 20)
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path)),
                              measure_now=False)
    assert m.quant == "int8" and m.precision["pending"]
    assert m.precision["summary"] == "int8 (auto: measuring this CPU in the background)"
    assert "fp32 does not fit in memory" in m.precision["why"]


# -- auto's ladder: a faster lossy mode first, the next when this model fails it -----------
LADDER_FIGURES = dict(TIMING_FIGURES, q4a8={"decode_1": 2.5, "decode_8": 6.0, "prefill_64": 40.0, "top1": 0.906})


@pytest.fixture
def cpu_q4a8(monkeypatch):
    """This CPU's verdict: q4a8 fastest, then int8 (faked figures; q4a8's top-1 on the
    default model is what 4-bit weights measure, which the per-CPU check lets through)."""
    from rwkv_engine.core import model as model_module
    monkeypatch.setattr(model_module, "cpu_modes", lambda: ("fp32", "int8", "q4a8"), raising=False)

    def measure(modes, shape, reference_path=None, progress=None, seed=0, threads=None, pause=None):
        measured = {m: dict(LADDER_FIGURES[m]) for m in modes}
        from rwkv_engine.core.cpu_precision_accuracy import gate_failures
        return measured, {m: "; ".join(gate_failures(measured[m], m)) for m in modes if gate_failures(measured[m], m)}
    monkeypatch.setattr(cp, "measure", measure)


def test_a_model_failing_the_fastest_mode_runs_the_next_one_with_one_fp32_pass(cpu_q4a8, monkeypatch,
                                                                                 tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    g = gate(monkeypatch, per_mode={"q4a8": (0.93, 0.018)})
    cfg = EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path / "c"))
    m = load_configured_model(cfg)
    assert m.quant == "int8" and g.modes == ["q4a8", "int8"]
    assert g.references[0] is g.references[1] is not None          # one shared fp32 reference
    assert m.precision["summary"] == (
        "int8 (auto: this CPU: decode 4.0 ms vs fp32 10.0 ms, q4a8 2.5 ms; this model: q4a8 failed: top-1 "
        "93.0 % < 99 % over 512 tokens; int8 passed: top-1 99.6 %, KL 0.0004 over 512 tokens)")
    assert "q4a8 failed: top-1 93.0 %" in m.precision["why"]
    assert load_configured_model(cfg).quant == "int8" and g.modes == ["q4a8", "int8"]     # both cached


def test_a_model_passing_the_fastest_mode_runs_it_and_checks_nothing_else(cpu_q4a8, monkeypatch,
                                                                         tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    g = gate(monkeypatch)
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path)))
    assert m.quant == "q4a8" and g.modes == ["q4a8"]
    assert m.precision["summary"].startswith("q4a8 (auto: this CPU: decode 2.5 ms vs fp32 10.0 ms, int8 4.0 ms; "
                                             "this model: top-1 99.6 %")


def test_a_model_failing_every_lossy_mode_runs_fp32_and_says_each_reason(cpu_q4a8, monkeypatch,
                                                                        tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    g = gate(monkeypatch, per_mode={"q4a8": (0.93, 0.018), "int8": (0.97, 0.001)})
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path)))
    assert m.quant is None and g.modes == ["q4a8", "int8"]
    assert m.precision["summary"] == (
        "fp32 (auto: this model failed every lossy mode: q4a8 failed: top-1 93.0 % < 99 % over 512 tokens; "
        "int8 failed: top-1 97.0 % < 99 % over 512 tokens)")


def test_the_next_mode_of_the_ladder_is_pending_until_checked(cpu_q4a8, monkeypatch, tiny_model_path, tmp_path):
    """Loaded before the background check: q4a8's failure is cached, int8's is not: fp32,
    pending, saying both."""
    from rwkv_engine.pipeline.loading import load_configured_model
    cfg = EngineConfig(model=str(tiny_model_path), device="cpu", cache_dir=str(tmp_path))
    g = gate(monkeypatch, per_mode={"q4a8": (0.93, 0.018)})
    mp.check(tiny_model_path, "q4a8", cache_dir=tmp_path)
    cp.resolve((2, 128, 65536), 1, cache_dir=tmp_path)
    m = load_configured_model(cfg, measure_now=False)
    assert m.quant is None and m.precision["pending"] and g.modes == ["q4a8"]
    assert m.precision["summary"].startswith("fp32 (auto: q4a8 failed: top-1 93.0 % < 99 % over 512 tokens; "
                                             "this CPU prefers int8: decode 4.0 ms")


def test_the_reference_is_computed_once_for_several_modes(monkeypatch, tiny_model_path):
    """The real gate (no fake): two modes checked with one Reference run fp32 once."""
    from rwkv_engine.core import cpu_precision_measure as cm
    monkeypatch.setattr(mp, "TOKENS_PER_FILE", 16)
    built = []
    real_build = cm._build

    def build(sd, shape, mode, world_ids=None):
        built.append(mode)
        return real_build(sd, shape, mode, world_ids)
    monkeypatch.setattr(cm, "_build", build)
    ref = mp.Reference(tiny_model_path)
    a = mp.measure(tiny_model_path, "q4a8", reference=ref)
    b = mp.measure(tiny_model_path, "int8", reference=ref)
    assert built == ["fp32", "q4a8", "int8"]
    assert b["top1"] >= a["top1"] and b["kl"] <= a["kl"] and a["tokens"] == b["tokens"] == 64
