"""dtype = "auto" on the CPU: the weight representation chosen by measurement, once per
CPU, cached on disk (rwkv_engine.core.cpu_precision), and shown by status and `info`."""
from __future__ import annotations

import json
import math
import stat
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from rwkv_engine.core import cpu_precision as cp
from rwkv_engine.core import cpu_precision_accuracy as cpa
from rwkv_engine.core import cpu_precision_cache as cpc
from rwkv_engine.core import cpu_precision_measure as cpm
from rwkv_engine.core import model as model_module
from rwkv_engine.core import model_precision as mp
from precision_fakes import FakeModelGate
from rwkv_engine.pipeline.config import EngineConfig

SHAPE = (2, 128, 65536)        # the tiny fixture checkpoint's shape


CODE_FINGERPRINT = cpc.code_fingerprint      # the real one (the fixture below pins it)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Measure for real (no override), a private cache root (the compiled kernels stay
    where they are), no verdicts from other tests, engine sources that do not change."""
    from nvim_harness import shared_kernel_dir
    monkeypatch.setenv("RWKV_NVIM_KERNEL_DIR", shared_kernel_dir())
    monkeypatch.delenv(cp.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cpc, "code_fingerprint", lambda: "fixed")
    cp.forget()
    yield
    cp.forget()


FIGURES = {"fp32": {"decode_1": 10.0, "decode_8": 20.0, "prefill_64": 100.0, "kl": 0.0,
                    "max_logit_err": 0.0, "top1": 1.0},
           "int8": {"decode_1": 4.0, "decode_8": 8.0, "prefill_64": 60.0, "kl": 0.01,
                    "max_logit_err": 0.05, "top1": 0.995}}


class FakeMeasure:
    """Replaces cp.measure: fixed figures, counts its calls."""

    def __init__(self, figures=None, rejected=None):
        self.figures, self.rejected, self.calls = figures or FIGURES, rejected or {}, 0
        self.gate: Optional[threading.Event] = None     # set: the measurement waits for it
        self.started = threading.Event()

    def __call__(self, modes, shape, reference_path=None, progress=None, seed=0, threads=None, pause=None):
        self.calls += 1
        self.started.set()
        for _ in range(3):                              # steps, each after the engine's pause
            if pause is not None:
                pause()
            if self.gate is not None:
                assert self.gate.wait(60)
        if progress is not None:
            progress("measuring (fake)")
        return ({m: dict(self.figures[m]) for m in modes}, dict(self.rejected))


@pytest.fixture
def fake(monkeypatch):
    f = FakeMeasure()
    monkeypatch.setattr(cp, "measure", f)
    monkeypatch.setattr(model_module, "cpu_modes", lambda: ("fp32", "int8"), raising=False)
    f.model_gate = FakeModelGate()
    monkeypatch.setattr(mp, "measure", f.model_gate)
    return f


INT8_SUMMARY = ("int8 (auto: this CPU: decode 4.0 ms vs fp32 10.0 ms; "
                "this model: top-1 99.6 %, KL 0.0004 over 512 tokens)")


# -- cache ---------------------------------------------------------------------------------
def test_a_verdict_is_measured_once_then_cached_on_disk_private(fake, tmp_path):
    v = cp.resolve(SHAPE, 1)
    assert fake.calls == 1 and v["decode"] == v["prefill"] == "int8" and v["source"] == "measured"
    path = tmp_path / "xdg" / "rwkv.nvim" / "cpu-precision.json"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert cp.resolve(SHAPE, 1)["source"] == "cache" and fake.calls == 1     # this process
    cp.forget()
    again = cp.resolve(SHAPE, 1)                                             # the file
    assert fake.calls == 1 and again["decode"] == "int8" and again["measured"] == v["measured"]


@pytest.mark.parametrize("change", ["cpu", "flags", "torch", "engine", "code", "candidates", "threads",
                                    "shape"])
def test_a_changed_key_measures_again(fake, monkeypatch, change):
    cp.resolve(SHAPE, 1)
    assert fake.calls == 1
    cp.forget()
    threads, shape = 1, SHAPE
    ident = cpc.cpu_identity()
    if change == "code":
        monkeypatch.setattr(cpc, "code_fingerprint", lambda: "a new kernel")
    elif change == "cpu":
        monkeypatch.setattr(cpc, "cpu_identity", lambda: dict(ident, cpu="Another CPU"))
    elif change == "flags":
        monkeypatch.setattr(cpc, "cpu_identity", lambda: dict(ident, flags="0123456789abcdef"))
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    elif change == "engine":
        import rwkv_engine
        monkeypatch.setattr(rwkv_engine, "__version__", rwkv_engine.__version__ + ".dev1")
    elif change == "candidates":
        monkeypatch.setattr(model_module, "cpu_modes", lambda: ("fp32",), raising=False)
    elif change == "threads":
        threads = 2
    elif change == "shape":
        shape = (4, 256, 65536)
    v = cp.resolve(shape, threads)
    assert fake.calls == 2 and v["source"] == "measured"
    assert len(json.loads(cp.cache_file().read_text())["verdicts"]) == 2
    # both verdicts are kept: the first key is still answered from the file
    cp.forget()
    monkeypatch.setattr(cpc, "cpu_identity", lambda: ident)
    monkeypatch.setattr(cpc, "code_fingerprint", lambda: "fixed")
    monkeypatch.setattr(torch, "__version__", torch.__version__.removesuffix(".other"))
    import rwkv_engine
    monkeypatch.setattr(rwkv_engine, "__version__", rwkv_engine.__version__.removesuffix(".dev1"))
    monkeypatch.setattr(model_module, "cpu_modes", lambda: ("fp32", "int8"), raising=False)
    assert cp.resolve(SHAPE, 1)["source"] == "cache" and fake.calls == 2


def test_the_timing_shape_is_the_model_up_to_0_1b_then_capped():
    assert cp.timing_shape(4, 192, 4096) == (4, 192, 4096)
    assert cp.timing_shape(12, 768, 65536) == cp.CAP_SHAPE
    assert cp.timing_shape(24, 1024, 65536) == cp.CAP_SHAPE
    assert cp.timing_shape(32, 4096, 65536) == cp.CAP_SHAPE


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[]",
                                     b'{"format": "something else", "verdicts": []}',
                                     b'{"format": "rwkv.nvim cpu-precision 1", "verdicts": "x"}'])
def test_a_corrupt_or_foreign_file_is_ignored_and_rewritten(fake, content):
    path = cp.cache_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    v = cp.resolve(SHAPE, 1)
    assert fake.calls == 1 and v["decode"] == "int8"
    data = json.loads(path.read_text())
    assert data["format"] == cp.FORMAT and [x["decode"] for x in data["verdicts"]] == ["int8"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_cached_verdict_naming_a_mode_outside_its_candidates_is_ignored(fake):
    v = cp.resolve(SHAPE, 1)
    path = cp.cache_file()
    data = json.loads(path.read_text())
    data["verdicts"][0]["decode"] = "int3"            # tampered: not a candidate of its key
    path.write_text(json.dumps(data))
    cp.forget()
    again = cp.resolve(SHAPE, 1)
    assert fake.calls == 2 and again["decode"] == v["decode"] == "int8"


def test_an_unwritable_cache_place_costs_only_a_log_line(fake, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    v = cp.resolve(SHAPE, 1, cache_dir=blocker / "sub")
    assert v["decode"] == "int8" and fake.calls == 1
    assert cp.resolve(SHAPE, 1, cache_dir=blocker / "sub")["source"] == "cache" and fake.calls == 1


def test_the_environment_override_skips_measurement(fake, monkeypatch):
    monkeypatch.setenv(cp.ENV, "fp32")
    v = cp.resolve(SHAPE, 1)
    assert v["decode"] == v["prefill"] == "fp32" and v["source"] == "env" and fake.calls == 0
    assert not cp.cache_file().exists()
    assert cp.describe(v) == f"fp32 ({cp.ENV})"
    monkeypatch.setenv(cp.ENV, "int5")                 # not a mode: ignored, measured
    assert cp.resolve(SHAPE, 1)["decode"] == "int8" and fake.calls == 1


# -- the rule ------------------------------------------------------------------------------
def _m(**modes):
    return {name: {"decode_1": d1, "decode_8": d8, "prefill_64": p} for name, (d1, d8, p) in modes.items()}


def test_the_fastest_passing_decode_mode_is_chosen():
    dec, pre, why = cp.choose(_m(fp32=(10, 20, 100), int8=(4, 8, 60), bf16=(6, 10, 40)), {})
    assert (dec, pre) == ("int8", "int8") and why.startswith("decode 1/8 rows: int8 4.0/8.0 ms")
    dec, pre, _ = cp.choose(_m(fp32=(10, 20, 100), int8=(4, 8, 60), bf16=(3, 5, 40)), {})
    assert dec == "bf16"


def test_a_mode_failing_the_gate_is_never_chosen_however_fast():
    measured = _m(fp32=(10, 20, 100), int8=(1, 2, 10))
    dec, pre, why = cp.choose(measured, {"int8": "top-1 97.0 % < 99 % on real code"})
    assert (dec, pre) == ("fp32", "fp32") and "rejected int8 (top-1 97.0 %" in why
    assert cp.choose(measured, {"int8": "x", "fp32": "y"})[:2] == ("fp32", "fp32")   # nothing passes


def test_a_decode_pick_with_a_prefill_over_twice_the_fastest_loses():
    measured = _m(fp32=(10, 20, 100), int8=(4, 8, 201))
    assert cp.choose(measured, {})[0] == "fp32"
    measured["int8"]["prefill_64"] = 199
    assert cp.choose(measured, {})[0] == "int8"
    # the next-fastest decode mode whose prefill is within 2x
    assert cp.choose(_m(fp32=(10, 20, 100), int8=(4, 8, 300), bf16=(6, 10, 50)), {})[0] == "bf16"


def test_a_tie_within_the_margin_keeps_fp32():
    assert cp.choose(_m(fp32=(10, 20, 100), int8=(9.8, 19.5, 90)), {})[0] == "fp32"
    assert cp.choose(_m(fp32=(10, 20, 100), int8=(9, 18, 90)), {})[0] == "int8"


def test_split_phases_pick_each_fastest():
    measured = _m(fp32=(10, 20, 100), int8=(4, 8, 80), bf16=(6, 10, 30))
    dec, pre, why = cp.choose(measured, {}, split=True)
    assert (dec, pre) == ("int8", "bf16") and "prefill: bf16" in why


def test_describe_names_the_mode_the_figures_and_the_rejections():
    v = {"decode": "int8", "prefill": "int8", "measured": FIGURES, "rejected": {}, "source": "cache"}
    assert cp.describe(v) == "int8 (auto: decode 4.0 ms vs fp32 10.0 ms; top-1 99.5 %)"
    v = {"decode": "fp32", "prefill": "fp32", "measured": FIGURES,
         "rejected": {"int8": "top-1 98.0 % < 99 % on real code"}}
    assert cp.describe(v) == ("fp32 (auto: decode 10.0 ms vs int8 4.0 ms; "
                              "int8 rejected: top-1 98.0 % < 99 % on real code)")


# -- the measurement itself, on a tiny random model ----------------------------------------
class Broken:
    """A mode that is fast and wrong: fp32's model with its logits scrambled."""

    def __init__(self, inner):
        self.inner = inner

    def forward(self, tokens, state=None, all_logits=False):
        logits, new = self.inner.forward(tokens, state, all_logits=all_logits)
        return logits.roll(1, dims=-1) * 3.0, new

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def tiny_measurement(monkeypatch):
    """The accuracy checkpoint at the tiny shape, so measuring takes ~a second."""
    monkeypatch.setattr(cpm, "CAP_SHAPE", (2, 128, 4096))
    monkeypatch.setattr(cpa, "TOP1_TOKENS", 128)
    monkeypatch.setattr(cpa, "GATE_TOKENS", 16)
    monkeypatch.setattr(cpm, "ROUNDS", {"decode_1": 2, "decode_8": 1, "prefill_64": 1})
    monkeypatch.setattr(cpm, "MIN_ROUNDS", 1)


def test_measuring_a_tiny_model_gives_every_figure_and_rejects_a_broken_mode(tiny_measurement, monkeypatch):
    from rwkv_engine.pipeline.loading import DEFAULT_MODEL
    real_build, real_time = cpm._build, cpm._time_modes

    def build(sd, shape, mode, world_ids=None):
        if mode == "nobuild":
            raise RuntimeError("this CPU lacks the instructions")
        return Broken(real_build(sd, shape, "fp32", world_ids)) if mode == "broken" \
            else real_build(sd, shape, mode, world_ids)

    def time_modes(models, vocab, progress):           # the broken mode "is" the fastest
        figures = real_time(models, vocab, progress)
        if "broken" in figures:
            figures["broken"] = {k: 0.001 for k in figures["broken"]}
        return figures

    monkeypatch.setattr(cpm, "_build", build)
    monkeypatch.setattr(cpm, "_time_modes", time_modes)
    monkeypatch.setattr(model_module, "cpu_modes", lambda: ("fp32", "broken", "nobuild"), raising=False)
    said = []
    v = cp.resolve((2, 128, 4096), 1, reference_path=DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None,
                   progress=said.append)
    assert said and said[-1].startswith("CPU precision measured in")
    assert v["decode"] == v["prefill"] == "fp32"
    f = v["measured"]["fp32"]
    assert all(f[k] > 0 and math.isfinite(f[k]) for k in ("decode_1", "decode_8", "prefill_64"))
    assert f["kl"] == 0.0 and f["max_logit_err"] == 0.0
    assert "cannot build: this CPU lacks the instructions" in v["rejected"]["nobuild"]
    reason = v["rejected"]["broken"]
    assert f"> {cp.KL_MAX}" in reason and v["measured"]["broken"]["kl"] > cp.KL_MAX
    if DEFAULT_MODEL.is_file():
        assert f["top1"] == 1.0 and v["measured"]["broken"]["top1"] < 0.5 and "top-1" in reason
    assert "broken rejected" in cp.describe(v)
    assert json.loads(cp.cache_file().read_text())["verdicts"][0]["rejected"] == v["rejected"]


def test_a_real_quantized_mode_is_measured_against_fp32(tiny_measurement, monkeypatch):
    """Whatever the model offers besides fp32 gets figures and a verdict (here: no top-1
    part, which needs the default model)."""
    modes = cp.candidates()
    if len(modes) < 2:
        pytest.skip("the model offers only fp32 on the CPU")
    measured, rejected = cp.measure(modes, (2, 128, 4096), None, None, threads=1)
    for mode in modes:
        if mode in rejected and rejected[mode].startswith(("cannot build", "fails to run")):
            continue
        f = measured[mode]
        assert f["decode_1"] > 0 and f["prefill_64"] > 0 and math.isfinite(f["kl"])
        assert "top1" not in f
    dec, pre, _ = cp.choose(measured, rejected)
    assert dec == pre and dec in modes and dec not in rejected


def test_timing_stops_at_the_budget_once_the_minimum_rounds_are_done(monkeypatch):
    """After MIN_ROUNDS, a round starts only while the time since the first round is
    within TIMING_BUDGET_S (the budget once counted from the last timed call, so it never
    ended the timing)."""
    class State:
        def fork(self, n):
            return self

    class SlowModel:                                    # every call takes at least 10 ms
        calls = 0

        def forward(self, tokens, state=None, all_logits=False):
            SlowModel.calls += 1
            time.sleep(0.01)
            return None, State()
    monkeypatch.setattr(cpm, "ROUNDS", {"decode_1": 6, "decode_8": 4, "prefill_64": 3})
    monkeypatch.setattr(cpm, "MIN_ROUNDS", 2)
    monkeypatch.setattr(cpm, "TIMING_BUDGET_S", 0.05)   # two rounds of 3 calls: >= 60 ms
    figures = cpm._time_modes({"fp32": SlowModel()}, 4096, None)
    assert SlowModel.calls == 4 + 2 * 3                 # warm-up, then the two minimum rounds
    assert all(10.0 <= ms < math.inf for ms in figures["fp32"].values())


def test_the_random_checkpoint_is_a_valid_x070_model_with_peaked_logits():
    """The measurement's checkpoint is the shared generator's (core.random_checkpoint,
    trained_like), a valid model of the asked shape whose logits are not flat."""
    from rwkv_engine.core.random_checkpoint import make_state_dict
    sd = cpm.measurement_checkpoint(2, 128, 4096, seed=3)
    shared = make_state_dict(2, 128, 4096, seed=3, trained_like=True)
    assert all(torch.equal(sd[k], v) for k, v in shared.items())
    assert sd["vocab.world_ids"].tolist() == list(range(4096))     # a trimmed vocabulary: declared
    shape = cpm.shape_of(sd)
    assert (shape.n_layer, shape.n_embd, shape.vocab_size) == (2, 128, 4096)
    m = cpm._build(sd, shape, "fp32")
    logits, _ = m.forward(torch.randint(0, 4096, (1, 8)), all_logits=True)
    top = torch.softmax(logits, -1).max(-1).values
    assert top.mean() > 0.2                      # not flat: top-1 and KL measure precision


# -- loading, service status, `rwkv-nvim info` ---------------------------------------------
def test_auto_on_the_cpu_loads_the_chosen_mode_and_records_why(fake, tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu",
                                           cache_dir=str(tmp_path / "c")))
    assert m.quant == "int8" and fake.calls == 1
    assert m.precision["mode"] == "int8" and m.precision["source"] == "auto"
    assert m.precision["summary"] == INT8_SUMMARY and fake.model_gate.calls == 1
    assert (tmp_path / "c" / "cpu-precision.json").is_file()      # cache_dir holds it too
    # an explicit mode is not measured
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu", dtype="fp32"))
    assert m.quant is None and m.precision["source"] == "config" and fake.calls == 1


def test_a_failed_measurement_runs_fp32_with_a_warning(monkeypatch, tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model

    def boom(*a, **k):
        raise RuntimeError("timer exploded")
    monkeypatch.setattr(cp, "measure", boom)
    warnings = []
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu",
                                           cache_dir=str(tmp_path / "c")), warnings.append)
    assert m.quant is None and m.precision["mode"] == "fp32"
    assert warnings == ["could not measure the CPU precision (timer exploded): running fp32"]


def test_without_a_verdict_the_model_loads_fp32_at_once_and_is_marked_pending(fake, tiny_model_path, tmp_path):
    from rwkv_engine.pipeline.loading import load_configured_model
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu",
                                           cache_dir=str(tmp_path / "c")), measure_now=False)
    assert m.quant is None and fake.calls == 0
    assert m.precision["pending"] and m.precision["mode"] == "fp32"
    assert "measuring this CPU in the background" in m.precision["summary"]


def _wait_for(cond, seconds=60.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_the_service_serves_fp32_while_measuring_then_switches(fake, tiny_model_path, tmp_path):
    """No verdict cached: "ready" comes without measuring, requests are answered in fp32
    while the measurement is held, and the worker switches to the chosen int8 after it."""
    from pipeline_fixtures import SOURCE_LINES, Recorder, fast_config, make_request

    from rwkv_engine.pipeline.service import CompletionService
    fake.gate = threading.Event()                   # the measurement waits until released
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, model=str(tiny_model_path), device="cpu"), on_event=rec.on_event)
    svc.start()
    try:
        assert rec.ready.wait(120)
        st = svc.status()
        assert st["loaded"] and st["dtype"] == "float32", st
        assert st["precision"] == "fp32 (auto: measuring this CPU in the background)"
        assert rec.kinds("ready")[0]["precision"] == st["precision"]
        assert fake.started.wait(30)                # measuring, in its own thread
        svc.submit(make_request(SOURCE_LINES[:12], 9, rid=1), None, rec.on_done)
        assert rec.finished.wait(60) and rec.done[0]["candidates"] and not rec.done[0].get("error")
        assert svc.status()["precision"].startswith("fp32 (auto: measuring")
        fake.gate.set()
        assert _wait_for(lambda: svc.status()["precision"].startswith("int8 (auto:")), svc.status()
        assert svc.status()["dtype"] == "float32"   # int8 weights, fp32 activations
        assert fake.calls == 1
        assert svc._completer.model.quant == "int8"
        rec.finished.clear()
        svc.submit(make_request(SOURCE_LINES[:12], 10, rid=2), None, rec.on_done)
        assert rec.finished.wait(60) and rec.done[1]["id"] == 2 and rec.done[1]["candidates"]
        assert not rec.kinds("error")
    finally:
        svc.close()


def _held_measurement(fake, tiny_model_path, tmp_path, monkeypatch):
    """A started service whose background measurement is held: a request has "just"
    finished and the quiet gap it waits for is 30 s."""
    from pipeline_fixtures import Recorder, fast_config

    from rwkv_engine.pipeline import service as service_module
    monkeypatch.setattr(service_module, "IDLE_BEFORE_MEASURING_S", 30.0)
    rec = Recorder()
    svc = service_module.CompletionService(fast_config(tmp_path, model=str(tiny_model_path), device="cpu"),
                                           on_event=rec.on_event)
    svc._last_request_end = time.monotonic()          # as if a request had just finished
    svc.start()
    assert rec.ready.wait(120) and fake.started.wait(30)
    return svc


def test_a_request_holds_the_background_measurement(fake, tiny_model_path, tmp_path, monkeypatch):
    """The measurement steps only while no request waits or runs (and after a quiet gap)."""
    svc = _held_measurement(fake, tiny_model_path, tmp_path, monkeypatch)
    try:
        time.sleep(0.5)
        assert svc.status()["precision"].startswith("fp32 (auto: measuring")   # still held
        with svc._cv:
            svc._last_request_end = -1e9              # long quiet: it goes on
            svc._cv.notify_all()
        assert _wait_for(lambda: svc.status()["precision"].startswith("int8 (auto:")), svc.status()
    finally:
        svc.close()


def test_closing_stops_a_held_background_measurement(fake, tiny_model_path, tmp_path, monkeypatch):
    svc = _held_measurement(fake, tiny_model_path, tmp_path, monkeypatch)
    threads = [t for t in threading.enumerate() if t.name == "rwkv-precision"]
    assert threads
    svc.close()                                     # joins it: no torch call left at exit
    assert not any(t.is_alive() for t in threads)
    assert not (tmp_path / "cache" / "cpu-precision.json").exists()


def test_rwkv_nvim_info_shows_and_remeasures_the_precision(fake, tiny_model_path, tmp_path, capsys):
    from rwkv_engine.cli import main
    cache = str(tmp_path / "c")
    assert main(["info", str(tiny_model_path), "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert "precision          not measured yet on this CPU" in out and fake.calls == 0
    assert main(["info", str(tiny_model_path), "--cache-dir", cache, "--measure-precision"]) == 0
    out = capsys.readouterr().out
    assert f"precision          {INT8_SUMMARY}" in out and fake.model_gate.calls == 1
    assert "chosen" in out and fake.calls == 1
    cp.forget()
    assert main(["info", str(tiny_model_path), "--cache-dir", cache, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["precision"].startswith("int8 (auto:") and info["precision_verdict"]["decode"] == "int8"
    assert fake.calls == 1                          # read from the cache
    assert main(["info", str(tiny_model_path), "--cache-dir", cache, "--measure-precision", "--json"]) == 0
    capsys.readouterr()
    assert fake.calls == 2                          # measured again, file rewritten
    assert len(json.loads((tmp_path / "c" / "cpu-precision.json").read_text())["verdicts"]) == 1


@pytest.mark.nvim
def test_rwkv_status_shows_the_precision_line(tmp_path):
    from nvim_harness import start_nvim
    s = start_nvim(tmp_path / "nv", {"notify": False}, manifest=False)
    try:
        s.lua(r"""
local remote = require('rwkv.host')
remote.status = function()
  return { loaded = true, model = 'fake', device = 'cpu', dtype = 'float32', error = vim.NIL,
           precision = 'int8 (auto: decode 4.0 ms vs fp32 10.0 ms; top-1 99.5 %)',
           last_error = vim.NIL, cache = {}, last = {} }
end
require('rwkv').on_event('ready', { model = 'fake', device = 'cpu', dtype = 'float32', load_ms = 1,
                                    precision = 'fp32 (RWKV_NVIM_CPU_PRECISION)' })
""")
        lines = s.lua("return require('rwkv').status_lines()")
        # one line for what runs: int8 weights with fp32 activations, no "dtype: float32" beside it
        assert "precision: int8 (auto: decode 4.0 ms vs fp32 10.0 ms; top-1 99.5 %); activations in fp32" in lines, lines
        assert not [ln for ln in lines if "dtype" in ln], lines
        s.lua("require('rwkv.host').status = function() return {} end")
        lines = s.lua("return require('rwkv').status_lines()")
        assert "precision: fp32 (RWKV_NVIM_CPU_PRECISION)" in lines, lines     # from the ready event
    finally:
        s.close()



def test_loading_freezes_what_is_alive_so_full_collections_stay_short(tiny_model_path):
    import gc

    from rwkv_engine.pipeline.config import EngineConfig
    from rwkv_engine.pipeline.loading import load_configured_model
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        load_configured_model(EngineConfig(model=str(tiny_model_path), device="cpu"))
        assert gc.get_freeze_count() > 10_000          # torch and the model: never walked again
    finally:
        gc.unfreeze()


def test_the_code_fingerprint_follows_contents_not_file_times():
    """A fresh clone or reinstall of the same code (new file times) keeps the verdict; a
    fresh clone used to re-measure (~10-40 s before the first suggestion)."""
    import os
    src = Path(cp.__file__)
    before = CODE_FINGERPRINT()
    st = src.stat()
    try:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert CODE_FINGERPRINT() == before
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_verdict_of_fp32_keeps_the_model_and_updates_the_status(monkeypatch, tiny_model_path, tmp_path):
    from pipeline_fixtures import Recorder, fast_config

    from rwkv_engine.pipeline.service import CompletionService
    slow_int8 = {"fp32": dict(FIGURES["fp32"]), "int8": dict(FIGURES["int8"], decode_1=30.0, decode_8=60.0)}
    fake = FakeMeasure(figures=slow_int8)
    monkeypatch.setattr(cp, "measure", fake)
    monkeypatch.setattr(model_module, "cpu_modes", lambda: ("fp32", "int8"), raising=False)
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, model=str(tiny_model_path), device="cpu"), on_event=rec.on_event)
    svc.start()
    try:
        assert rec.ready.wait(120)
        model = svc._completer.model
        assert _wait_for(lambda: svc.status()["precision"].startswith("fp32 (auto: decode")), svc.status()
        assert svc._completer.model is model and model.quant is None and fake.calls == 1
        assert not model.precision.get("pending")
    finally:
        svc.close()


# -- the ladder and the per-model-gated modes --------------------------------------------
def test_the_ladder_lists_the_lossy_modes_the_rule_would_take_fastest_first():
    fig = {"fp32": {"decode_1": 10.0, "decode_8": 20.0, "prefill_64": 100.0},
           "int8": {"decode_1": 4.0, "decode_8": 8.0, "prefill_64": 60.0},
           "q4a8": {"decode_1": 2.5, "decode_8": 6.0, "prefill_64": 40.0},
           "slow": {"decode_1": 9.9, "decode_8": 19.9, "prefill_64": 100.0}}   # within MARGIN of fp32
    dec, _, _ = cp.choose(fig, {})
    assert dec == "q4a8" and cp.ladder(fig, {}, dec) == ("q4a8", "int8")
    assert cp.ladder(fig, {"q4a8": "broken"}, "int8") == ("int8",)
    assert cp.ladder(fig, {}, "fp32") == ()
    fig["int8"]["prefill_64"] = 500.0                                          # > 2x the fastest prefill
    assert cp.ladder(fig, {}, "q4a8") == ("q4a8",)


def test_a_model_gated_mode_passes_the_cpu_check_on_working_kernels_only():
    from rwkv_engine.core.cpu_precision_accuracy import MODEL_GATED, gate_failures
    assert "q4a8" in MODEL_GATED and "q4a8" in cp.candidates() and "q4" not in cp.candidates()
    four_bit = {"top1": 0.906, "kl": 0.45, "max_logit_err": 0.40}             # what q4a8 measures
    assert gate_failures(four_bit, "q4a8") == []
    assert gate_failures(four_bit, "int8")                                    # 8-bit limits: fails
    assert gate_failures({"top1": 0.02, "kl": 3.0}, "q4a8") == [              # a scrambled product
        "top-1 2.0 % < 80 % on real code", "KL 3.000 > 1.0 on a random 0.1B checkpoint"]
