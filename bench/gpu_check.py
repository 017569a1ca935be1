#!/usr/bin/env python3
"""One GPU run that checks and measures everything GPU-related (issue 13), in < 8 minutes.

Writes ``gpu_check.json`` and ``gpu_check.log`` (plus ``peer_build.log`` and
``pytest_junit.xml``) into ``--out DIR`` (default ``$OUT``, else ``./gpu_check_out``).
Needs no network. Every section runs on its own: it records ``status`` (ok / failed /
skipped), ``error`` (one line) and ``seconds``, and a failing section never loses the
others' figures; the JSON is rewritten after each section, so a run killed at its time
limit still leaves what it measured. Sections, in order (estimated H200 seconds):

  environment    torch / CUDA / GPU / nvcc / packages; starts the `rwkv` package's own
                 kernel build in the background (CPU only, ~60-120 s)             ~5
  kernel_build   the WKV-7 CUDA kernel through rwkv_engine.core.kernel_loader.get_wkv7,
                 fresh (RWKV_NVIM_KERNEL_DIR -> a temp dir), plus a smoke test    ~60
  bandwidth      device-to-device copy bandwidth (bytes read + written per second)  ~2
  pytest_gpu     `pytest -m gpu` over the test files that have GPU tests
                 (test_gpu_kernels.py, test_gpu_model.py, test_forward_checks.py)   ~90
  accuracy       fp16 / bf16 vs CPU fp32 figures recorded by test_gpu_model.py       0
  (then the benchmarks wait, at most --peer-build-wait s, for the background build)
  bench_0.1b     random weights drawn on the GPU in fp16 (12 x 768, 24 x 2048): prefill
  bench_1.5b     tok/s, batch-1 and batch-8 decode, each step as a fraction of the
                 weight-bytes / bandwidth limit, peak VRAM                   ~10 / ~25
  replay_1.5b    keystroke replay (rwkv_engine/cli/bench_replay.py) with the 1.5B shape ~45
  bench_7.2b     the same for 32 x 4096 (15 GB of fp16 weights)                     ~35
  peer_rwkv      the same figures for the `rwkv` package 0.8.32 (RWKV_V7_ON=1,
                 RWKV_CUDA_ON=1, its own kernels) on the 0.1B and 1.5B checkpoints  ~45
  peer_fla       flash-linear-attention's RWKV-7 decode step, if `fla` imports      0
then ``summary``: the issue's targets as value / limit / ok. bench/README.md describes
every field.

``--device cpu --tiny`` (CI, tests/test_gpu_check_cpu.py) runs the same code paths on
tiny shapes on the CPU; the CUDA-only sections report "skipped: no CUDA".

The package need not be installed: the script puts this checkout's root (which holds
rwkv_engine/) first on sys.path and PYTHONPATH (for the pytest and peer subprocesses too).

On the GPU machine of the device tool (python3 with torch, no network; the `rwkv`
package travels as a wheel made by bench/gpu_wheels.sh into .whl/), with carry [".whl"]
and timeout_s 570:

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
  export PYTHONUNBUFFERED=1; python3 bench/gpu_check.py --out $OUT

(one line). ``--budget`` (default 450 s) is the script's own limit: a section that would
not fit in what is left is skipped with the reason; --no-7b, --no-peer, --no-pytest,
--no-replay leave out the big ones.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMA = 1
SHAPES = {"0.1b": (12, 768), "1.5b": (24, 2048), "7.2b": (32, 4096)}
TINY_SHAPES = {"0.1b": (2, 128), "1.5b": (2, 192), "7.2b": (3, 256)}
REPLAY_SHAPE = "1.5b"
SECTIONS = ("environment", "kernel_build", "bandwidth", "pytest_gpu", "accuracy",
            "bench_0.1b", "bench_1.5b", "replay_1.5b", "bench_7.2b", "peer_rwkv", "peer_fla")
# seconds a section is expected to need on the H200 (skipped when less is left)
ESTIMATE = {"kernel_build": 30, "bandwidth": 5, "pytest_gpu": 60, "bench_0.1b": 10,
            "bench_1.5b": 25, "bench_7.2b": 40, "replay_1.5b": 30, "peer_rwkv": 30, "peer_fla": 10}


class Skip(Exception):
    """A section that does not apply here (its message says why)."""


def one_line(error, limit: int = 300) -> str:
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.startswith(("Traceback", "FAILED:", "Error building")):
            break
    else:
        ln = lines[0] if lines else ""
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    return (f"{name}: {ln}" if name and ln else name or ln)[:limit]


# ---------------------------------------------------------------------------- plumbing
class Log:
    """Lines to the console and to the log file."""

    def __init__(self, path: Path):
        self.fh = open(path, "a", encoding="utf-8", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, msg: str = "") -> None:
        with self.lock:
            for line in str(msg).splitlines() or [""]:
                stamp = time.strftime("%H:%M:%S")
                print(f"[{stamp}] {line}", flush=True)
                self.fh.write(f"[{stamp}] {line}\n")


def ensure_engine() -> str:
    """Make ``import rwkv_engine`` load this checkout's rwkv_engine/ (installed or not), here
    and in the subprocesses this check starts: the checkout's root goes first on sys.path
    and PYTHONPATH."""
    root = str(REPO)
    if root not in sys.path:
        sys.path.insert(0, root)
    old = os.environ.get("PYTHONPATH")
    if root not in (old or "").split(os.pathsep):
        os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    for name in [m for m in sys.modules if m == "rwkv_engine" or m.startswith("rwkv_engine.")]:
        mod = sys.modules[name]
        if not str(getattr(mod, "__file__", "") or "").startswith(root):
            del sys.modules[name]
    importlib.invalidate_caches()
    import rwkv_engine
    return f"checkout {Path(rwkv_engine.__file__).resolve().parent}"


def run_logged(cmd, log: Log, timeout: float, env=None, cwd=REPO) -> int:
    """Run ``cmd`` (its own process group), its output line by line into the log; kill
    the group after ``timeout`` seconds (returns 124 then)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, cwd=str(cwd), start_new_session=True)

    def pump():
        for line in proc.stdout:
            log("  | " + line.rstrip())
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        log(f"  timed out after {timeout:.0f} s: killing process group {proc.pid}")
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = 124
    t.join(timeout=5)
    return rc


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)


class Check:
    def __init__(self, args):
        self.args = args
        self.t_start = time.monotonic()
        self.out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="rwkv-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out / "gpu_check.log")
        self.json_path = self.out / "gpu_check.json"
        self.shapes = dict(TINY_SHAPES if args.tiny else SHAPES)
        self.data = {"schema": SCHEMA, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "argv": sys.argv[1:], "tiny": bool(args.tiny), "device": None,
                     "settings": {}, "sections": {s: {"status": "pending"} for s in SECTIONS},
                     "summary": {}}
        self.ctx: dict = {"bench": {}, "peer_ckpts": {}}
        self.peer_build = None          # background Popen of the `rwkv` package's kernel build
        self.peer_build_t0 = 0.0
        self.cuda = self.cuda_available = False

    # -- time ---------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t_start)

    def need(self, name: str) -> None:
        est = 0 if self.args.tiny else ESTIMATE.get(name, 0)
        if self.left() < est:
            raise Skip(f"time budget: {self.left():.0f} s left of --budget {self.args.budget:.0f}, "
                       f"the section needs ~{est} s")

    # -- output -------------------------------------------------------------------------
    def write(self) -> None:
        self.data["elapsed_seconds"] = round(time.monotonic() - self.t_start, 1)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.json_path)

    def section(self, name: str, fn) -> dict:
        self.log(f"== {name}  ({self.left():.0f} s of the budget left)")
        t0 = time.perf_counter()
        rec: dict = {"status": "ok", "error": None}
        try:
            out = fn() or {}
            status = out.pop("_status", None)
            if status:
                rec["status"], rec["error"] = status, out.pop("_error", None)
            rec.update(out)
        except Skip as e:
            rec.update(status="skipped", error=f"skipped: {e}")
        except BaseException as e:   # noqa: BLE001 - a section must never end the run
            if isinstance(e, KeyboardInterrupt):
                raise
            rec.update(status="failed", error=one_line(e))
            self.log(traceback.format_exc().rstrip())
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self.data["sections"][name] = rec
        self.log(f"   {name}: {rec['status']}{' - ' + rec['error'] if rec['error'] else ''} "
                 f"({rec['seconds']:.1f} s)")
        self.write()
        self.free()
        return rec

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            import torch
            torch.cuda.empty_cache()

    # -- setup --------------------------------------------------------------------------
    def setup(self) -> None:
        args = self.args
        os.environ.setdefault("RWKV_NVIM_LOG_LEVEL", "WARNING")
        os.environ["RWKV_NVIM_KERNEL_DIR"] = str(Path(args.kernel_dir).resolve() if args.kernel_dir
                                                 else self.work / "kernels")
        os.environ["TORCH_EXTENSIONS_DIR"] = str(self.work / "torch_extensions")
        self.engine_import = ensure_engine()
        sys.path.insert(0, str(REPO / "tests"))           # random_checkpoint
        import torch
        want = args.device
        self.cuda_available = torch.cuda.is_available()
        if want == "auto":
            want = "cuda" if self.cuda_available else "cpu"
        self.device = torch.device(want)
        self.cuda = self.device.type == "cuda" and self.cuda_available
        self.data["device"] = want
        tiny = args.tiny
        self.prefill_tokens = args.prefill_tokens or (16 if tiny else 512)
        self.steps = args.decode_steps or (2 if tiny else 32)
        self.repeat = args.repeat or (1 if tiny else 3)
        self.replay_lines = args.replay_lines or (1 if tiny else 3)
        self.line_tokens = args.replay_line_tokens or (4 if tiny else 24)
        self.peer_shapes = [s for s in args.peer_shapes.split(",") if s]
        self.data["settings"] = {
            "shapes": {k: list(v) for k, v in self.shapes.items()}, "prefill_tokens": self.prefill_tokens,
            "decode_steps": self.steps, "batch": args.batch, "repeat": self.repeat,
            "replay_lines": self.replay_lines, "replay_line_tokens": self.line_tokens,
            "peer_shapes": self.peer_shapes, "budget_seconds": args.budget, "work_dir": str(self.work),
            "kernel_dir": os.environ["RWKV_NVIM_KERNEL_DIR"]}
        self.log(f"gpu_check: out {self.out}, work {self.work}, device {want}"
                 f"{' (tiny)' if tiny else ''}; rwkv_engine: {self.engine_import}")

    def require_device(self) -> None:
        if self.device.type == "cuda" and not self.cuda:
            raise Skip("no CUDA")

    def require_cuda(self) -> None:
        if not self.cuda:
            raise Skip("no CUDA")

    # -- sections -----------------------------------------------------------------------
    def s_environment(self) -> dict:
        import torch
        info = {"python": platform.python_version(), "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "torch_hip": getattr(torch.version, "hip", None), "cuda_available": self.cuda_available,
                "engine_import": self.engine_import, "packages": {}}
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                           "sms": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"}
            info["driver"] = _cmd_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["nvcc"] = _cmd_line(["nvcc", "--version"], last=True) if shutil.which("nvcc") else None
        from importlib import metadata
        for name, dist in (("rwkv", "rwkv"), ("fla", "flash-linear-attention"), ("pynvim", "pynvim"),
                           ("ninja", "ninja"), ("numpy", "numpy"), ("msgpack", "msgpack")):
            if importlib.util.find_spec(name) is None:
                info["packages"][name] = None
                continue
            try:
                info["packages"][name] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                info["packages"][name] = "present"
        info["git_commit"] = _cmd_line(["git", "-C", str(REPO), "rev-parse", "HEAD"])
        self.start_peer_build()
        return info

    def start_peer_build(self) -> None:
        """The `rwkv` package compiles its CUDA kernels when imported: do it now, in the
        background (CPU only), while our kernel builds and the tests run."""
        if not self.cuda or self.args.no_peer or importlib.util.find_spec("rwkv") is None:
            return
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="1", RWKV_JIT_ON="1")
        self.peer_build_log = self.out / "peer_build.log"
        fh = open(self.peer_build_log, "w", encoding="utf-8")
        self.peer_build_t0 = time.monotonic()
        self.peer_build = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--peer-build"],
                                           stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(self.work),
                                           start_new_session=True)
        fh.close()
        self.log(f"   building the rwkv package's CUDA kernels in the background (pid {self.peer_build.pid})")

    def settle_peer_build(self) -> None:
        """Let the background compiler finish before timing anything (the decode figures
        are sensitive to a busy CPU); waits at most --peer-build-wait seconds."""
        p = self.peer_build
        if p is None or p.poll() is not None:
            return
        wait = min(self.args.peer_build_wait, max(0.0, self.left() - 120))
        self.log(f"   waiting up to {wait:.0f} s for the rwkv package's kernel build to finish")
        try:
            p.wait(timeout=max(1.0, wait))
        except subprocess.TimeoutExpired:
            self.data["settings"]["peer_build_running_during_benchmarks"] = True
            self.log("   still building: the benchmarks run beside it")

    def s_kernel_build(self) -> dict:
        self.require_cuda()
        self.need("kernel_build")
        import torch

        from rwkv_engine.core import kernel_loader
        from rwkv_engine.core.wkv import wkv7_reference
        if kernel_loader.kernels_disabled():
            raise Skip("RWKV_NVIM_NO_KERNEL is set")
        t0 = time.perf_counter()
        kernel = kernel_loader.get_wkv7(self.device)
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
        y, s = kernel(s0.to(self.device), *(x.to(self.device) for x in seq))
        return {"build_seconds": round(kernel.build_seconds, 2), "wall_seconds": round(wall, 2),
                "build_dir": str(kernel.build_dir), "archs": kernel_loader.gpu_archs("cuda"),
                "smoke_max_abs_err_y": float((y.cpu() - y_ref).abs().max()),
                "smoke_max_abs_err_state": float((s.cpu() - s_ref).abs().max())}

    def s_bandwidth(self) -> dict:
        self.require_device()
        self.need("bandwidth")
        import torch
        n = (16 << 20) if self.args.tiny else (2 << 30)
        bufs = [torch.ones(n, dtype=torch.uint8, device=self.device)]
        bufs.append(torch.empty_like(bufs[0]))
        times = []
        for i in range(13):
            t = _timed(lambda: bufs[1].copy_(bufs[0]), self.device)
            if i >= 3:
                times.append(t)
        bufs.clear()
        best = min(times)
        bw = 2 * n / best
        self.ctx["bw"] = bw
        return {"bytes_per_copy": n, "copy_ms_best": round(best * 1e3, 4),
                "copy_ms_median": round(statistics.median(times) * 1e3, 4),
                "copy_GBps": round(bw / 1e9, 1), "counted": "bytes read + bytes written, best of 10"}

    def s_pytest_gpu(self) -> dict:
        if self.args.no_pytest:
            raise Skip("--no-pytest")
        self.need("pytest_gpu")
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text(encoding="utf-8", errors="replace"))
        metrics = self.work / "gpu_metrics.jsonl"
        if metrics.exists():
            metrics.unlink()
        junit = self.out / "pytest_junit.xml"
        env = dict(os.environ, RWKV_GPU_CHECK_METRICS=str(metrics))
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs",
               f"--junitxml={junit}", *files]
        self.log("   " + " ".join(cmd))
        rc = run_logged(cmd, self.log, timeout=min(self.args.pytest_timeout, self.left() - 10), env=env)
        res = {"files": files, "returncode": rc, **_junit_counts(junit)}
        self.ctx["metrics_file"] = metrics
        if rc == 124:
            res.update(_status="failed", _error="pytest timed out")
        elif res.get("failed") or res.get("errors") or rc not in (0, 5):
            names = ", ".join(f["test"] for f in res.get("failures", [])[:5])
            res.update(_status="failed", _error=f"{res.get('failed', 0)} failed, {res.get('errors', 0)} errors "
                                                f"(rc {rc}): {names}"[:300])
        return res

    def s_accuracy(self) -> dict:
        path = self.ctx.get("metrics_file")
        records = []
        if path is not None and Path(path).is_file():
            records = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
        acc = [r for r in records if r.get("kind") == "accuracy"]
        if not acc:
            self.require_cuda()
            raise RuntimeError("test_gpu_model.py recorded no accuracy figures (see pytest_gpu)")
        by_dtype = {}
        for r in acc:
            d = by_dtype.setdefault(r["dtype"], {"max_rel_err": 0.0, "min_top1_agreement": 1.0, "shapes": []})
            d["max_rel_err"] = max(d["max_rel_err"], r["max_rel_err"])
            d["min_top1_agreement"] = min(d["min_top1_agreement"], r["top1_agreement"])
            d["shapes"].append(r["shape"])
        return {"by_dtype": by_dtype, "results": acc,
                "snapshots": [r for r in records if r.get("kind") == "snapshots"],
                "pipeline": [r for r in records if r.get("kind") == "pipeline"]}

    def s_bench(self, name: str) -> dict:
        self.require_device()
        if name not in self.args.shapes.split(","):
            raise Skip(f"not in --shapes {self.args.shapes}")
        if name == "7.2b" and self.args.no_7b:
            raise Skip("--no-7b")
        self.need(f"bench_{name}")
        import torch

        from random_checkpoint import make_state_dict
        from rwkv_engine.cli.bench import engine_speed
        from rwkv_engine.core.checkpoint import infer_shape
        from rwkv_engine.core.model import RWKV7
        L, C = self.shapes[name]
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        sd = make_state_dict(n_layer=L, n_embd=C, seed=1, dtype=dtype, device=self.device, trained_like=True)
        _sync(self.device)
        gen_s = time.perf_counter() - t0
        shape, _ = infer_shape(sd, Path(f"<random {name}>"))
        res = {"n_layer": L, "n_embd": C, "vocab": shape.vocab_size, "dtype": str(dtype).replace("torch.", ""),
               "params_m": round(sum(v.numel() for v in sd.values()) / 1e6, 1),
               "generate_seconds": round(gen_s, 2)}
        if name in self.peer_shapes and not self.args.no_peer:
            t0 = time.perf_counter()
            path = self.work / f"random-{name}.pth"
            torch.save({k: v.cpu() for k, v in sd.items()}, str(path))
            self.ctx["peer_ckpts"][name] = str(path)
            res["checkpoint_save_seconds"] = round(time.perf_counter() - t0, 2)
        model = RWKV7(sd, shape, device=self.device, dtype=dtype if self.cuda else None,
                      use_kernel=self.cuda or self.args.cpu_kernel)
        del sd
        self.free()
        res["weight_bytes_per_step"] = _weight_bytes(model)
        speeds = engine_speed(model, self.prefill_tokens, self.steps, self.args.batch, self.repeat)
        res.update({k: round(v, 3) for k, v in speeds.items()})
        b = self.args.batch
        b1_ms, bn_ms = speeds["decode_b1_ms_per_step"], speeds[f"decode_b{b}_ms_per_step"]
        res[f"b{b}_over_b1_step"] = round(bn_ms / b1_ms, 3)
        bw = self.ctx.get("bw")
        if bw:
            limit_ms = res["weight_bytes_per_step"] / bw * 1e3
            res["bw_limit_ms_per_step"] = round(limit_ms, 4)
            res["b1_fraction_of_bw_limit"] = round(limit_ms / b1_ms, 4)
            res[f"b{b}_fraction_of_bw_limit"] = round(limit_ms / bn_ms, 4)
        if self.cuda:
            res["vram_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        self.ctx["bench"][name] = res
        if name == REPLAY_SHAPE and not self.args.no_replay:
            self.ctx["replay_model"] = model
        del model
        return res

    def s_replay(self) -> dict:
        self.require_device()
        if self.args.no_replay:
            raise Skip("--no-replay")
        model = self.ctx.pop("replay_model", None)
        if model is None:
            raise Skip(f"no {REPLAY_SHAPE} model (bench_{REPLAY_SHAPE} did not run)")
        self.need("replay_1.5b")
        from rwkv_engine.cli.bench_replay import replay
        from rwkv_engine.pipeline.config import EngineConfig
        cfg = EngineConfig(device=self.device.type, cache_dir=str(self.work / "replay-cache"), candidates=4,
                           max_lines=1, max_tokens=self.line_tokens)
        r = replay(model, self.args.replay_file, self.replay_lines, config=cfg)
        del model
        ks = r.get("keystroke", {})
        return {"first_text_ms_p50": ks.get("ms_first_p50"), "first_text_ms_p95": ks.get("ms_first_p95"),
                "all_candidates_ms_p50": ks.get("ms_total_p50"), "all_candidates_ms_p95": ks.get("ms_total_p95"),
                "refed_tokens_p50": ks.get("refed_tokens_p50"), "refed_tokens_max": ks.get("refed_tokens_max"),
                "candidates": 4, "line_token_cap": self.line_tokens, "replay": r}

    def s_peer_rwkv(self) -> dict:
        if self.args.no_peer:
            raise Skip("--no-peer")
        self.require_device()
        if importlib.util.find_spec("rwkv") is None:
            raise Skip("the rwkv package is not installed (bench/gpu_wheels.sh makes its wheel)")
        ckpts = {k: v for k, v in self.ctx["peer_ckpts"].items()}
        if not ckpts:
            raise Skip(f"no checkpoint written (--peer-shapes {self.args.peer_shapes}: their bench sections did not run)")
        self.need("peer_rwkv")
        res: dict = {"cuda_kernels": None}
        cuda_on = self.cuda
        if self.peer_build is not None:
            try:
                rc = self.peer_build.wait(timeout=max(1.0, self.left() - 60))
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(self.peer_build.pid, signal.SIGKILL)
                rc = "timeout"
            res["kernel_build_seconds"] = round(time.monotonic() - self.peer_build_t0, 1)
            if rc == 0:
                res["cuda_kernels"] = "built"
            else:
                # its decode (one token) is plain torch either way; without the kernels its
                # prefill uses torch too: still a figure, marked as such
                text = self.peer_build_log.read_text(errors="replace")
                res["cuda_kernels"] = f"failed to build (rc {rc}): {one_line(text)}; ran with RWKV_CUDA_ON=0"
                cuda_on = False
        spec = {"device": self.device.type, "ckpts": ckpts, "prefill_tokens": self.prefill_tokens,
                "steps": self.steps, "batch": self.args.batch, "repeat": self.repeat,
                "result": str(self.work / "peer_result.json")}
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="1" if cuda_on else "0")
        rc = run_logged([sys.executable, str(Path(__file__).resolve()), "--peer-worker", json.dumps(spec)],
                        self.log, timeout=self.left() - 10, env=env, cwd=self.work)
        result_path = Path(spec["result"])
        if not result_path.is_file():
            raise RuntimeError(f"the peer worker wrote no result (rc {rc})")
        peer = json.loads(result_path.read_text())
        b = self.args.batch
        for name, fig in peer.get("shapes", {}).items():
            eng = self.ctx["bench"].get(name, {})
            if "error" in fig or not eng:
                continue
            fig["speedup"] = {k: round(eng[k] / fig[k], 3) for k in
                              ("prefill_tok_s", "decode_b1_tok_s", f"decode_b{b}_tok_s") if eng.get(k) and fig.get(k)}
        res.update(peer)
        errors = [f"{n}: {f['error']}" for n, f in peer.get("shapes", {}).items() if "error" in f]
        if peer.get("error"):
            res.update(_status="skipped", _error=f"skipped: {peer['error']}")
        elif errors and len(errors) == len(peer.get("shapes", {})):
            res.update(_status="failed", _error="; ".join(errors)[:300])
        return res

    def s_peer_fla(self) -> dict:
        if self.args.no_peer:
            raise Skip("--no-peer")
        if importlib.util.find_spec("fla") is None:
            raise Skip("not installed (flash-linear-attention)")
        self.require_cuda()
        self.need("peer_fla")
        return fla_decode(self.device, *self.shapes[REPLAY_SHAPE], self.steps, self.args.batch)

    # -- summary -------------------------------------------------------------------------
    def summarize(self) -> None:
        S = self.data["sections"]
        b = self.args.batch
        acc = S["accuracy"].get("by_dtype", {})
        main = S.get(f"bench_{REPLAY_SHAPE}", {})
        peer = S["peer_rwkv"].get("shapes", {}).get(REPLAY_SHAPE, {})
        rp = S[f"replay_{REPLAY_SHAPE}"]
        targets = []

        def target(name, value, limit, op):
            ok = None
            if isinstance(value, (int, float)):
                ok = value >= limit if op == ">=" else value <= limit if op == "<=" else value < limit
            ratio = round(value / limit, 3) if isinstance(value, (int, float)) and limit else None
            targets.append({"target": name, "value": value, "op": op, "limit": limit, "ratio": ratio, "ok": ok})

        for dt in ("fp16", "bf16"):
            d = acc.get(dt, {})
            target(f"{dt} vs fp32 top-1 agreement", d.get("min_top1_agreement"), 0.99, ">=")
            target(f"{dt} vs fp32 max relative logit error", d.get("max_rel_err"), 2e-2, "<")
        target(f"{REPLAY_SHAPE} batch-1 decode / weight-bytes bandwidth limit",
               main.get("b1_fraction_of_bw_limit"), 0.5, ">=")
        target(f"{REPLAY_SHAPE} batch-{b} step / batch-1 step", main.get(f"b{b}_over_b1_step"), 1.3, "<=")
        target(f"{REPLAY_SHAPE} batch-{b} decode tok/s / rwkv package's",
               (peer.get("speedup") or {}).get(f"decode_b{b}_tok_s"), 3.0, ">=")
        target(f"{REPLAY_SHAPE} batch-1 decode tok/s / rwkv package's (information)",
               (peer.get("speedup") or {}).get("decode_b1_tok_s"), 3.0, ">=")
        target(f"keystroke -> first ghost text p50 ms ({REPLAY_SHAPE})", rp.get("first_text_ms_p50"), 15.0, "<=")
        target(f"keystroke -> all candidates' first line p50 ms ({REPLAY_SHAPE})",
               rp.get("all_candidates_ms_p50"), 100.0, "<=")
        counts = {k: sum(1 for s in S.values() if s.get("status") == k) for k in ("ok", "failed", "skipped")}
        self.data["summary"] = {"sections": counts, "targets": targets,
                                "targets_met": sum(1 for t in targets if t["ok"]),
                                "targets_missed": sum(1 for t in targets if t["ok"] is False),
                                "targets_without_figure": sum(1 for t in targets if t["ok"] is None)}
        self.log("== summary")
        for name, s in S.items():
            self.log(f"   {name:14} {s.get('status'):8} {s.get('seconds', 0):7.1f} s  {s.get('error') or ''}")
        for t in targets:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["ok"]]
            v = t["value"]
            vs = f"{v:.4g}" if isinstance(v, float) else str(v)
            self.log(f"   {mark} {t['target']}: {vs} {t['op']} {t['limit']}"
                     + (f"  (ratio {t['ratio']})" if t["ratio"] is not None else ""))

    def run(self) -> int:
        try:
            self.setup()
        except Exception as e:  # noqa: BLE001 - no torch, no engine: say so in the report
            self.log(traceback.format_exc().rstrip())
            self.data["sections"]["environment"] = {"status": "failed", "error": one_line(e), "seconds": 0.0}
            self.write()
            return 1
        steps = [("environment", self.s_environment), ("kernel_build", self.s_kernel_build),
                 ("bandwidth", self.s_bandwidth), ("pytest_gpu", self.s_pytest_gpu),
                 ("accuracy", self.s_accuracy)]
        steps += [("bench_0.1b", lambda: self.s_bench("0.1b")), ("bench_1.5b", lambda: self.s_bench("1.5b")),
                  ("replay_1.5b", self.s_replay), ("bench_7.2b", lambda: self.s_bench("7.2b")),
                  ("peer_rwkv", self.s_peer_rwkv), ("peer_fla", self.s_peer_fla)]
        assert [n for n, _ in steps] == list(SECTIONS)
        try:
            for name, fn in steps:
                if name == "bench_0.1b":
                    self.settle_peer_build()
                self.section(name, fn)
        finally:
            self.ctx.pop("replay_model", None)
            if self.peer_build is not None and self.peer_build.poll() is None:
                with _suppress():
                    os.killpg(self.peer_build.pid, signal.SIGKILL)
            self.summarize()
            self.write()
            if not self.args.keep and not self.args.work:
                shutil.rmtree(self.work, ignore_errors=True)
        self.log(f"wrote {self.json_path} ({self.data['elapsed_seconds']} s)")
        return 0


# --------------------------------------------------------------------------- helpers
def _cmd_line(cmd, last: bool = False):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return (out[-1] if last else out[0]).strip() if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    """Seconds of one call of fn (CUDA events on a GPU)."""
    import torch
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _weight_bytes(model) -> int:
    """Bytes of weights one decode step reads (``RWKV7.weight_bytes``: the layers, the
    output norm and the head; the embedding is gathered, one row per token: left out)."""
    return int(model.weight_bytes())


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET
    if not path.is_file():
        return {}
    try:
        root = ET.parse(str(path)).getroot()
    except ET.ParseError as e:
        return {"junit_error": str(e)}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for s in suites:
        out["tests"] += int(s.get("tests", 0))
        out["failed"] += int(s.get("failures", 0))
        out["errors"] += int(s.get("errors", 0))
        out["skipped"] += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    out["failures"].append({"test": name, "kind": tag, "message": one_line(el.get("message") or el.text or "")})
            sk = case.find("skipped")
            if sk is not None and len(out["skip_reasons"]) < 20:
                reason = (sk.get("message") or "").strip()
                if reason not in out["skip_reasons"]:
                    out["skip_reasons"].append(reason)
    out["passed"] = out["tests"] - out["failed"] - out["errors"] - out["skipped"]
    return out


def fla_decode(device, L: int, C: int, steps: int, batch: int) -> dict:
    """flash-linear-attention's RWKV-7 model (random init, fp16): ms per decode step at
    batch 1 and ``batch`` (optional peer; its API may change between versions)."""
    import torch
    from fla.models import RWKV7Config, RWKV7ForCausalLM
    cfg = RWKV7Config(hidden_size=C, num_hidden_layers=L, head_dim=64, vocab_size=65536)
    model = RWKV7ForCausalLM(cfg).to(device=device, dtype=torch.float16).eval()
    out = {"n_layer": L, "n_embd": C}
    with torch.inference_mode():
        for rows in (1, batch):
            ids = torch.randint(257, 65536, (rows, 8), device=device)
            o = model(input_ids=ids, use_cache=True)
            pkv, tok = o.past_key_values, ids[:, -1:]

            def run():
                nonlocal pkv
                for _ in range(steps):
                    pkv = model(input_ids=tok, past_key_values=pkv, use_cache=True).past_key_values
            run()
            t = min(_timed(run, device) for _ in range(3))
            out[f"decode_b{rows}_ms_per_step"] = round(1e3 * t / steps, 3)
            out[f"decode_b{rows}_tok_s"] = round(rows * steps / t, 1)
    import fla
    out["version"] = getattr(fla, "__version__", None)
    return out


# ------------------------------------------------------------------ peer subprocesses
def peer_build_main() -> int:
    """--peer-build: import the rwkv package with RWKV_CUDA_ON=1 (compiles its kernels)."""
    t0 = time.perf_counter()
    from rwkv.model import RWKV  # noqa: F401  (the import compiles the kernels)
    print(f"rwkv package kernels ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def peer_worker_main(spec_json: str) -> int:
    """--peer-worker SPEC: the rwkv package's figures for each checkpoint -> SPEC's result file."""
    spec = json.loads(spec_json)
    result: dict = {"shapes": {}}
    try:
        import torch

        from rwkv_engine.cli.bench import peer_speed
        import rwkv
        from importlib import metadata
        try:
            result["version"] = metadata.version("rwkv")
        except metadata.PackageNotFoundError:
            result["version"] = getattr(rwkv, "__version__", None)
        result["strategy"] = "cuda fp16" if spec["device"] == "cuda" else "cpu fp32"
        for name, path in spec["ckpts"].items():
            t0 = time.perf_counter()
            try:
                if spec["device"] == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                fig = peer_speed(path, spec["device"], spec["prefill_tokens"], spec["steps"],
                                 spec["batch"], spec["repeat"])
                fig = {k: round(v, 3) for k, v in fig.items()}
                if spec["device"] == "cuda":
                    fig["vram_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            except Exception as e:  # noqa: BLE001 - one shape's failure is that shape's figure
                traceback.print_exc()
                fig = {"error": one_line(e)}
            fig["seconds"] = round(time.perf_counter() - t0, 2)
            result["shapes"][name] = fig
            print(f"peer {name}: {fig}", flush=True)
            gc.collect()
            if spec["device"] == "cuda":
                torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - e.g. the package does not import
        traceback.print_exc()
        result["error"] = one_line(e)
    Path(spec["result"]).write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (default $OUT, else ./gpu_check_out)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (CI plumbing test)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    ap.add_argument("--shapes", default="0.1b,1.5b,7.2b", help="bench shapes (default all three)")
    ap.add_argument("--peer-shapes", default="0.1b,1.5b", help="shapes the rwkv package runs too")
    ap.add_argument("--no-7b", action="store_true", help="skip the 7.2B shape (15 GB, ~35 s)")
    ap.add_argument("--no-peer", action="store_true", help="skip the rwkv package and fla")
    ap.add_argument("--no-pytest", action="store_true", help="skip the GPU tests")
    ap.add_argument("--no-replay", action="store_true", help="skip the keystroke replay")
    ap.add_argument("--pytest-timeout", type=float, default=240.0)
    ap.add_argument("--peer-build-wait", type=float, default=90.0,
                    help="seconds the benchmarks wait for the rwkv package's background kernel build")
    ap.add_argument("--prefill-tokens", type=int, default=0, help="default 512 (tiny 16)")
    ap.add_argument("--decode-steps", type=int, default=0, help="default 32 (tiny 2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=0, help="timed runs per figure, best kept (default 3, tiny 1)")
    ap.add_argument("--replay-file", help="file the replay types (default json/decoder.py of the stdlib)")
    ap.add_argument("--replay-lines", type=int, default=0, help="lines typed (default 3, tiny 1)")
    ap.add_argument("--replay-line-tokens", type=int, default=0,
                    help="max_tokens of a candidate's first line in the replay (default 24, tiny 4)")
    ap.add_argument("--cpu-kernel", action="store_true", help="on the CPU, use (build) the CPU kernel")
    ap.add_argument("--kernel-dir", help="kernel cache (default: fresh in the work dir)")
    ap.add_argument("--work", help="work folder (default a temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the temp work dir")
    ap.add_argument("--peer-build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer_build:
        return peer_build_main()
    if args.peer_worker:
        return peer_worker_main(args.peer_worker)
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
