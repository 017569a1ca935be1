"""llama.cpp as a peer: build its CPU tools once into a cache, convert, and drive them.

Used by ``rwkv-nvim bench --peer llama.cpp`` (rwkv_engine.cli.bench_llamacpp), by
``bench/llama_cpp.py`` (a thin command line over this module) and by the llama.cpp tests.
Standard library only at import time (``gguf``/``numpy`` are imported by the one function
that needs them), so importing it costs nothing.

The source is the llama.cpp copy vendored in the ``llama-cpp-python`` sdist (PyPI, fetched
with ``pip download``), so no git access is needed. Binaries land in

    ~/.cache/rwkv.nvim/llama.cpp/<llama-cpp-python version>-<cpu tag>/bin

(``$RWKV_LLAMA_CPP_CACHE`` or ``$XDG_CACHE_HOME`` move it) and are reused when present.
The build is Release, ``-DGGML_NATIVE=ON``, static, CPU only, and only the tools we use
(llama-server, llama-bench, llama-batched-bench, llama-cli: whichever the version has).
On a CPU with AMX the AMX ISA is switched off (``-mno-amx-tile -mno-amx-int8
-mno-amx-bf16``): llama.cpp's AMX int8 path dies with SIGILL in Q8_0/Q4 on such hosts.
What was done is recorded in ``build-info.json`` next to ``bin/``.

Q4_0 GGUFs are written here in Python (``requantize_gguf``: gguf-py's Q4_0 quantizer is
the reference ``quantize_row_q4_0_ref`` of ggml), so ``llama-quantize`` is not built: the
build tree is deleted after a build, and one more target would be a full rebuild.

Offline use: ``RWKV_LLAMA_CPP_SDIST=/path/llama_cpp_python-X.tar.gz`` (a downloaded sdist)
or ``RWKV_LLAMA_CPP_SRC=/path/to/llama.cpp`` (a source tree; its cache key uses the
directory name instead of the sdist version).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
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
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "rwkv.nvim" / "llama.cpp"


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


# -- llama-server -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``llama-server`` on a loopback port for one GGUF (a context manager).

    One slot, no prompt cache between requests unless asked, CPU threads as given."""

    def __init__(self, gguf, bins: Optional[Path] = None, ctx: int = 4096, threads: int = 2,
                 extra: Sequence[str] = (), startup_timeout: float = 120.0):
        self.gguf = Path(gguf)
        self.bins = Path(bins) if bins else build()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(self.bins / "llama-server"), "-m", str(self.gguf), "--host", "127.0.0.1",
               "--port", str(self.port), "-c", str(ctx), "-np", "1", "-t", str(threads),
               "-tb", str(threads), "--no-warmup", *extra]
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise BuildError(f"llama-server exited with {self.proc.returncode} loading "
                                 f"{self.gguf}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise BuildError(f"llama-server did not become ready in {startup_timeout:.0f} s:\n"
                                 f"{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 20) -> str:
        self._log.seek(0)
        return "\n".join(self._log.read().strip().splitlines()[-n:])

    def post(self, path: str, payload: dict, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise BuildError(f"llama-server {path}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def get(self, path: str, timeout: float = 30.0) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def greedy(self, prompt_ids: Sequence[int], n: int, n_probs: int = 0) -> dict:
        """/completion from token ids, argmax decoding, exactly ``n`` tokens (EOS ignored).

        Returns ``{"tokens": [...], "top_logprobs": [{id: logprob, ...} per step]}``; the
        logprobs (n_probs > 0) are a plain log-softmax of the raw logits."""
        res = self.post("/completion", {
            "prompt": [int(t) for t in prompt_ids], "n_predict": int(n), "temperature": 0.0,
            "top_k": 1, "ignore_eos": True, "return_tokens": True, "cache_prompt": False,
            "n_probs": int(n_probs), "post_sampling_probs": False, "seed": 0, "stream": False,
        })
        tops = []
        for step in res.get("completion_probabilities") or []:
            tops.append({int(p["id"]): float(p["logprob"]) for p in step.get("top_logprobs", [])})
        return {"tokens": [int(t) for t in res.get("tokens") or []], "top_logprobs": tops,
                "timings": res.get("timings", {})}

    def next_logprobs(self, prompt_ids: Sequence[int], n_probs: int,
                      force_token: Optional[int] = None) -> Dict[int, float]:
        """The top ``n_probs`` log-probabilities of the token after ``prompt_ids``.

        The prompt is cached (``cache_prompt``): a prompt that extends the previous one by
        k tokens costs k tokens of prefill, also for the recurrent rwkv7 state (the
        sampled token is never decoded, so the cache ends exactly at the prompt).
        ``force_token``: a logit bias makes it the sampled token. llama-server returns no
        probabilities for a token whose text is an incomplete UTF-8 sequence (it waits for
        the rest), so forcing a plain ASCII token keeps every position; the probabilities
        are those of the raw logits, before any bias (``post_sampling_probs`` false)."""
        payload = {
            "prompt": [int(t) for t in prompt_ids], "n_predict": 1, "temperature": 0.0,
            "top_k": 1, "ignore_eos": True, "cache_prompt": True, "n_probs": int(n_probs),
            "post_sampling_probs": False, "seed": 0, "stream": False,
        }
        if force_token is not None:
            payload["logit_bias"] = [[int(force_token), 1000.0]]
        res = self.post("/completion", payload)
        steps = res.get("completion_probabilities") or []
        if not steps:
            raise BuildError(f"llama-server returned no probabilities: {str(res)[:300]}")
        return {int(p["id"]): float(p["logprob"]) for p in steps[0].get("top_logprobs", [])}

    def teacher_forced(self, ids: Sequence[int], start: int, n: int,
                       n_probs: int) -> List[Dict[int, float]]:
        """Top-``n_probs`` log-probabilities after ``ids[:start + 1 + j]`` for j < n: the
        distributions at positions start .. start+n-1 of one fixed token sequence."""
        if start + n > len(ids):
            raise ValueError(f"{len(ids)} tokens cannot give {n} positions from {start}")
        ascii_tok = (self.post("/tokenize", {"content": "a"}).get("tokens") or [None])[0]
        return [self.next_logprobs(ids[:start + 1 + j], n_probs, ascii_tok) for j in range(n)]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def greedy_tokens(gguf, prompt_ids: Sequence[int], n: int, bins: Optional[Path] = None) -> List[int]:
    """llama.cpp's greedy continuation (``n`` token ids) of ``prompt_ids`` for ``gguf``."""
    with Server(gguf, bins=bins) as srv:
        return srv.greedy(prompt_ids, n)["tokens"]


def greedy_with_logprobs(gguf, prompt_ids: Sequence[int], n: int, n_probs: int = 5,
                         bins: Optional[Path] = None) -> dict:
    """Like greedy_tokens, plus each step's top ``n_probs`` log-probabilities."""
    with Server(gguf, bins=bins) as srv:
        return srv.greedy(prompt_ids, n, n_probs)


# -- llama-bench / llama-batched-bench --------------------------------------------------
def _run_tool(cmd: List[str], timeout: float) -> str:
    """stdout of a llama.cpp tool; BuildError (with its output's tail) when it fails."""
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{Path(cmd[0]).name} ran past {timeout:.0f} s: {' '.join(cmd)}") from None
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-12:])
        raise BuildError(f"{Path(cmd[0]).name} exit {r.returncode} ({' '.join(cmd)}):\n{tail}")
    return r.stdout


def _json_lines(text: str) -> List[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def llama_bench(bins: Path, gguf, prompt_tokens: int, gen_tokens: int, threads: int,
                repetitions: int = 1, timeout: float = 900.0) -> dict:
    """``llama-bench -p P -n N -t T -r R -o jsonl`` (after its own warm-up run).

    Returns ``prefill_tok_s`` (pp: one batch of P random tokens, n_ubatch 512) and
    ``decode_b1_tok_s`` (tg: N tokens one at a time from an empty state), each the best
    of the R samples, plus the samples and the command."""
    cmd = [str(Path(bins) / "llama-bench"), "-m", str(gguf), "-p", str(prompt_tokens),
           "-n", str(gen_tokens), "-t", str(threads), "-r", str(repetitions), "-o", "jsonl"]
    rows = _json_lines(_run_tool(cmd, timeout))
    pp = [r for r in rows if r.get("n_prompt") == prompt_tokens and r.get("n_gen") == 0]
    tg = [r for r in rows if r.get("n_gen") == gen_tokens and r.get("n_prompt") == 0]
    if not pp or not tg:
        raise BuildError(f"llama-bench printed no pp{prompt_tokens}/tg{gen_tokens} result: {rows!r:.300}")
    pps, tgs = [float(x) for x in pp[0]["samples_ts"]], [float(x) for x in tg[0]["samples_ts"]]
    return {"prefill_tok_s": max(pps), "decode_b1_tok_s": max(tgs), "pp_samples": pps,
            "tg_samples": tgs, "model_type": pp[0].get("model_type"),
            "model_size": pp[0].get("model_size"), "command": cmd}


def batched_bench(bins: Path, gguf, rows: Sequence[int], gen_tokens: int, threads: int,
                  prompt_tokens: int = 8, timeout: float = 900.0) -> dict:
    """``llama-batched-bench -npp P -ntg N -npl rows... -t T -tb T`` (one process; it warms
    up with 16 tokens). For each row count: every sequence gets its own P-token prompt,
    then N steps each decode one token per sequence in one batch (logits for every
    row). Returns ``{rows: aggregate decode tok/s (pl*N / t_tg)}`` and the command."""
    rows = [int(r) for r in rows]
    ctx = max(512, max(rows) * (prompt_tokens + gen_tokens) + 64)
    cmd = [str(Path(bins) / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx),
           "-npp", str(prompt_tokens), "-ntg", str(gen_tokens), "-npl", ",".join(map(str, rows)),
           "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
    got = {}
    for r in _json_lines(_run_tool(cmd, timeout)):
        if "pl" in r and "speed_tg" in r:
            got[int(r["pl"])] = max(got.get(int(r["pl"]), 0.0), float(r["speed_tg"]))
    missing = [r for r in rows if r not in got]
    if missing:
        raise BuildError(f"llama-batched-bench printed no result for {missing} sequences")
    return {"decode_rows_tok_s": {r: got[r] for r in rows}, "command": cmd}


# -- Q4_0 (and other gguf-py types) from an exported file ------------------------------------
def requantize_gguf(f32_path, like_path, dst, qtype: str = "q4_0",
                    keep: Sequence[str] = ("output.weight",)) -> dict:
    """Write ``dst``: the GGUF ``like_path`` (an export whose large matrices are Q8_0) with
    every Q8_0 tensor re-quantized to ``qtype`` from the exact values in ``f32_path``
    (the f32 export of the same checkpoint), except the tensors named in ``keep``
    (copied as they are in ``like_path``). Metadata is copied; ``general.file_type``
    is set to the new type.

    With the defaults this is llama-quantize's Q4_0 recipe on an rwkv7 model (all 2-D
    weights but the time_mix_w1/w2 LoRA, the fused lerp and the norms: exactly what the
    q8_0 export makes Q8_0), except that llama-quantize stores ``output.weight`` as Q6_K,
    which gguf-py cannot write: it stays Q8_0 here (8.5 instead of 6.6 bits/weight)."""
    import numpy as np
    import gguf

    Q = gguf.GGMLQuantizationType
    qt = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q8_0": Q.Q8_0}[qtype]
    ftype = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
             "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    t0 = time.perf_counter()
    ref = gguf.GGUFReader(str(f32_path))
    like = gguf.GGUFReader(str(like_path))
    exact = {t.name: t for t in ref.tensors}
    arch = None
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    w = gguf.GGUFWriter(str(tmp), arch="rwkv7")
    try:
        for field in like.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                if field.name == "general.architecture":
                    arch = field.contents() if hasattr(field, "contents") else None
                continue
            if not hasattr(field, "contents"):
                raise BuildError("requantize_gguf needs gguf >= 0.11 (pip install -U gguf)")
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = int(ftype) if field.name == "general.file_type" else field.contents()
            w.add_key_value(field.name, value, vtype, sub_type=sub)
        if arch not in (None, "rwkv7"):
            raise BuildError(f"{like_path}: architecture {arch!r}, not rwkv7")
        plan, counts = [], {}
        for t in like.tensors:
            shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))   # numpy order
            if t.tensor_type == Q.Q8_0 and t.name not in keep:
                src = exact.get(t.name)
                if src is None or src.tensor_type != Q.F32:
                    raise BuildError(f"{f32_path}: no f32 tensor {t.name} to quantize from")
                data = gguf.quants.quantize(np.ascontiguousarray(src.data, dtype=np.float32)
                                            .reshape(shape), qt)
                q = qt
            else:
                data, q = t.data, t.tensor_type
            counts[q.name] = counts.get(q.name, 0) + 1
            plan.append((t.name, data))
            w.add_tensor_info(t.name, shape, np.dtype(np.float32), int(data.nbytes), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, data in plan:
            w.write_tensor_data(data)
        w.close()
        os.replace(tmp, dst)
    except BaseException:
        w.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return {"path": str(dst), "type": qtype, "tensor_types": counts, "kept": list(keep),
            "file_bytes": dst.stat().st_size, "seconds": round(time.perf_counter() - t0, 3)}
