"""The peers: the `rwkv` package (``peer_rwkv``: its kernels built in the background from
the environment section on, then its figures on the checkpoints the bench sections wrote,
in a subprocess) and flash-linear-attention (``peer_fla``), plus the two subprocess entry
points bench/gpu_check.py dispatches to (--peer-build, --peer-worker)."""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .plumbing import ENTRY_SCRIPT, REPLAY_SHAPE, Skip, kill_group, one_line, run_logged, timed


class PeerKernelBuild:
    """The `rwkv` package compiles its CUDA kernels when imported: that import runs in the
    background (CPU only) while our kernel builds and the tests run."""

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.proc = proc
        self.log_path = log_path
        self.t0 = time.monotonic()

    @classmethod
    def start(cls, check):
        """The build, started; None where there is nothing to build (no CUDA, --no-peer,
        the package not installed)."""
        if not check.cuda or check.args.no_peer or importlib.util.find_spec("rwkv") is None:
            return None
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="1", RWKV_JIT_ON="1")
        log_path = check.out / "peer_build.log"
        with open(log_path, "w", encoding="utf-8") as fh:
            proc = subprocess.Popen([sys.executable, str(ENTRY_SCRIPT), "--peer-build"], stdout=fh,
                                    stderr=subprocess.STDOUT, env=env, cwd=str(check.work),
                                    start_new_session=True)
        check.log(f"   building the rwkv package's CUDA kernels in the background (pid {proc.pid})")
        return cls(proc, log_path)

    def settle(self, check) -> None:
        """Let the background compiler finish before timing anything (the decode figures
        are sensitive to a busy CPU); waits at most --peer-build-wait seconds."""
        if self.proc.poll() is not None:
            return
        wait = min(check.args.peer_build_wait, max(0.0, check.left() - 120))
        check.log(f"   waiting up to {wait:.0f} s for the rwkv package's kernel build to finish")
        try:
            self.proc.wait(timeout=max(1.0, wait))
        except subprocess.TimeoutExpired:
            check.data["settings"]["peer_build_running_during_benchmarks"] = True
            check.log("   still building: the benchmarks run beside it")

    def finish(self, timeout: float):
        """The build's exit status, or "timeout" (then it is killed) after ``timeout`` s."""
        try:
            return self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            kill_group(self.proc.pid)
            return "timeout"

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc.pid)


def peer_rwkv(check) -> dict:
    args = check.args
    if args.no_peer:
        raise Skip("--no-peer")
    check.require_device()
    if importlib.util.find_spec("rwkv") is None:
        raise Skip("the rwkv package is not installed (bench/gpu_wheels.sh makes its wheel)")
    ckpts = dict(check.ctx["peer_ckpts"])
    if not ckpts:
        raise Skip(f"no checkpoint written (--peer-shapes {args.peer_shapes}: their bench sections did not run)")
    check.need("peer_rwkv")
    res: dict = {"cuda_kernels": None}
    cuda_on = check.cuda
    build = check.peer_build
    if build is not None:
        rc = build.finish(check.left() - 60)
        res["kernel_build_seconds"] = round(time.monotonic() - build.t0, 1)
        if rc == 0:
            res["cuda_kernels"] = "built"
        else:
            # its decode (one token) is plain torch either way; without the kernels its
            # prefill uses torch too: still a figure, marked as such
            text = build.log_path.read_text(errors="replace")
            res["cuda_kernels"] = f"failed to build (rc {rc}): {one_line(text)}; ran with RWKV_CUDA_ON=0"
            cuda_on = False
    spec = {"device": check.device.type, "ckpts": ckpts, "prefill_tokens": check.prefill_tokens,
            "steps": check.steps, "batch": args.batch, "repeat": check.repeat,
            "result": str(check.work / "peer_result.json")}
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="1" if cuda_on else "0")
    rc = run_logged([sys.executable, str(ENTRY_SCRIPT), "--peer-worker", json.dumps(spec)],
                    check.log, timeout=check.left() - 10, env=env, cwd=check.work)
    result_path = Path(spec["result"])
    if not result_path.is_file():
        raise RuntimeError(f"the peer worker wrote no result (rc {rc})")
    peer = json.loads(result_path.read_text())
    b = args.batch
    for name, fig in peer.get("shapes", {}).items():
        eng = check.ctx["bench"].get(name, {})
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


def peer_fla(check) -> dict:
    if check.args.no_peer:
        raise Skip("--no-peer")
    if importlib.util.find_spec("fla") is None:
        raise Skip("not installed (flash-linear-attention)")
    check.require_cuda()
    check.need("peer_fla")
    return fla_decode(check.device, *check.shapes[REPLAY_SHAPE], check.steps, check.args.batch)


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
            t = min(timed(run, device) for _ in range(3))
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
        from importlib import metadata

        import torch

        from rwkv_engine.cli.bench import peer_speed
        import rwkv
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
