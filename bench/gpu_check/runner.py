"""The GPU check's run: its settings, the sections in order, each within the time budget,
and the JSON report rewritten after each; ``main`` is the command line of
bench/gpu_check.py."""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

from .benchmarks import bench, replay
from .gpu_tests import accuracy, pytest_gpu
from .machine import bandwidth, environment, kernel_build
from .peer import peer_build_main, peer_fla, peer_rwkv, peer_worker_main
from .plumbing import Log, Skip, ensure_engine, one_line
from .summary import summarize

TITLE = "One GPU run that checks and measures everything GPU-related (issue 13), in < 8 minutes."
SCHEMA = 1
SHAPES = {"0.1b": (12, 768), "1.5b": (24, 2048), "7.2b": (32, 4096)}
TINY_SHAPES = {"0.1b": (2, 128), "1.5b": (2, 192), "7.2b": (3, 256)}
# the report's sections in the order they run (section name -> its function of the Check)
SECTIONS = {"environment": environment, "kernel_build": kernel_build, "bandwidth": bandwidth,
            "pytest_gpu": pytest_gpu, "accuracy": accuracy,
            "bench_0.1b": partial(bench, name="0.1b"), "bench_1.5b": partial(bench, name="1.5b"),
            "replay_1.5b": replay, "bench_7.2b": partial(bench, name="7.2b"),
            "peer_rwkv": peer_rwkv, "peer_fla": peer_fla}
# seconds a section is expected to need on the H200 (skipped when less is left)
ESTIMATE = {"kernel_build": 30, "bandwidth": 5, "pytest_gpu": 60, "bench_0.1b": 10,
            "bench_1.5b": 25, "bench_7.2b": 40, "replay_1.5b": 30, "peer_rwkv": 30, "peer_fla": 10}


class Check:
    """One run: the arguments, the device, what sections hand to later ones (``ctx``) and
    the report (``data``)."""

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
        # bench: each shape's figures; peer_ckpts: shape -> .pth for the rwkv package;
        # bw: copy bytes/s; metrics_file: what the GPU tests recorded; replay_model
        self.ctx: dict = {"bench": {}, "peer_ckpts": {}}
        self.peer_build = None          # peer.PeerKernelBuild, started by the environment section
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
            out = fn(self) or {}
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

    # -- the run ------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.setup()
        except Exception as e:  # noqa: BLE001 - no torch, no engine: say so in the report
            self.log(traceback.format_exc().rstrip())
            self.data["sections"]["environment"] = {"status": "failed", "error": one_line(e), "seconds": 0.0}
            self.write()
            return 1
        try:
            for name, fn in SECTIONS.items():
                if name == "bench_0.1b" and self.peer_build is not None:
                    self.peer_build.settle(self)
                self.section(name, fn)
        finally:
            self.ctx.pop("replay_model", None)
            if self.peer_build is not None:
                self.peer_build.stop()
            summarize(self)
            self.write()
            if not self.args.keep and not self.args.work:
                shutil.rmtree(self.work, ignore_errors=True)
        self.log(f"wrote {self.json_path} ({self.data['elapsed_seconds']} s)")
        return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=TITLE, formatter_class=argparse.RawDescriptionHelpFormatter)
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
