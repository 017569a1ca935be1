"""``device = "mps"``: Apple's GPU through torch's MPS backend (issue 24 item 4).

Nothing here runs on a Mac: MPS availability is faked where a test needs it. What is
checked is the plumbing: the option, the fallback to the CPU with one warning, fp16 and
the pure-torch WKV path on an MPS model, no CUDA graphs there, memory given back on
out of memory, and the :checkhealth probe's platform fact.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_engine.core import model as model_mod
from rwkv_engine.core.kernel_loader import backend_for
from rwkv_engine.pipeline import loading
from rwkv_engine.pipeline.config import EngineConfig

REPO = Path(__file__).resolve().parents[2]


def test_the_option_accepts_mps_and_auto_never_picks_it(monkeypatch):
    assert EngineConfig(device="mps").device == "mps"
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="metal")
    monkeypatch.setattr(loading, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.pick_device(EngineConfig(device="auto")) == "cpu"
    assert loading.pick_device(EngineConfig(device="mps")) == "mps"


def test_without_mps_the_model_runs_on_the_cpu_after_one_warning(tiny_model_path, monkeypatch):
    monkeypatch.setattr(loading, "mps_available", lambda: False)
    warnings = []
    model = loading.load_configured_model(
        EngineConfig(model=str(tiny_model_path), device="mps", dtype="fp32"), warn=warnings.append)
    assert model.device.type == "cpu"
    assert len(warnings) == 1 and "MPS was requested" in warnings[0] and "running on the CPU" in warnings[0]


def test_with_mps_the_model_is_loaded_there_in_fp16_without_cuda_graphs(tiny_model_path, monkeypatch):
    """MPS faked available: the loader asks for an "mps" model in the GPU default dtype
    (fp16), never consults the CPU precision measurement, and does not try CUDA graphs."""
    monkeypatch.setattr(loading, "mps_available", lambda: True)
    asked = []
    real_load = model_mod.load_model

    def fake_load(path, device="cpu", dtype=None, use_kernel=True):
        asked.append((str(device), dtype))
        return real_load(path, device="cpu", dtype="fp32")        # a stand-in that runs here

    monkeypatch.setattr(model_mod, "load_model", fake_load)
    monkeypatch.setattr(loading, "cpu_precision_for",
                        lambda *a, **k: pytest.fail("the CPU precision is not measured for MPS"))
    model = loading.load_configured_model(EngineConfig(model=str(tiny_model_path), device="mps",
                                                       cuda_graphs=True))
    assert asked == [("mps", None)]
    assert model.graphs is None
    assert model_mod._parse_dtype(None, torch.device("mps")) == torch.float16
    assert model_mod._parse_dtype("bf16", torch.device("mps")) == torch.bfloat16


def test_an_mps_model_uses_the_pure_torch_wkv_path_and_no_int8():
    assert backend_for("mps") is None                  # no compiled kernel: wkv7_reference
    assert backend_for("cpu") == "cpu"
    for cpu_only in ("int8", "q4", "q4a8"):
        with pytest.raises(ValueError, match=r"\(int8, q4, q4a8 are CPU only\)"):
            model_mod._parse_dtype(cpu_only, torch.device("mps"))


def test_load_model_says_when_mps_is_missing(tiny_model_path, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device 'mps' requested but torch has no usable MPS backend"):
        model_mod.load_model(tiny_model_path, device="mps")


def test_out_of_memory_gives_mps_memory_back(monkeypatch):
    emptied = []
    monkeypatch.setattr(loading, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append("mps"))
    loading.free_gpu_memory()
    assert emptied == ["mps"]


def test_the_health_probe_says_whether_this_is_an_apple_silicon_mac():
    out = subprocess.run([sys.executable, "-m", "rwkv_engine.cli.health", "host"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    info = json.loads(out.stdout)
    assert info["apple_silicon"] is (sys.platform == "darwin" and __import__("platform").machine() == "arm64")
