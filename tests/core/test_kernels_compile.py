"""Every kernel source compiles with its own toolchain, without a GPU.

- kernels/*.cu   : `nvcc -c` (standalone: the .cu files include no torch headers)
- kernels/*.hip  : `HIP_PLATFORM=amd hipcc --offload-arch=gfx90a -c`
- the torch binding: `c++ -fsyntax-only` against the installed torch headers
- the GPU kernels' logic: each .cu/.hip is compiled as host C++ against tiny shim
  headers (a block = 64 std::threads with a std::barrier as __syncthreads) and run
  against rwkv_engine.core.wkv.wkv7_reference - indexing, barriers and the state
  transposition get checked on machines without a GPU.
- the CPU kernel : a fresh JIT build through rwkv_engine.core.kernel_loader in a
  subprocess (own cache dir), checking the progress hook and 0700 directories.
Each test skips when its compiler is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
CU_SOURCES = sorted(KERNELS.glob("*.cu"))
HIP_SOURCES = sorted(KERNELS.glob("*.hip"))


def _find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _run(cmd: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_sources_exist():
    assert CU_SOURCES, "no kernels/*.cu"
    assert HIP_SOURCES, "no kernels/*.hip"
    assert (KERNELS / "wkv7_binding.cpp").is_file() and (KERNELS / "wkv7_cpu.cpp").is_file()


@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    # sm_80 covers the bf16 path natively; -v reports registers and spills.
    proc = _run([nvcc, "-c", str(source), "-o", str(tmp_path / "k.o"), "-O3",
                 "-arch=sm_80", "-Xptxas", "-v"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    assert spills and all(int(n) == 0 for n in spills), \
        f"register spills in the WKV kernel (state row no longer in registers):\n{proc.stderr}"


@pytest.mark.parametrize("source", HIP_SOURCES, ids=lambda p: p.name)
def test_hip_source_compiles(source, tmp_path):
    hipcc = shutil.which("hipcc")
    if hipcc is None:
        pytest.skip("hipcc not found (Debian: apt-get install hipcc libamdhip64-dev)")
    env = dict(os.environ, HIP_PLATFORM="amd")
    proc = _run([hipcc, "--offload-arch=gfx90a", "-O3", "-c", str(source), "-o", str(tmp_path / "k.o")], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert b"gfx90a" in (tmp_path / "k.o").read_bytes(), "no gfx90a device code in the object"


def _torch_include_dirs() -> list[str]:
    import torch
    base = Path(torch.__file__).resolve().parent / "include"
    return [str(base), str(base / "torch" / "csrc" / "api" / "include")]


def test_binding_compiles_against_torch_headers():
    cxx = os.environ.get("CXX") or shutil.which("c++")
    if not cxx or shutil.which(cxx) is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{d}" for d in _torch_include_dirs()]
    proc = _run([cxx, "-std=c++20", "-fsyntax-only", *includes, str(KERNELS / "wkv7_binding.cpp")])
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_cpu_kernel_fresh_jit_build(tmp_path):
    """A from-scratch build: progress messages, private dirs, a working op (subprocess:
    the op namespace can be registered only once per process)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    root = tmp_path / "cache" / "kernels"
    script = textwrap.dedent("""
        import stat, sys, warnings
        warnings.simplefilter("error")
        from rwkv_engine.core import kernel_loader
        assert "torch.utils.cpp_extension" not in sys.modules
        import torch
        messages = []
        kernel = kernel_loader.get_wkv7(torch.device("cpu"), progress=messages.append)
        assert kernel is not None, kernel_loader.kernel_status()
        assert "torch.utils.cpp_extension" in sys.modules
        assert len(messages) == 2 and "building" in messages[0] and "ready" in messages[1], messages
        assert kernel.build_seconds > 0
        d = kernel.build_dir
        for p in (d, d.parent, d.parent.parent):
            assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
        state = torch.zeros(1, 1, 64, 64)
        ones = torch.ones(1, 1, 1, 64)
        y, s = kernel(state, ones, torch.full_like(ones, -1e9), ones, ones, 0 * ones, 0 * ones)
        # decay = 1, S = v k^T = all ones, y = S r = 64
        assert torch.equal(s, torch.ones(1, 1, 64, 64)) and torch.equal(y, torch.full_like(ones, 64.0))
        print("BUILD_SECONDS", round(kernel.build_seconds, 1))
    """)
    env = dict(os.environ, RWKV_NVIM_KERNEL_DIR=str(root))
    env.pop("RWKV_NVIM_NO_KERNEL", None)
    # another ninja first on PATH (a system one of another version: its build log would
    # make the interpreter's ninja rebuild everything, and back): it must not be used
    own_ninja = Path(sys.executable).parent / "ninja"
    decoy = tmp_path / "decoy-bin"
    if own_ninja.is_file():
        decoy.mkdir()
        (decoy / "ninja").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'decoy-ran'}\nexit 1\n")
        (decoy / "ninja").chmod(0o755)
        env["PATH"] = f"{decoy}{os.pathsep}{env.get('PATH', '')}"
    proc = _run([sys.executable, "-c", script], env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "BUILD_SECONDS" in proc.stdout
    assert not (tmp_path / "decoy-ran").exists(), "the build ran the ninja first on PATH, not the interpreter's"


def test_importing_the_loader_is_light():
    script = ("import sys; import rwkv_engine.core.kernel_loader; "
              "heavy = [m for m in ('torch', 'torch.utils.cpp_extension') if m in sys.modules]; "
              "assert not heavy, heavy")
    proc = _run([sys.executable, "-c", script])
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------- GPU kernels emulated on the host

_SHIM_RUNTIME = """
#pragma once
#include <barrier>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct dim3 { int x = 0, y = 0, z = 0; };
inline thread_local dim3 threadIdx, blockIdx;
inline std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
struct float4 { float x, y, z, w; };
typedef int cudaError_t; typedef void* cudaStream_t;
typedef int hipError_t; typedef void* hipStream_t;
inline int cudaGetLastError() { return 0; }
inline int hipGetLastError() { return 0; }
inline const char* cudaGetErrorString(int) { return "emulated"; }
inline const char* hipGetErrorString(int) { return "emulated"; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
struct __half { _Float16 v; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(uint32_t(h.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = __float_as_uint(f); u += 0x7fffu + ((u >> 16) & 1u); return __nv_bfloat16{uint16_t(u >> 16)};
}
template <typename K, typename... A>
void emulate_launch(int grid, int block, K kernel, A... args) {  // blocks in turn, threads at once
  for (int b = 0; b < grid; ++b) {
    std::barrier<> bar(block);
    g_barrier = &bar;
    std::vector<std::thread> threads;
    for (int t = 0; t < block; ++t)
      threads.emplace_back([=] { blockIdx.x = b; threadIdx.x = t; kernel(args...); });
    for (auto& th : threads) th.join();
  }
}
"""
_SHIM_HEADERS = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h",
                 "hip/hip_runtime.h", "hip/hip_fp16.h")
_LAUNCH = re.compile(r"(\w+<scalar_t>)<<<(.+?),\s*(\w+),\s*0,\s*stream>>>\(")


def _build_emulation(source: Path, tmp_path: Path) -> Path:
    inc = tmp_path / "shim"
    for name in _SHIM_HEADERS:
        (inc / name).parent.mkdir(parents=True, exist_ok=True)
        (inc / name).write_text(_SHIM_RUNTIME if name == "cuda_runtime.h" else '#include "cuda_runtime.h"\n')
    (inc / "hip" / "cuda_runtime.h").write_text(_SHIM_RUNTIME)
    text, n = _LAUNCH.subn(r"emulate_launch(\2, \3, \1, ", source.read_text())
    assert n == 1, f"{source.name}: expected one `kernel<scalar_t><<<grid, block, 0, stream>>>(` launch"
    emu_src = tmp_path / (source.stem + "_emu.cpp")
    emu_src.write_text(text)
    lib = tmp_path / (source.stem + "_emu.so")
    proc = _run([os.environ.get("CXX", "c++"), "-std=c++20", "-O1", "-fPIC", "-shared", f"-I{inc}",
                 str(emu_src), "-o", str(lib), "-pthread"])
    if proc.returncode != 0 and "_Float16" in proc.stderr:
        pytest.skip("host compiler lacks _Float16")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return lib


@pytest.mark.parametrize("source", CU_SOURCES + HIP_SOURCES, ids=lambda p: p.name)
def test_gpu_kernel_logic_in_host_emulation(source, tmp_path):
    import ctypes

    import torch

    from rwkv_engine.core.wkv import wkv7_reference
    from test_kernel_cpu import make_inputs

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip("no C++ compiler")
    lib = ctypes.CDLL(str(_build_emulation(source, tmp_path)))
    lib.rwkv_wkv7_forward.restype = ctypes.c_int
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    y_tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to max|y|

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    for dtype in codes:
        for B, T, H in [(1, 1, 2), (2, 9, 3)]:
            state, *seq = make_inputs(B, T, H, seed=B + T, dtype=dtype)
            y_ref, s_ref = wkv7_reference(state, *(x.float() for x in seq))
            s, y = state.clone(), torch.empty_like(seq[0])
            rc = lib.rwkv_wkv7_forward(codes[dtype], B, T, H, ptr(s), *(ptr(x) for x in seq), ptr(y), None)
            assert rc == 0
            assert (s - s_ref).abs().max().item() < 1e-5, (dtype, B, T, H)
            assert (y.float() - y_ref).abs().max().item() < y_tol[dtype] * max(1.0, y_ref.abs().max().item()), \
                (dtype, B, T, H)
    assert lib.rwkv_wkv7_forward(7, 1, 1, 1, None, *([None] * 7), None) == -1  # bad dtype code
