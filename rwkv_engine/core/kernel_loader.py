"""JIT build and load of the compiled WKV-7 kernels (CUDA, ROCm/HIP, CPU).

``get_wkv7(device)`` returns a :class:`WKV7Kernel` for the device, or ``None`` when
no kernel can be had; the caller (``rwkv_engine.core.wkv.wkv7``) then uses the pure-torch
reference. The first request per backend and process builds the extension with
``torch.utils.cpp_extension.load`` (ninja) into a per-user cache directory and
loads it; later requests, from any thread, get the memoized result - including a
failure, which is reported by exactly one ``RuntimeWarning`` naming the cause
(first line of the compiler error).

Sources (repository ``kernels/``):
    cuda: wkv7_cuda.cu + wkv7_binding.cpp   -> torch.ops.rwkv_nvim_wkv7_gpu.wkv7_
    hip:  wkv7_hip.hip + wkv7_binding.cpp   -> torch.ops.rwkv_nvim_wkv7_gpu.wkv7_
    cpu:  wkv7_cpu.cpp                      -> torch.ops.rwkv_nvim_wkv7_cpu.wkv7_
          rwkv7_cpu_linear.cpp              -> torch.ops.rwkv_nvim_cpu.q8_linear, f32_linear, ...
          rwkv7_cpu_step.cpp                -> torch.ops.rwkv_nvim_cpu.decode_step
          (headers wkv7_cpu_head.h, rwkv7_cpu_linear.h, rwkv7_cpu_math.h, rwkv7_cpu_q8.h:
          the arithmetic, without torch; kernels/tests/cpu_kernels_check.cpp tests it)

Cache directory: ``$RWKV_NVIM_KERNEL_DIR/<torch version>-<backend>`` or, by default,
``$XDG_CACHE_HOME/rwkv.nvim/kernels/<torch version>-<backend>`` (``~/.cache`` when
XDG_CACHE_HOME is unset); directories created here are mode 0700. GPU builds target
only the visible GPUs' architectures, named in the directory (``...-cuda-8.0``);
the CPU build is tuned for the build machine (-march=native on x86-64), so its directory
name carries the machine type and a short hash of the CPU model. Compiler flags per
platform (x86-64 / aarch64, Linux / macOS and its libomp): ``cpu_build_flags``.

Environment:
    RWKV_NVIM_NO_KERNEL=1        never use a compiled kernel (always the reference)
    RWKV_NVIM_KERNEL_DIR=PATH    root of the kernel cache
    RWKV_NVIM_KERNEL_VERBOSE=1   show the compiler command lines and output
    RWKV_NVIM_Q8_ISA=NAME        run a narrower q8 path than the best ("neon", "scalar")

Importing this module imports neither torch.utils.cpp_extension nor a compiler;
torch itself is imported on the first ``get_wkv7`` call.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .cache_paths import cache_root
from .errors import one_line
from .private_fs import make_private_dir, make_tree_private

log = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]

HEAD_SIZE = 64
BACKENDS = ("cuda", "hip", "cpu")
STALE_LOCK_SECONDS = 600  # a build never takes this long; an older lock is a killed build


@dataclass(frozen=True)
class KernelSpec:
    """What to compile for one backend and the op it registers."""

    backend: str             # "cuda" | "hip" | "cpu"
    sources: tuple[str, ...]  # file names under kernels/
    namespace: str           # torch.ops namespace registered by the sources
    extra_cflags: tuple[str, ...]
    extra_cuda_cflags: tuple[str, ...]
    with_cuda: bool
    headers: tuple[str, ...] = ()  # included by the sources: copied and hashed with them
    extra_ldflags: tuple[str, ...] = ()


@dataclass(frozen=True)
class CpuBuildFlags:
    """How the CPU kernels are compiled and linked on this platform, and what that means
    for their threads (``rwkv-nvim kernels`` prints ``note``)."""

    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    threads: bool  # False: the kernels' at::parallel_for loops run on one thread
    note: str      # one line: where the threads come from, or why there is only one


# Where Homebrew keeps libomp (Apple silicon, Intel); tests replace these.
MACOS_LIBOMP_PREFIXES = ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp")


def _torch_dir() -> Path:
    """The installed torch package (its include/ and lib/)."""
    import torch

    return Path(torch.__file__).resolve().parent


def _torch_parallel_backend(torch_dir: Path) -> str:
    """"openmp" or "native": what at::parallel_for is built on in this torch (ATen/Config.h)."""
    try:
        text = (torch_dir / "include" / "ATen" / "Config.h").read_text(errors="replace")
    except OSError:
        return "openmp"
    return "native" if re.search(r"#define\s+AT_PARALLEL_NATIVE\s+1", text) else "openmp"


def _macos_openmp(torch_dir: Path) -> tuple[Optional[Path], Optional[Path]]:
    """(directory with omp.h, directory with libomp.dylib) for Apple clang, either None.
    The library is torch's own copy (torch/lib/libomp.dylib, in the macOS wheels) when it
    has one: a second libomp in the process aborts ("OMP: Error #15"). The header comes
    from torch/include (bundled since torch 2.3), else $OMP_PREFIX, conda's llvm-openmp
    or Homebrew's libomp."""
    prefixes = [torch_dir]
    for var in ("OMP_PREFIX", "CONDA_PREFIX"):
        if os.environ.get(var):
            prefixes.append(Path(os.environ[var]))
    prefixes.extend(Path(p) for p in MACOS_LIBOMP_PREFIXES)
    include = next((p / "include" for p in prefixes if (p / "include" / "omp.h").is_file()), None)
    lib = next((p / "lib" for p in prefixes if (p / "lib" / "libomp.dylib").is_file()), None)
    return include, lib


def cpu_build_flags(system: Optional[str] = None, machine: Optional[str] = None) -> CpuBuildFlags:
    """The CPU kernels' compiler and linker flags for ``system`` / ``machine`` (default:
    this one's ``platform.system()`` / ``platform.machine()``).

    x86-64: ``-march=native`` (the q8 product's AVX512/AVX2 path is picked when compiling).
    aarch64 / arm64: no -march: NEON is in every core, and the dotprod (SDOT) path is
    compiled with a target attribute and picked at run time, so one build serves both.
    Threads: ``at::parallel_for`` is a header template built on ``#pragma omp parallel``;
    without OpenMP the kernels' loops run on one thread, which is said, never silent.
    Linux: ``-fopenmp``; the library links ``libgomp.so.1``, which resolves to the copy
    torch has already loaded, so the kernels share torch's threads. macOS: Apple clang
    has no ``-fopenmp``: ``-Xpreprocessor -fopenmp`` with omp.h and torch's own
    libomp.dylib (see ``_macos_openmp``); none found: one thread.
    """
    system = system if system is not None else platform.system()
    machine = (machine if machine is not None else platform.machine()).lower()
    cflags: tuple[str, ...] = ("-O3", "-fopenmp-simd")
    if machine in ("x86_64", "amd64"):
        cflags += ("-march=native",)
    if system == "Linux":
        return CpuBuildFlags(cflags + ("-fopenmp",), ("-fopenmp",), True, "OpenMP (-fopenmp, torch's libgomp)")
    if system == "Darwin":
        torch_dir = _torch_dir()
        if _torch_parallel_backend(torch_dir) == "native":
            return CpuBuildFlags(cflags, (), True, "torch's native thread pool (this torch is built without OpenMP)")
        include, lib = _macos_openmp(torch_dir)
        if include is not None and lib is not None:
            return CpuBuildFlags(cflags + ("-Xpreprocessor", "-fopenmp", f"-I{include}"),
                                 (f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"), True,
                                 f"OpenMP (-Xpreprocessor -fopenmp, {lib / 'libomp.dylib'})")
        missing = " and ".join(name for name, found in (("omp.h", include), ("libomp.dylib", lib)) if found is None)
        return CpuBuildFlags(cflags, (), False,
                             f"ONE thread: no {missing} found (looked in torch/, $OMP_PREFIX, $CONDA_PREFIX, "
                             f"{', '.join(MACOS_LIBOMP_PREFIXES)}); `brew install libomp` and rebuild "
                             "(rwkv-nvim kernels) for all cores")
    return CpuBuildFlags(cflags, (), False, f"ONE thread: no OpenMP flags known for {system or 'this system'}")


def kernel_spec(backend: str) -> KernelSpec:
    """The build recipe of a backend ("cuda", "hip" or "cpu")."""
    if backend == "cuda":
        return KernelSpec("cuda", ("wkv7_cuda.cu", "wkv7_binding.cpp"), "rwkv_nvim_wkv7_gpu",
                          ("-O3",), ("-O3",), True)
    if backend == "hip":
        return KernelSpec("hip", ("wkv7_hip.hip", "wkv7_binding.cpp"), "rwkv_nvim_wkv7_gpu",
                          ("-O3",), ("-O3",), True)
    if backend == "cpu":
        flags = cpu_build_flags()
        return KernelSpec("cpu", ("wkv7_cpu.cpp", "rwkv7_cpu_linear.cpp", "rwkv7_cpu_step.cpp"),
                          "rwkv_nvim_wkv7_cpu", flags.cflags, (), False,
                          ("wkv7_cpu_head.h", "rwkv7_cpu_linear.h", "rwkv7_cpu_math.h", "rwkv7_cpu_q8.h",
                           "rwkv7_cpu_q4.h", "rwkv7_cpu_q4a8.h"),
                          flags.ldflags)
    raise ValueError(f"unknown WKV-7 kernel backend {backend!r} (expected one of {BACKENDS})")


class WKV7Kernel:
    """A loaded WKV-7 op: ``kernel(state, r, w, k, v, a, b) -> (y, new_state)``.

    state [B, H, 64, 64] fp32 (S[value i, key j]); r, w, k, v, a, b [B, T, H, 64]
    (fp16/bf16/fp32 on GPU; the CPU op computes in fp32 and casts y back);
    w is the log-log decay. ``__call__`` never mutates its inputs; ``inplace``
    updates ``state`` in place and returns y.
    """

    def __init__(self, backend: str, op, build_seconds: float, build_dir: Path) -> None:
        self.backend = backend
        self.build_seconds = build_seconds  # 0.0 when loaded from the cache
        self.build_dir = build_dir
        self._op = op

    def __repr__(self) -> str:
        return f"WKV7Kernel(backend={self.backend!r}, build_dir={str(self.build_dir)!r})"

    def __call__(self, state, r, w, k, v, a, b):
        import torch

        new_state = state.to(dtype=torch.float32, memory_format=torch.contiguous_format,
                             copy=True)  # [B, H, 64, 64] fp32
        y = self.inplace(new_state, r, w, k, v, a, b)
        return y, new_state

    def inplace(self, state, r, w, k, v, a, b):
        """Advance ``state`` (contiguous fp32, modified) over T steps; return y [B, T, H, 64]."""
        import torch

        if r.dim() != 4 or r.shape[-1] != HEAD_SIZE:
            raise ValueError(f"wkv7: r must be [B, T, H, {HEAD_SIZE}], got {tuple(r.shape)}")
        out_dtype = r.dtype
        if self.backend == "cpu" and out_dtype != torch.float32:
            r, w, k, v, a, b = (x.float() for x in (r, w, k, v, a, b))   # the CPU op computes in fp32
        r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
        y = torch.empty(r.shape, dtype=r.dtype, device=r.device)             # [B, T, H, 64]
        self._op(state, r, w, k, v, a, b, y)
        return y.to(out_dtype)


# ---------------------------------------------------------------- build & cache

_lock = threading.Lock()
_memo: dict[str, Optional[WKV7Kernel]] = {}
_errors: dict[str, str] = {}


def kernels_source_dir() -> Path:
    """The directory with the kernel sources (``kernels/`` of the repository)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels", here.parent.parent / "kernels"):
        if (candidate / "wkv7_cpu.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"WKV-7 kernel sources not found next to {here}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _cpu_model_tag() -> str:
    """Short hash of the CPU model/flags (the CPU build uses -march=native)."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    info += line
                if line.strip() == "":
                    break  # first processor block is enough
    except OSError:
        pass
    return hashlib.sha256(info.encode()).hexdigest()[:8]


def cache_dir(backend: str) -> Path:
    """Build directory for ``backend`` (not created)."""
    import torch

    root = os.environ.get("RWKV_NVIM_KERNEL_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        base = cache_root() / "kernels"
    name = f"{_safe(torch.__version__)}-{backend}"
    if backend == "cpu":
        name += f"-{_safe(platform.machine())}-{_cpu_model_tag()}"
    elif gpu_archs(backend):  # a build for one GPU generation does not run on another
        name += "-" + _safe(gpu_archs(backend).replace(";", "_").replace(" ", "_"))
    return base / name


def _sync_sources(src_dir: Path, build_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Copy sources into the build dir, only when changed (ninja rebuilds on mtime)."""
    out = []
    for name in names:
        src, dst = src_dir / name, build_dir / name
        data = src.read_bytes()
        if not dst.exists() or dst.read_bytes() != data:
            tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        out.append(str(dst))
    return out


def _clear_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"  # torch's FileBaton; left behind by a killed build
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
            log.info("removed stale kernel build lock %s", lock)
    except FileNotFoundError:
        pass


def _build_digest(spec: KernelSpec, sources: list[str]) -> str:
    h = hashlib.sha256(repr(spec).encode())
    for src in sources:
        h.update(Path(src).read_bytes())
    return h.hexdigest()[:16]


def _check_compiler(backend: str) -> None:
    cxx = (shlex.split(os.environ.get("CXX", "")) or ["c++"])[0]
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH)")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI wheel puts the binary next to python)
        except ImportError:
            raise RuntimeError("ninja is not installed (pip install ninja)") from None


_ARCH_ENV = {"cuda": "TORCH_CUDA_ARCH_LIST", "hip": "PYTORCH_ROCM_ARCH"}


def gpu_archs(backend: str) -> str:
    """The GPU architectures to compile for: the user's TORCH_CUDA_ARCH_LIST /
    PYTORCH_ROCM_ARCH if set, else those of the visible devices ("8.0;9.0", "gfx90a")."""
    import torch

    var = _ARCH_ENV.get(backend)
    if var is None:
        return ""
    if os.environ.get(var):
        return os.environ[var]
    archs: list[str] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            arch = (getattr(props, "gcnArchName", "").split(":")[0] if backend == "hip"
                    else f"{props.major}.{props.minor}")
            if arch and arch not in archs:
                archs.append(arch)
    return ";".join(archs)


@contextlib.contextmanager
def _gpu_arch_env(backend: str, archs: str):
    """Build only for ``archs`` (faster, and no torch warning about a missing arch list)."""
    var = _ARCH_ENV.get(backend)
    if var is None or not archs or os.environ.get(var):
        yield
        return
    os.environ[var] = archs
    try:
        yield
    finally:
        os.environ.pop(var, None)


@contextlib.contextmanager
def _own_ninja_first():
    """Build with the ninja installed beside this interpreter (the ``ninja`` wheel, a
    dependency), whatever PATH says. Two ninja versions keep different build logs (1.11
    and 1.13 hash commands differently), so each would rebuild everything the other
    built: the build's ``rwkv-nvim kernels`` (system ninja) and the editor's host (venv on
    PATH) took turns recompiling the kernel, ~12 s at every start."""
    own = Path(sys.executable).parent / ("ninja.exe" if os.name == "nt" else "ninja")
    path = os.environ.get("PATH", "")
    found = shutil.which("ninja")
    if not own.is_file() or (found and Path(found).resolve() == own.resolve()):
        yield
        return
    os.environ["PATH"] = str(own.parent) + (os.pathsep + path if path else "")
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _build(backend: str, progress: Optional[ProgressFn]) -> WKV7Kernel:
    import torch

    spec = kernel_spec(backend)
    build_dir = cache_dir(backend)
    make_private_dir(build_dir)
    sources = _sync_sources(kernels_source_dir(), build_dir, spec.sources)
    headers = _sync_sources(kernels_source_dir(), build_dir, spec.headers)
    _clear_stale_lock(build_dir)
    _check_compiler(backend)
    name = f"rwkv_nvim_wkv7_{backend}"
    stamp = build_dir / f".built-{_build_digest(spec, sources + headers)}"
    fresh = not stamp.exists()  # these sources and flags were never built here: announce it
    if fresh and progress is not None:
        progress(f"building the WKV-7 {backend} kernel (first use, takes a minute)…")
    from torch.utils import cpp_extension  # deferred: heavy, and only needed here

    started = time.perf_counter()
    with _gpu_arch_env(backend, gpu_archs(backend)), _own_ninja_first():
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=list(spec.extra_cflags),
            extra_ldflags=list(spec.extra_ldflags) or None,
            extra_cuda_cflags=list(spec.extra_cuda_cflags) or None,
            build_directory=str(build_dir),
            with_cuda=spec.with_cuda,
            is_python_module=False,
            verbose=os.environ.get("RWKV_NVIM_KERNEL_VERBOSE") == "1",
        )
    seconds = time.perf_counter() - started
    op = getattr(getattr(torch.ops, spec.namespace), "wkv7_")
    stamp.touch()
    make_tree_private(build_dir)
    if fresh and progress is not None:
        progress(f"WKV-7 {backend} kernel ready ({seconds:.0f} s)")
    log.info("WKV-7 %s kernel loaded from %s in %.1f s", backend, build_dir, seconds)
    return WKV7Kernel(backend, op, seconds if fresh else 0.0, build_dir)


def backend_for(device) -> Optional[str]:
    """"cuda", "hip" or "cpu" for a torch device (or device string); None if unsupported."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if torch.version.hip:
            return "hip"
        return "cuda" if torch.version.cuda else None
    return None


def kernels_disabled() -> bool:
    return os.environ.get("RWKV_NVIM_NO_KERNEL", "").strip() not in ("", "0")


def get_wkv7(device, progress: Optional[ProgressFn] = None) -> Optional[WKV7Kernel]:
    """The compiled WKV-7 kernel for ``device``, built on first use; None to use the reference.

    ``progress`` (optional) receives one-line messages while a first build runs, so
    the editor can say "building kernel…". Thread-safe; the outcome per backend is
    memoized for the process. A failed build warns once (RuntimeWarning) and
    returns None from then on.
    """
    if kernels_disabled():
        return None
    backend = backend_for(device)
    if backend is None:
        return None
    if backend in _memo:
        return _memo[backend]
    with _lock:
        if backend in _memo:
            return _memo[backend]
        try:
            kernel: Optional[WKV7Kernel] = _build(backend, progress)
        except Exception as exc:  # noqa: BLE001 - any build/load failure means "use the reference"
            reason = one_line(exc)
            _errors[backend] = reason
            kernel = None
            warnings.warn(f"rwkv.nvim: WKV-7 {backend} kernel unavailable, using the slower torch "
                          f"reference: {reason}", RuntimeWarning, stacklevel=2)
            log.debug("WKV-7 %s kernel build failed", backend, exc_info=True)
        _memo[backend] = kernel
        return kernel


def get_cpu_ops(progress: Optional[ProgressFn] = None):
    """``torch.ops.rwkv_nvim_cpu`` (q8_linear, q8_linear_reference, f32_linear, q8_isa,
    parallel_threads, decode_step), built with the CPU WKV-7 kernel; None when that kernel
    is unavailable."""
    if get_wkv7("cpu", progress) is None:
        return None
    import torch

    return torch.ops.rwkv_nvim_cpu


def cpu_isa(progress: Optional[ProgressFn] = None) -> Optional[str]:
    """The instruction-set path of the CPU q8 product in use: "avx512-vnni", "avx512bw",
    "avx2" (x86, compiled in), "neon-dotprod", "neon" (aarch64, picked at run time;
    RWKV_NVIM_Q8_ISA may narrow it) or "scalar"; None without the CPU kernel (builds it
    on first use, like ``get_wkv7``)."""
    ops = get_cpu_ops(progress)
    return None if ops is None else str(ops.q8_isa())


def cpu_isas(progress: Optional[ProgressFn] = None) -> Optional[dict[str, str]]:
    """The instruction-set path of each CPU product: {"q8": ``cpu_isa()``, "q4": "avx2" or
    "scalar", "q4a8": "avx2", "neon-dotprod" or "scalar"}; None without the CPU kernel."""
    ops = get_cpu_ops(progress)
    if ops is None:
        return None
    return {"q8": str(ops.q8_isa()), "q4": str(ops.q4_isa()), "q4a8": str(ops.q4a8_isa())}


def cpu_threads_note() -> str:
    """One line: how the CPU kernels get their threads on this platform, or why they run on
    one (``cpu_build_flags().note``, for ``rwkv-nvim kernels``)."""
    return cpu_build_flags().note


def kernel_status() -> dict[str, str]:
    """Per backend tried so far: "ready (<dir>)" or "failed: <reason>" (for :RwkvStatus/health)."""
    out = {}
    for backend, kernel in _memo.items():
        out[backend] = f"ready ({kernel.build_dir})" if kernel is not None else f"failed: {_errors.get(backend, '?')}"
    return out

