"""bench/gpu_check.py's plumbing on the CPU: `--device cpu --tiny` writes a report with
every section, a status for each, and sane figures (the GPU run itself needs an H200)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
SECTIONS = ("environment", "kernel_build", "bandwidth", "pytest_gpu", "accuracy",
            "bench_0.1b", "bench_1.5b", "bench_7.2b", "replay_1.5b", "peer_rwkv", "peer_fla")
CUDA_ONLY = ("kernel_build", "accuracy")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    work = tmp_path_factory.mktemp("gpu-check-work")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out),
                           "--work", str(work), "--budget", "240"],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    data["_log"] = (out / "gpu_check.log").read_text()
    data["_work"] = work
    return data


def test_every_section_has_a_status(report):
    assert report["schema"] == 1 and report["tiny"] is True and report["device"] == "cpu"
    assert set(report["sections"]) == set(SECTIONS)
    for name, sec in report["sections"].items():
        assert sec["status"] in ("ok", "failed", "skipped"), (name, sec)
        assert isinstance(sec["seconds"], (int, float)) and 0 <= sec["seconds"] < 120, (name, sec)
        assert (sec["error"] is None) == (sec["status"] == "ok"), (name, sec)
        assert f"== {name}" in report["_log"]
    counts = report["summary"]["sections"]
    assert sum(counts.values()) == len(SECTIONS)


def test_cuda_only_sections_say_no_cuda(report):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name in CUDA_ONLY:
        assert report["sections"][name]["status"] == "skipped"
        assert report["sections"][name]["error"] == "skipped: no CUDA"
    assert report["sections"]["peer_fla"]["status"] == "skipped"


def test_figures_are_sane(report):
    S = report["sections"]
    assert S["environment"]["status"] == "ok" and S["environment"]["torch"] == torch.__version__
    assert S["bandwidth"]["status"] == "ok" and S["bandwidth"]["copy_GBps"] > 0
    pt = S["pytest_gpu"]
    assert pt["status"] == "ok", pt
    assert "tests/gpu/test_gpu_model.py" in pt["files"] and "tests/gpu/test_gpu_kernels.py" in pt["files"]
    assert pt["tests"] > 0 and pt["failed"] == 0 and pt["errors"] == 0
    if not torch.cuda.is_available():
        assert pt["skipped"] == pt["tests"]
    for name in ("0.1b", "1.5b", "7.2b"):
        b = S[f"bench_{name}"]
        assert b["status"] == "ok", b
        for k in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "decode_b1_ms_per_step",
                  "decode_b8_ms_per_step", "b8_over_b1_step", "b1_fraction_of_bw_limit",
                  "bw_limit_ms_per_step", "weight_bytes_per_step", "params_m"):
            assert isinstance(b[k], (int, float)) and b[k] > 0, (name, k, b)
        assert b["vocab"] == 65536 and b["n_embd"] % 64 == 0
    assert S["bench_0.1b"]["weight_bytes_per_step"] < S["bench_7.2b"]["weight_bytes_per_step"]
    rp = S["replay_1.5b"]
    assert rp["status"] == "ok", rp
    assert rp["first_text_ms_p50"] > 0 and rp["all_candidates_ms_p50"] >= rp["first_text_ms_p50"] * 0.5
    # token healing holds back the token under the cursor, so a typed character often re-feeds
    # nothing (p50 may be 0); over a whole replay some keystrokes do feed tokens
    assert rp["refed_tokens_p50"] >= 0 and rp["refed_tokens_max"] >= 1 and rp["replay"]["requests"] > 5
    peer = S["peer_rwkv"]
    if importlib.util.find_spec("rwkv") is None:
        assert peer["status"] == "skipped"
    else:
        assert peer["status"] == "ok", peer
        for name in ("0.1b", "1.5b"):
            fig = peer["shapes"][name]
            assert fig["decode_b1_tok_s"] > 0 and fig["speedup"]["decode_b8_tok_s"] > 0, fig


def test_summary_lists_the_targets(report):
    targets = report["summary"]["targets"]
    assert len(targets) == 10
    for t in targets:
        assert t["op"] in (">=", "<=", "<") and t["ok"] in (True, False, None), t
        assert (t["value"] is None) == (t["ok"] is None), t
    names = " ".join(t["target"] for t in targets)
    for word in ("fp16", "bf16", "bandwidth", "rwkv package", "first ghost text", "first line"):
        assert word in names
