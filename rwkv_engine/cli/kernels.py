"""`rwkv-nvim kernels`: build (or load) the compiled WKV-7 kernels now, not at the first
keystroke.

The plugin's build (``:RwkvBuild``, lazy.nvim's ``build``, the quick start) runs this
once: the CPU kernel (C++, about 10 s on a small machine) always, the CUDA/HIP kernel
when torch sees a GPU and the matching compiler (nvcc / hipcc) exists. Each line says
where the kernel lives and how long it took; a kernel that cannot be built is reported
with the reason (the engine then uses the slower pure-torch code, same results).
The CPU line also names the q8 product's instruction-set path (``q8: avx2``,
``q8: neon-dotprod``, ...) and where the kernels' threads come from; a build that runs on
one thread (macOS without libomp) says so.
Exit status: 0 when every kernel tried is ready, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings

from ..core.kernel_loader import (backend_for, cpu_isa, cpu_isas, cpu_threads_note, get_cpu_ops, get_wkv7,
                                  kernel_status, kernels_disabled)

COMPILER = {"cuda": "nvcc", "hip": "hipcc"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: the CPU kernel, plus the GPU one when torch sees a GPU (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def _gpu_compiler(backend: str) -> str:
    """The GPU compiler for ``backend`` ("" when absent): on PATH or under CUDA_HOME/ROCM_HOME."""
    name = COMPILER[backend]
    found = shutil.which(name)
    if found:
        return found
    try:
        from torch.utils import cpp_extension
        home = cpp_extension.ROCM_HOME if backend == "hip" else cpp_extension.CUDA_HOME
    except Exception:
        home = None
    candidate = os.path.join(home, "bin", name) if home else ""
    return candidate if candidate and os.access(candidate, os.X_OK) else ""


def _targets(choice: str, say) -> list:
    """[(device, backend)] to build; GPUs without a compiler are reported and skipped."""
    import torch

    out = []
    if choice in ("auto", "cpu"):
        out.append(("cpu", "cpu"))
    if choice in ("auto", "gpu"):
        if not torch.cuda.is_available():
            if choice == "gpu":
                say("gpu: skipped: torch sees no GPU (a CPU-only torch, or no driver)")
            return out
        backend = backend_for("cuda")
        if backend is None:
            say("gpu: skipped: this torch build has neither CUDA nor ROCm")
        elif not _gpu_compiler(backend):
            say(f"{backend}: skipped: {COMPILER[backend]} not found (install the "
                f"{'CUDA toolkit' if backend == 'cuda' else 'ROCm HIP SDK'} for the faster GPU kernel, "
                "then build again; the GPU still works with the torch code)")
        else:
            out.append(("cuda", backend))
    return out


def _cpu_paths(say) -> dict:
    """The CPU kernel's instruction-set path and threads, said in one line."""
    import torch

    isa = cpu_isa()
    isas = cpu_isas() or {}
    note = cpu_threads_note()
    ops = get_cpu_ops()
    threads = int(ops.parallel_threads()) if ops is not None else 1
    wanted = torch.get_num_threads()
    products = ", ".join(f"{name}: {path}" for name, path in isas.items()) or f"q8: {isa}"
    line = f"cpu: {products}; threads: {threads} of {wanted} ({note})"
    if threads < wanted and wanted > 1:
        line += " - the CPU kernels run on fewer threads than torch's"
    say(line)
    return {"q8": isa, **isas, "threads": threads, "torch_threads": wanted, "threads_note": note}


def run(args: argparse.Namespace) -> int:
    lines: list = []

    def say(msg: str) -> None:
        lines.append(msg)
        if not args.json:
            print(f"rwkv-nvim kernels: {msg}", flush=True)

    if kernels_disabled():
        say("disabled by RWKV_NVIM_NO_KERNEL: nothing to build")
        if args.json:
            print(json.dumps({"disabled": True, "kernels": {}}))
        return 0
    started = time.perf_counter()
    import torch
    say(f"torch {torch.__version__} imported in {time.perf_counter() - started:.1f} s")
    result = {}
    ok = True
    for device, backend in _targets(args.device, say):
        t0 = time.perf_counter()
        with warnings.catch_warnings():       # the failure is reported below, once
            warnings.simplefilter("ignore", RuntimeWarning)
            kernel = get_wkv7(device, progress=say)
        seconds = time.perf_counter() - t0
        if kernel is None:
            ok = False
            reason = kernel_status().get(backend, "failed: unknown reason")
            say(f"{backend}: {reason} (the engine uses the slower torch code)")
            result[backend] = {"ready": False, "status": reason, "seconds": round(seconds, 2)}
            continue
        say(f"{backend}: ready in {seconds:.1f} s: {kernel.build_dir}")
        result[backend] = {"ready": True, "built": bool(kernel.build_seconds), "dir": str(kernel.build_dir),
                           "seconds": round(seconds, 2)}
        if backend == "cpu":
            result[backend].update(_cpu_paths(say))
    if args.json:
        print(json.dumps({"disabled": False, "kernels": result, "messages": lines}))
    return 0 if ok else 1
