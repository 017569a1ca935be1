"""Where llama.cpp's CPU tools live, their source (the llama-cpp-python sdist) and their
build (Release, GGML_NATIVE, static, CPU only; AMX off where it crashes). See the package doc."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple


# the llama-cpp-python release whose vendored llama.cpp we build (tested with rwkv7 GGUFs
# written by rwkv_engine.core.gguf_export); RWKV_LLAMA_CPP_PYTHON_VERSION overrides
DEFAULT_VERSION = "0.3.36"
WANTED_TARGETS = ("llama-server", "llama-bench", "llama-batched-bench", "llama-cli")
AMX_OFF_FLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
STAMP = "build-info.json"


class BuildError(RuntimeError):
    """llama.cpp could not be fetched, built or run; the message says why (and what to install)."""


# -- where ------------------------------------------------------------------------------
def cache_root() -> Path:
    env = os.environ.get("RWKV_LLAMA_CPP_CACHE")
    if env:
        return Path(env).expanduser()
    from rwkv_engine.core.cache_paths import cache_root as rwkv_cache_root
    return rwkv_cache_root() / "llama.cpp"


def version() -> str:
    return os.environ.get("RWKV_LLAMA_CPP_PYTHON_VERSION", DEFAULT_VERSION)


def cpu_info() -> Dict[str, object]:
    """Machine, model name and ISA flags (Linux /proc/cpuinfo; empty flags elsewhere)."""
    model, flags = platform.processor() or "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            model = m.group(1).strip()
        f = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
        if f:
            flags = set(f.group(1).split())
    except OSError:
        pass
    return {"machine": platform.machine() or "unknown", "model": model or "unknown",
            "flags": flags, "amx": bool(flags & {"amx_tile", "amx_int8", "amx_bf16"})}


# the ISA flags that decide which kernels ggml and torch pick on x86
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                  "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_summary(info: Optional[dict] = None) -> Dict[str, object]:
    """Model name, the relevant ISA flags present (``RELEVANT_FLAGS`` order), and whether
    the AMX workaround applies / was used by the cached build (``build-info.json``)."""
    info = info or cpu_info()
    flags = info["flags"]
    built = build_info() or {}
    return {"model": info["model"], "machine": info["machine"], "cores": os.cpu_count(),
            "flags": [f for f in RELEVANT_FLAGS if f in flags],
            "missing_flags": [f for f in RELEVANT_FLAGS if f not in flags],
            "amx": bool(info["amx"]),
            "amx_workaround_used": bool(built.get("amx_disabled_flags")),
            "amx_disabled_flags": list(built.get("amx_disabled_flags") or [])}


def cpu_tag(info: Optional[dict] = None) -> str:
    """``<machine>-<vendor word>-<hash of model+flags>[-noamx]``: GGML_NATIVE binaries are
    only valid on a CPU with the same ISA, so the cache key names the ISA."""
    info = info or cpu_info()
    name = re.sub(r"\((?:R|TM)\)", "", str(info["model"]), flags=re.IGNORECASE)
    word = re.sub(r"[^a-z0-9]+", "", (name.split() or ["cpu"])[0].lower()) or "cpu"
    digest = hashlib.sha1((str(info["model"]) + "|" + " ".join(sorted(info["flags"]))).encode())
    return f"{info['machine']}-{word}-{digest.hexdigest()[:8]}" + ("-noamx" if info["amx"] else "")


def build_dir_for(ver: Optional[str] = None) -> Path:
    src = os.environ.get("RWKV_LLAMA_CPP_SRC")
    key = (f"src-{Path(src).resolve().name}" if src else (ver or version()))
    return cache_root() / f"{key}-{cpu_tag()}"


def bin_dir() -> Optional[Path]:
    """The cached bin dir if a finished build is there, else None (never builds)."""
    d = build_dir_for()
    return d / "bin" if (d / STAMP).is_file() and (d / "bin" / "llama-server").is_file() else None


# -- source -----------------------------------------------------------------------------
def _extract_vendor(sdist: Path, dest: Path) -> Path:
    """Unpack only ``*/vendor/llama.cpp/`` of the sdist into ``dest``; returns the tree."""
    tmp = Path(tempfile.mkdtemp(prefix="llama-src-", dir=str(dest.parent)))
    try:
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name + "/"
                       and (m.isfile() or m.isdir())]
            if not members:
                raise BuildError(f"{sdist}: no vendor/llama.cpp inside this sdist")
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tf.extractall(str(tmp), members=members, **kw)
        found = next(tmp.glob("*/vendor/llama.cpp"))
        if dest.exists():
            shutil.rmtree(dest)
        found.rename(dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def source_dir(ver: Optional[str] = None, log=print) -> Path:
    """A llama.cpp source tree: $RWKV_LLAMA_CPP_SRC, the cached one, or fetched now."""
    env = os.environ.get("RWKV_LLAMA_CPP_SRC")
    if env:
        p = Path(env).expanduser()
        if not (p / "CMakeLists.txt").is_file():
            raise BuildError(f"RWKV_LLAMA_CPP_SRC={p} is not a llama.cpp source tree")
        return p
    ver = ver or version()
    dest = cache_root() / "src" / f"llama.cpp-{ver}"
    if (dest / "CMakeLists.txt").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    sdist_env = os.environ.get("RWKV_LLAMA_CPP_SDIST")
    if sdist_env:
        return _extract_vendor(Path(sdist_env).expanduser(), dest)
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as tmp:
        log(f"llama_cpp: downloading the llama-cpp-python=={ver} sdist (vendored llama.cpp) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={ver}", "-d", tmp]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tars = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not tars:   # metadata preparation can fail without build deps; the file is there
            raise BuildError(f"could not download the llama-cpp-python=={ver} sdist "
                             f"(pip said: {r.stdout.strip().splitlines()[-1:]}); set "
                             "RWKV_LLAMA_CPP_SDIST to a downloaded sdist to build offline")
        return _extract_vendor(tars[0], dest)


def available_targets(src: Path, wanted: Sequence[str] = WANTED_TARGETS) -> List[str]:
    """The wanted executables this llama.cpp version defines (names change over releases)."""
    defined = set()
    for cm in list((src / "tools").glob("*/CMakeLists.txt")) + list((src / "examples").glob("*/CMakeLists.txt")):
        text = cm.read_text(errors="replace")
        defined.update(re.findall(r"set\s*\(\s*TARGET\s+([A-Za-z0-9_.-]+)\s*\)", text))
        defined.update(re.findall(r"add_executable\s*\(\s*([A-Za-z0-9_.-]+)", text))
    return [t for t in wanted if t in defined]


# -- build ------------------------------------------------------------------------------
def _need_tools() -> None:
    missing = [t for t in ("cmake", "g++") if shutil.which(t) is None]
    if missing:
        raise BuildError(f"building llama.cpp needs {' and '.join(missing)}: "
                         "apt-get install -y cmake g++ (or your system's equivalent)")


def cmake_args(src: Path, build: Path, info: dict) -> Tuple[List[str], List[str]]:
    """(cmake configure command, extra compiler flags)."""
    extra = list(AMX_OFF_FLAGS) if info["amx"] else []
    flags = " ".join(extra)
    cmd = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
           "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CCACHE=OFF",
           "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
           "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
           "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
           # GCC lets an explicit -mno-X win over -march=native whatever the order
           f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    return cmd, extra


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)      # one build per key at a time (pytest-xdist, CI)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(jobs: int = 2, force: bool = False, keep_build: bool = False, log=print) -> Path:
    """Build (or reuse) llama.cpp's CPU tools; returns the bin dir. Raises BuildError."""
    out = build_dir_for()
    with _lock(out.parent / (out.name + ".lock")):
        stamp = out / STAMP
        if stamp.is_file() and not force:
            info = json.loads(stamp.read_text())
            if all((out / "bin" / t).is_file() for t in info.get("targets", [])):
                return out / "bin"
        _need_tools()
        src = source_dir(log=log)
        cpu = cpu_info()
        targets = available_targets(src)
        if "llama-server" not in targets:
            raise BuildError(f"{src}: this llama.cpp has no llama-server target")
        bdir = out / "build"
        if force and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        configure, extra = cmake_args(src, bdir, cpu)
        t0 = time.perf_counter()
        log(f"llama_cpp: building {', '.join(targets)} in {bdir} (-j{jobs}"
            + (f", AMX off: {' '.join(extra)}" if extra else "") + ") ...")
        logf = out / "build.log"
        with open(logf, "w") as lf:
            for cmd in (configure, ["cmake", "--build", str(bdir), "--config", "Release",
                                    "-j", str(jobs), "--target", *targets]):
                lf.write("$ " + " ".join(cmd) + "\n")
                lf.flush()
                r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT)
                if r.returncode != 0:
                    tail = logf.read_text(errors="replace").strip().splitlines()[-15:]
                    raise BuildError(f"llama.cpp build failed ({cmd[1]} exit {r.returncode}); "
                                     f"log {logf}:\n" + "\n".join(tail))
        seconds = time.perf_counter() - t0
        bins = out / "bin"
        bins.mkdir(exist_ok=True)
        for t in targets:
            exe = bdir / "bin" / t
            if not exe.is_file():
                raise BuildError(f"llama.cpp build finished but {exe} is missing (log {logf})")
            shutil.copy2(exe, bins / t)
        if not keep_build:        # static binaries: the object files are not needed again
            shutil.rmtree(bdir, ignore_errors=True)
        info = {"llama_cpp_python_version": version(), "source": str(src), "targets": targets,
                "cpu": {"machine": cpu["machine"], "model": cpu["model"], "amx": cpu["amx"]},
                "cpu_tag": cpu_tag(cpu), "amx_disabled_flags": extra, "ggml_native": True,
                "configure": configure, "jobs": jobs, "build_seconds": round(seconds, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        stamp.write_text(json.dumps(info, indent=2) + "\n")
        log(f"llama_cpp: built in {seconds:.0f} s -> {bins}")
        return bins


def build_info() -> Optional[dict]:
    p = build_dir_for() / STAMP
    return json.loads(p.read_text()) if p.is_file() else None
