"""The first sections, on the machine itself: ``environment`` (versions, GPU, packages;
starts the `rwkv` package's kernel build in the background), ``kernel_build`` (our WKV-7
CUDA kernel, built fresh, plus a smoke test) and ``bandwidth`` (device copy bytes/s, the
limit the decode figures are measured against)."""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import statistics
import time

from .peer import PeerKernelBuild
from .plumbing import REPO, Skip, command_line, timed

# import name -> distribution name of the packages the report lists
PACKAGES = (("rwkv", "rwkv"), ("fla", "flash-linear-attention"), ("pynvim", "pynvim"),
            ("ninja", "ninja"), ("numpy", "numpy"), ("msgpack", "msgpack"))


def environment(check) -> dict:
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_hip": getattr(torch.version, "hip", None), "cuda_available": check.cuda_available,
            "engine_import": check.engine_import, "packages": {}}
    if check.cuda:
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                       "sms": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"}
        info["driver"] = command_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["nvcc"] = command_line(["nvcc", "--version"], last=True) if shutil.which("nvcc") else None
    from importlib import metadata
    for name, dist in PACKAGES:
        if importlib.util.find_spec(name) is None:
            info["packages"][name] = None
            continue
        try:
            info["packages"][name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info["packages"][name] = "present"
    info["git_commit"] = command_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    check.peer_build = PeerKernelBuild.start(check)
    return info


def kernel_build(check) -> dict:
    check.require_cuda()
    check.need("kernel_build")
    import torch

    from rwkv_engine.core import kernel_loader
    from rwkv_engine.core.wkv import wkv7_reference
    if kernel_loader.kernels_disabled():
        raise Skip("RWKV_NVIM_NO_KERNEL is set")
    t0 = time.perf_counter()
    kernel = kernel_loader.get_wkv7(check.device)
    wall = time.perf_counter() - t0
    if kernel is None:
        raise RuntimeError(f"the CUDA kernel did not build: {kernel_loader.kernel_status()}")
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 2, 16, 4, 64
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    seq = [torch.randn(B, T, H, N, generator=g) * 0.5, -0.6 - 2.5 * torch.rand(B, T, H, N, generator=g),
           torch.randn(B, T, H, N, generator=g) * 0.5, torch.randn(B, T, H, N, generator=g) * 0.5,
           -kk, kk * torch.rand(B, T, H, N, generator=g)]
    s0 = torch.randn(B, H, N, N, generator=g) * 0.5
    y_ref, s_ref = wkv7_reference(s0, *seq)
    y, s = kernel(s0.to(check.device), *(x.to(check.device) for x in seq))
    return {"build_seconds": round(kernel.build_seconds, 2), "wall_seconds": round(wall, 2),
            "build_dir": str(kernel.build_dir), "archs": kernel_loader.gpu_archs("cuda"),
            "smoke_max_abs_err_y": float((y.cpu() - y_ref).abs().max()),
            "smoke_max_abs_err_state": float((s.cpu() - s_ref).abs().max())}


def bandwidth(check) -> dict:
    check.require_device()
    check.need("bandwidth")
    import torch
    n = (16 << 20) if check.args.tiny else (2 << 30)
    bufs = [torch.ones(n, dtype=torch.uint8, device=check.device)]
    bufs.append(torch.empty_like(bufs[0]))
    times = []
    for i in range(13):
        t = timed(lambda: bufs[1].copy_(bufs[0]), check.device)
        if i >= 3:
            times.append(t)
    bufs.clear()
    best = min(times)
    bw = 2 * n / best
    check.ctx["bw"] = bw
    return {"bytes_per_copy": n, "copy_ms_best": round(best * 1e3, 4),
            "copy_ms_median": round(statistics.median(times) * 1e3, 4),
            "copy_GBps": round(bw / 1e9, 1), "counted": "bytes read + bytes written, best of 10"}
