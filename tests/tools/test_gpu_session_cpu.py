"""bench/gpu_session.py, the one device call of issue 25, on the CPU: ``--device cpu --tiny``
runs the GPU check, the graph check/bench and the v2 training in order, each within its
limit, and leaves at most 8 files (the device tool's limit) that say what happened; the
model parts reassemble into a checkpoint the engine loads. gpu_check's own sections are
covered by test_gpu_check_cpu.py: here it runs without pytest, peer and replay."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tools"))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session-out")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_session.py"), "--device", "cpu", "--tiny",
                           "--out", str(out), "--check-args", "--no-pytest --no-peer --no-replay --no-7b"],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "session.json").read_text())


def test_every_section_ran_in_order_within_its_limit(session):
    out, data = session
    assert list(data["sections"]) == ["check", "graphs", "train"]
    for name, sec in data["sections"].items():
        assert sec["status"] == "ok" and sec["returncode"] == 0, (name, sec)
        assert 0 < sec["seconds"] <= sec["limit_s"] + 5, (name, sec)
    log = (out / "session.log").read_text()
    assert log.index("== check") < log.index("== graphs") < log.index("== train")
    assert "  train | " in log and "  check | " in log


def test_what_comes_back_fits_the_device_limits(session):
    out, data = session
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == data["out_files"] and len(files) <= 8, files
    assert {"session.log", "session.json", "gpu_check.tgz", "graphs.json", "train.json"} <= set(files)
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())


def test_each_sections_results(session, tmp_path):
    out, data = session
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = tar.getnames()
        report = json.load(tar.extractfile("gpu_check.json"))
    assert "gpu_check.log" in names and report["tiny"] and report["device"] == "cpu"
    assert report["sections"]["bench_1.5b"]["status"] == "ok"
    assert data["sections"]["check"]["section_status"]["pytest_gpu"] == "skipped"
    graphs = json.loads((out / "graphs.json").read_text())
    assert graphs["passed"] is True and graphs["steps"]["bench"]["status"] == "ok"
    assert graphs["steps"]["check"]["rows"]["3"]["info"]["captured"] == [4]      # padded to bucket 4
    train = json.loads((out / "train.json").read_text())
    assert train["status"] == "done" and data["sections"]["train"]["train_status"] == "done"
    import train_gpu
    from rwkv_engine import load_model
    path = train_gpu.reassemble(out, tmp_path / "v2.pth")
    model = load_model(str(path), device="cpu")
    assert model.shape.n_layer == train["model"]["n_layer"]


def test_a_section_over_its_limit_is_killed_and_recorded(tmp_path):
    import gpu_session
    args = SimpleNamespace(out=str(tmp_path), device="cpu", tiny=True, total=60.0)
    s = gpu_session.Session(args)
    rec = s.run("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                2.0, min_s=0)
    assert rec["status"] == "timed out" and rec["returncode"] == 124 and rec["seconds"] < 10
    assert "slow | started" in (tmp_path / "session.log").read_text()
    assert json.loads((tmp_path / "session.json").read_text())["sections"]["slow"]["status"] == "timed out"
    rec = s.run("late", [sys.executable, "-c", "pass"], 5.0)       # under min_s (10 s): skipped
    assert rec["status"] == "skipped"
