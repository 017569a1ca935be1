"""`rwkv-nvim bench`: raw engine speed against a peer, plus the keystroke replay.

Peers (``--peer``): ``rwkv`` (default), the `rwkv` pip package in this process; or
``llama.cpp``, its CPU tools on GGUFs exported from the same checkpoint, with our fp32 and
int8 modes beside llama.cpp's f32 / Q8_0 / Q4_0 (bench/llamacpp_peer/side_by_side.py of the checkout).

Raw figures (same process, same checkpoint, best of --repeat runs):
  prefill tok/s (B=1, T=--prefill-tokens), batch-1 decode tok/s, batch-8 decode
  aggregate tok/s. The `rwkv` package's RWKV_x070 has no batched decode, so its
  batch-8 figure is 8 sequential single-row steps.
The replay (rwkv_engine.cli.bench_replay) types a real source file through the completion
pipeline and reports tokens re-fed per keystroke and latency p50/p95.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--model", help="checkpoint path or short name (default: the bundled default model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="auto", help="fp16/bf16 on cuda; fp32, int8, q4 or q4a8 on cpu; auto (default): what the "
                        "plugin runs (on the CPU: the mode measured fastest for this CPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default: as the plugin, engine option `threads` = 0; "
                        "2 with --peer llama.cpp, for both sides)")
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="rows of the batched decode (default 8)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure, best kept")
    p.add_argument("--peer", choices=["rwkv", "llama.cpp"], default="rwkv",
                   help="what to compare with: the rwkv pip package (default) or llama.cpp "
                        "(built into ~/.cache/rwkv.nvim/llama.cpp if needed; no replay)")
    p.add_argument("--no-peer", action="store_true", help="skip the rwkv package comparison")
    p.add_argument("--no-replay", action="store_true", help="skip the keystroke replay")
    p.add_argument("--replay-file", help="source file typed by the replay (default: a stdlib module)")
    p.add_argument("--replay-lines", type=int, default=6, help="lines typed char by char in the replay")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("--peer llama.cpp")
    g.add_argument("--rows", default="1,4,8",
                   help="row counts of the aggregate decode figures (default 1,4,8)")
    g.add_argument("--modes", default="fp32,int8", help="our CPU modes (default fp32,int8; q4 and q4a8 also run)")
    g.add_argument("--gguf-types", default="f32,q8_0,q4_0",
                   help="llama.cpp GGUF types (default f32,q8_0,q4_0; f32 is always exported)")
    g.add_argument("--check-tokens", type=int, default=32,
                   help="greedy tokens compared on the f32 GGUF (default 32)")
    g.add_argument("--kl-positions", type=int, default=64, help="positions of the KL figures (default 64)")
    g.add_argument("--kl-context", type=int, default=64,
                   help="tokens before the first KL position; also the greedy check's prompt (default 64)")
    g.add_argument("--kl-top", type=int, default=256,
                   help="top-K log-probabilities llama-server returns per position (default 256)")
    g.add_argument("--work", help="keep the GGUF files in this directory (default: a temp dir, removed)")
    g.add_argument("--jobs", type=int, default=2, help="make jobs if llama.cpp must be built (default 2)")


def _llama_cpp_side_by_side():
    """bench/llamacpp_peer/side_by_side.py of the source checkout: building and driving
    llama.cpp is developer tooling, not part of the installed package."""
    bench_dir = Path(__file__).resolve().parents[2] / "bench"
    if not (bench_dir / "llamacpp_peer" / "side_by_side.py").is_file():
        raise ValueError("--peer llama.cpp runs the llama.cpp tooling of the plugin's source checkout "
                         f"(bench/llamacpp_peer), not found beside this package ({bench_dir})")
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    from llamacpp_peer import side_by_side
    return side_by_side


def _best(fn, repeat: int) -> float:
    """Fastest wall time of ``repeat`` runs of fn() (seconds), after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _speeds(prefill, decode, prefill_tokens: int, steps: int, batch: int, repeat: int) -> dict:
    """Figures from ``prefill()`` (one prompt) and ``decode(rows)`` (a callable running
    ``steps`` decode steps for ``rows`` rows)."""
    t_prefill = _best(prefill, repeat)
    t_b1 = _best(decode(1), repeat)
    t_bn = _best(decode(batch), repeat)
    return {
        "prefill_tok_s": prefill_tokens / t_prefill,
        "decode_b1_tok_s": steps / t_b1,
        "decode_b1_ms_per_step": 1000 * t_b1 / steps,
        f"decode_b{batch}_tok_s": batch * steps / t_bn,
        f"decode_b{batch}_ms_per_step": 1000 * t_bn / steps,
    }


def engine_speed(model, prefill_tokens: int, steps: int, batch: int, repeat: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    V = model.shape.vocab_size
    dev = model.device
    prompt = torch.randint(257, V, (1, prefill_tokens), generator=g).to(dev)   # [1, T]

    def prefill():
        model.forward(prompt, model.new_state(1))
        _sync(dev)

    def decode(rows):
        _, state = model.forward(prompt[:, :8].expand(rows, 8), model.new_state(rows))
        tok = torch.randint(257, V, (rows, 1), generator=g).to(dev)             # [rows, 1]

        def run():
            s = state
            for _ in range(steps):
                _, s = model.forward(tok, s)
            _sync(dev)
        return run

    return _speeds(prefill, decode, prefill_tokens, steps, batch, repeat)


def peer_speed(path, device: str, prefill_tokens: int, steps: int, batch: int, repeat: int) -> dict:
    """The same figures for the `rwkv` package (RWKV_x070, strategy '<device> fp32|fp16')."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_CUDA_ON", "1" if device == "cuda" else "0")
    import contextlib
    import io

    import torch
    with contextlib.redirect_stdout(io.StringIO()):
        from rwkv.model import RWKV
        strategy = "cuda fp16" if device == "cuda" else "cpu fp32"
        peer = RWKV(model=str(path)[:-4] if str(path).endswith(".pth") else str(path), strategy=strategy)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(257, peer.args.vocab_size, (prefill_tokens,), generator=g).tolist()
    dev = torch.device(device)

    def prefill():
        peer.forward(prompt, None)
        _sync(dev)

    def decode(rows):
        # no batched decode in the package: N candidates are N sequential single-row runs
        _, state = peer.forward(prompt[:8], None)

        def run():
            for _ in range(rows):
                s = [t.clone() for t in state]
                for _ in range(steps):
                    _, s = peer.forward([1234], s)
            _sync(dev)
        return run

    return _speeds(prefill, decode, prefill_tokens, steps, batch, repeat)


def read_bandwidth_gbs(mb: int = 256, repeat: int = 5) -> float:
    """The memory read rate torch reaches on this machine now (GB/s): the best of
    ``repeat`` sums over a ``mb`` MB fp32 tensor, with the current thread count. The
    yardstick for a one-row decode step, which streams every weight once."""
    import torch

    t = torch.ones(mb * 2**20 // 4)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return t.numel() * 4 / best / 1e9


def _machine(device) -> dict:
    import torch
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args) -> int:
    if getattr(args, "peer", "rwkv") == "llama.cpp":
        return _llama_cpp_side_by_side().run(args)
    import torch

    from ..pipeline.loading import load_configured_model, resolve_model_path
    from ..pipeline.config import EngineConfig

    path = resolve_model_path(EngineConfig(model=args.model))
    # loaded as the plugin loads it: dtype "auto" measured per CPU, threads, GC settled
    model = load_configured_model(EngineConfig(model=str(path), device=args.device, dtype=args.dtype,
                                               threads=args.threads))
    dev = model.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "rwkv-nvim " + " ".join(sys.argv[1:]),
        "machine": _machine(dev),
        "model": {"path": str(path), "n_layer": model.shape.n_layer, "n_embd": model.shape.n_embd,
                  "vocab": model.shape.vocab_size, "dtype": model.quant or str(model.dtype).replace("torch.", ""),
                  "device": str(dev)},
        "engine": engine_speed(model, args.prefill_tokens, args.decode_steps, args.batch, args.repeat),
    }
    if not args.no_peer:
        try:
            result["peer"] = peer_speed(path, dev.type, args.prefill_tokens, args.decode_steps,
                                        args.batch, args.repeat)
            result["speedup"] = {k: result["engine"][k] / result["peer"][k]
                                 for k in result["engine"] if k.endswith("tok_s")}
        except ImportError:
            result["peer"] = {"error": "the rwkv package is not installed (pip install rwkv==0.8.32)"}
    if not args.no_replay:
        from .bench_replay import replay
        result["replay"] = replay(model, args.replay_file, args.replay_lines)
    result["memory"] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type == "cuda":
        result["memory"]["vram_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_table(result)
    return 0


def _print_table(r: dict) -> None:
    m = r["model"]
    print(f"model  {m['path']}  ({m['n_layer']}x{m['n_embd']}, vocab {m['vocab']}, {m['dtype']}, {m['device']})")
    print(f"machine {r['machine']}")
    peer = r.get("peer", {})
    print(f"{'figure':28} {'rwkv.nvim':>12} {'rwkv pkg':>12} {'ratio':>7}")
    for k, v in r["engine"].items():
        pv = peer.get(k)
        ratio = f"{v / pv:6.2f}x" if isinstance(pv, float) and k.endswith("tok_s") else ""
        print(f"{k:28} {v:12.1f} {pv if pv is None else round(pv, 1)!s:>12} {ratio:>7}")
    if "error" in peer:
        print(f"peer: {peer['error']}")
    for k, v in r.get("replay", {}).items():
        print(f"replay {k:21} {v}")
    print(f"peak RSS {r['memory']['peak_rss_mb']:.0f} MB"
          + (f", VRAM {r['memory']['vram_peak_mb']:.0f} MB" if "vram_peak_mb" in r["memory"] else ""))
