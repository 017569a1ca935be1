"""The compiled CPU WKV-7 kernel against rwkv_engine.core.wkv.wkv7_reference, and the
loader's contract (disable switch, memoized failure with one warning, 0700 dirs)."""
from __future__ import annotations

import shutil
import stat
import warnings

import pytest
import torch

from rwkv_engine.core import kernel_loader
from rwkv_engine.core.errors import one_line
from rwkv_engine.core.wkv import wkv7_reference

N = 64


def make_inputs(B: int, T: int, H: int, seed: int = 0, dtype=torch.float32):
    """Inputs shaped and scaled like the model's: a = -kk, b = kk * gate, |kk| = 1."""
    g = torch.Generator().manual_seed(seed)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g)
    state = torch.randn(B, H, N, N, generator=g) * 0.5                   # [B, H, 64, 64] fp32
    r = torch.randn(B, T, H, N, generator=g) * 0.5                       # [B, T, H, 64]
    w = -0.6 - 2.5 * torch.rand(B, T, H, N, generator=g)                 # decay in (0.92, 0.55)
    k = torch.randn(B, T, H, N, generator=g) * 0.5
    v = torch.randn(B, T, H, N, generator=g) * 0.5
    per_token = [x.to(dtype) for x in (r, w, k, v, -kk, kk * gate)]
    return (state, *per_token)


@pytest.fixture(scope="module")
def cpu_kernel():
    if kernel_loader.kernels_disabled():
        pytest.skip("RWKV_NVIM_NO_KERNEL is set")
    kernel = kernel_loader.get_wkv7(torch.device("cpu"))
    if kernel is None:
        reason = kernel_loader.kernel_status().get("cpu", "?")
        if shutil.which("c++") is None:
            pytest.skip(f"no C++ compiler to build the CPU kernel ({reason})")
        pytest.fail(f"the CPU kernel did not build although a compiler exists: {reason}")
    return kernel


@pytest.mark.parametrize("B,T,H", [(1, 1, 2), (8, 1, 3), (1, 3, 2), (1, 4, 2), (2, 33, 3), (3, 128, 1)])
def test_kernel_matches_reference(cpu_kernel, B, T, H):
    args = make_inputs(B, T, H, seed=B * 1000 + T)
    state_before = args[0].clone()
    y_ref, s_ref = wkv7_reference(*args)
    y, s = cpu_kernel(*args)
    assert y.shape == (B, T, H, N) and y.dtype == torch.float32
    assert s.shape == (B, H, N, N) and s.dtype == torch.float32
    assert (y - y_ref).abs().max().item() < 1e-4
    assert (s - s_ref).abs().max().item() < 1e-4
    assert torch.equal(args[0], state_before), "the out-of-place call mutated its input state"


def test_state_carried_across_calls(cpu_kernel):
    """Prefill in uneven chunks, then single-token decodes == one reference pass."""
    B, T, H = 2, 40, 2
    state, *seq = make_inputs(B, T, H, seed=7)
    y_ref, s_ref = wkv7_reference(state, *seq)
    s, ys, t0 = state, [], 0
    for length in (5, 17, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1):
        y, s = cpu_kernel(s, *(x[:, t0:t0 + length] for x in seq))
        ys.append(y)
        t0 += length
    assert t0 == T
    assert (torch.cat(ys, dim=1) - y_ref).abs().max().item() < 1e-4
    assert (s - s_ref).abs().max().item() < 1e-4


def test_inplace_updates_the_state(cpu_kernel):
    state, *seq = make_inputs(4, 1, 3, seed=3)
    y_ref, s_ref = wkv7_reference(state, *seq)
    y_out = cpu_kernel.inplace(state, *seq)
    assert (y_out - y_ref).abs().max().item() < 1e-4
    assert (state - s_ref).abs().max().item() < 1e-4


def test_non_fp32_inputs_are_computed_in_fp32(cpu_kernel):
    args = make_inputs(1, 6, 2, seed=5, dtype=torch.bfloat16)
    y_ref, s_ref = wkv7_reference(*args)
    y, s = cpu_kernel(*args)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert (y.float() - y_ref.float()).abs().max().item() < 2e-2
    assert (s - s_ref).abs().max().item() < 1e-4


def test_non_contiguous_inputs(cpu_kernel):
    state, *seq = make_inputs(2, 8, 2, seed=11)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in seq]  # same values, [B,T,H,N] views
    assert not strided[0].is_contiguous()
    y_ref, s_ref = wkv7_reference(state, *seq)
    y, s = cpu_kernel(state, *strided)
    assert (y - y_ref).abs().max().item() < 1e-4
    assert (s - s_ref).abs().max().item() < 1e-4


def test_bad_shapes_raise_one_line_errors(cpu_kernel):
    state, r, w, k, v, a, b = make_inputs(1, 2, 2)
    with pytest.raises(RuntimeError, match="wkv7: state must be"):
        cpu_kernel(state[:, :1], r, w, k, v, a, b)
    with pytest.raises(RuntimeError, match="wkv7: k must have r's shape"):
        cpu_kernel(state, r, w, k[:, :1], v, a, b)
    with pytest.raises(ValueError, match=r"wkv7: r must be \[B, T, H, 64\]"):
        cpu_kernel(state, r[..., :32], w, k, v, a, b)


def test_wkv7_dispatch_uses_the_kernel(cpu_kernel):
    from rwkv_engine.core import wkv
    args = make_inputs(1, 5, 2, seed=2)
    y_ref, s_ref = wkv7_reference(*args)
    y, s = wkv.wkv7(*args)
    assert (y - y_ref).abs().max().item() < 1e-4 and (s - s_ref).abs().max().item() < 1e-4


# ------------------------------------------------------------------ loader contract

def test_disable_switch(monkeypatch):
    monkeypatch.setenv("RWKV_NVIM_NO_KERNEL", "1")
    assert kernel_loader.get_wkv7(torch.device("cpu")) is None


def test_unsupported_device_type_gives_none():
    assert kernel_loader.backend_for(torch.device("meta")) is None
    assert kernel_loader.get_wkv7(torch.device("meta")) is None


def test_failed_build_warns_once_and_is_memoized(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_loader, "_memo", {})
    monkeypatch.setattr(kernel_loader, "_errors", {})
    monkeypatch.delenv("RWKV_NVIM_NO_KERNEL", raising=False)
    monkeypatch.setenv("RWKV_NVIM_KERNEL_DIR", str(tmp_path / "cache" / "kernels"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernel_loader.get_wkv7(torch.device("cpu"), progress=messages.append) is None
        assert kernel_loader.get_wkv7(torch.device("cpu"), progress=messages.append) is None
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert "no C++ compiler found" in str(runtime[0].message)
    assert kernel_loader.kernel_status()["cpu"].startswith("failed: no C++ compiler")
    assert messages == []  # nothing was built, so nothing announced
    # the cache directories were still created private
    build_dir = kernel_loader.cache_dir("cpu")
    for d in (build_dir, build_dir.parent, build_dir.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_first_error_line_picks_the_compiler_error():
    exc = RuntimeError(
        "Error building extension 'rwkv_nvim_wkv7_cpu': [1/2] c++ -MMD -c wkv7_cpu.cpp\n"
        "FAILED: wkv7_cpu.o\n"
        "c++ -MMD -MF wkv7_cpu.o.d -c /x/wkv7_cpu.cpp -o wkv7_cpu.o\n"
        "/x/wkv7_cpu.cpp:12:3: error: 'foo' was not declared in this scope\n"
        "   12 |   foo();\n"
        "ninja: build stopped: subcommand failed.\n")
    assert one_line(exc) == "/x/wkv7_cpu.cpp:12:3: error: 'foo' was not declared in this scope"
    assert one_line(OSError("CUDA_HOME environment variable is not set")) == \
        "CUDA_HOME environment variable is not set"


def test_cache_dir_layout(monkeypatch, tmp_path):
    monkeypatch.delenv("RWKV_NVIM_KERNEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = kernel_loader.cache_dir("cuda")
    assert d.parent == tmp_path / "rwkv.nvim" / "kernels"
    assert d.name.startswith(f"{torch.__version__}-cuda")
    monkeypatch.setenv("RWKV_NVIM_KERNEL_DIR", str(tmp_path / "k"))
    assert kernel_loader.cache_dir("hip").parent == tmp_path / "k"
    assert kernel_loader.cache_dir("cpu").name.startswith(f"{torch.__version__}-cpu-")
