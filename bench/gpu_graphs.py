#!/usr/bin/env python3
"""CUDA-graph decode on the GPU (issue 25, section 2): graph against eager, then speed.

Writes ``graphs.json`` into --out after every step (a run killed at its limit keeps what
it measured). Steps:

  check      random trained-like weights of the 1.5B shape (24 x 2048, fp16, drawn on the
             GPU), rows B in 1, 3 (padded to 4), 8 from one warm state: 16 greedy steps
             eager, then the same with graphs; max relative logit error (fp16 tolerance
             2e-2), same greedy tokens, capture seconds
  bench      ms per decode step, graphs off and on, B = 1 and 8 (CUDA events, best of
             --repeat); b1 as a fraction of the weight-bytes / copy-bandwidth limit
  replay     the keystroke replay (rwkv_engine/cli/bench_replay.py) with graphs on, if time is left

``--device cpu --tiny`` runs the same steps on a 2 x 128 model on the CPU with the
replay backend (rwkv_engine/core/cuda_graph.py ReplayBackend): the plumbing, not the speed.
Run by bench/gpu_session.py; alone: ``python3 bench/gpu_graphs.py --out DIR``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_graphs_out")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget", type=float, default=75.0, help="seconds for all steps")
    ap.add_argument("--steps", type=int, default=0, help="decode steps per timing (default 64, tiny 3)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-replay", action="store_true")
    args = ap.parse_args(argv)
    from gpu_check.plumbing import ensure_engine, one_line
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    res: dict = {"tiny": args.tiny, "device": args.device, "steps": {}}

    def write():
        res["elapsed_seconds"] = round(time.monotonic() - t0, 1)
        tmp = out / "graphs.json.tmp"
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, out / "graphs.json")

    def step(name, fn, need=0.0):
        left = args.budget - (time.monotonic() - t0)
        if left < need:
            res["steps"][name] = {"status": "skipped", "error": f"time budget: {left:.0f} s left, needs ~{need:.0f}"}
        else:
            s0 = time.perf_counter()
            try:
                res["steps"][name] = {"status": "ok", **(fn() or {})}
            except Exception as e:  # noqa: BLE001 - each step on its own
                traceback.print_exc()
                res["steps"][name] = {"status": "failed", "error": one_line(e)}
            res["steps"][name]["seconds"] = round(time.perf_counter() - s0, 2)
        print(f"gpu_graphs {name}: {json.dumps(res['steps'][name])[:600]}", flush=True)
        write()

    res["engine_import"] = ensure_engine()
    import torch

    from rwkv_engine.core.random_checkpoint import make_state_dict
    from rwkv_engine.core.checkpoint import infer_shape
    from rwkv_engine.core.cuda_graph import ReplayBackend
    from rwkv_engine.core.model import RWKV7
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        res["error"] = "no CUDA"
        write()
        return 1
    L, C = (2, 128) if args.tiny else (24, 2048)
    n_steps = args.steps or (3 if args.tiny else 64)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    sd = make_state_dict(n_layer=L, n_embd=C, seed=1, dtype=dtype, device=dev, trained_like=True)
    shape, _ = infer_shape(sd, Path("<random 1.5b>"))
    model = RWKV7(sd, shape, device=dev, dtype=dtype if dev.type == "cuda" else None,
                  use_kernel=dev.type == "cuda", fused=False)
    del sd
    res.update(n_layer=L, n_embd=C, dtype=str(dtype).replace("torch.", ""), weight_bytes=model.weight_bytes())
    backend = None if dev.type == "cuda" else ReplayBackend()
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def warm(rows):
        g = torch.Generator().manual_seed(rows)
        prompt = torch.randint(1, shape.vocab_size, (rows, 32), generator=g)
        logits, state = model.forward(prompt, model.new_state(rows))
        return logits.argmax(-1, keepdim=True), state

    def greedy(tok, state, n):
        toks, logs = [], []
        for _ in range(n):
            logits, state = model.forward(tok, state)
            tok = logits.argmax(-1, keepdim=True)
            toks.append(tok)
            logs.append(logits.float())
        return torch.cat(toks, 1), torch.stack(logs, 1)

    def check():
        rows_out = {}
        for rows in (1, 3, 8):
            tok, state = warm(rows)
            model.disable_cuda_graphs()
            want_t, want_l = greedy(tok, state, 16)
            graphs = model.enable_cuda_graphs(backend=backend)
            c0 = time.perf_counter()
            graphs.capture_all() if rows == 1 else None
            sync()
            cap_s = time.perf_counter() - c0
            got_t, got_l = greedy(tok, state, 16)
            rel = float(((got_l - want_l).abs().amax(-1) / want_l.abs().amax(-1)).max())
            rows_out[str(rows)] = {"max_rel_err": rel, "same_greedy_tokens": bool(torch.equal(got_t, want_t)),
                                   "info": graphs.info(), **({"capture_all_seconds": round(cap_s, 3)} if rows == 1 else {})}
        ok = all(r["max_rel_err"] < 2e-2 and r["same_greedy_tokens"] and not r["info"]["disabled"]
                 for r in rows_out.values())
        return {"rows": rows_out, "passed": ok, "tolerance": 2e-2}

    def timed(rows, graphs_on):
        tok, state = warm(rows)
        if graphs_on:
            model.enable_cuda_graphs(backend=backend)
        else:
            model.disable_cuda_graphs()

        def run():
            s, t = state, tok
            for _ in range(n_steps):
                logits, s = model.forward(t, s)
            return logits
        run()
        best = float("inf")
        for _ in range(args.repeat):
            sync()
            s0 = time.perf_counter()
            run()
            sync()
            best = min(best, time.perf_counter() - s0)
        return 1e3 * best / n_steps

    def bench():
        figs = {}
        for rows in (1, 8):
            for on in (False, True):
                figs[f"b{rows}_{'graph' if on else 'eager'}_ms_per_step"] = round(timed(rows, on), 4)
        for rows in (1, 8):
            figs[f"b{rows}_graph_speedup"] = round(figs[f"b{rows}_eager_ms_per_step"] / figs[f"b{rows}_graph_ms_per_step"], 3)
        figs["b8_over_b1_graph_step"] = round(figs["b8_graph_ms_per_step"] / figs["b1_graph_ms_per_step"], 3)
        n = (1 << 30) if dev.type == "cuda" else (16 << 20)
        a = torch.ones(n, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        b.copy_(a)
        sync()
        s0 = time.perf_counter()
        for _ in range(5):
            b.copy_(a)
        sync()
        bw = 2 * n * 5 / (time.perf_counter() - s0)
        del a, b
        limit_ms = res["weight_bytes"] / bw * 1e3
        figs.update(copy_GBps=round(bw / 1e9, 1), bw_limit_ms_per_step=round(limit_ms, 4),
                    b1_graph_fraction_of_bw_limit=round(limit_ms / figs["b1_graph_ms_per_step"], 4),
                    b1_eager_fraction_of_bw_limit=round(limit_ms / figs["b1_eager_ms_per_step"], 4))
        return figs

    def replay():
        from rwkv_engine.cli.bench_replay import replay as run_replay
        from rwkv_engine.pipeline.config import EngineConfig
        model.enable_cuda_graphs(backend=backend).capture_all()     # as loading does
        cfg = EngineConfig(device=dev.type, cache_dir=tempfile.mkdtemp(prefix="rwkv-graphs-replay-"), candidates=4,
                           max_lines=1, max_tokens=4 if args.tiny else 24, cuda_graphs=True)
        r = run_replay(model, None, 1 if args.tiny else 3, config=cfg)
        ks = r.get("keystroke", {})
        return {"first_text_ms_p50": ks.get("ms_first_p50"), "all_candidates_ms_p50": ks.get("ms_total_p50"),
                "graphs": model.graphs.info(), "replay": r}

    step("check", check, 0 if args.tiny else 15)
    step("bench", bench, 0 if args.tiny else 15)
    if not args.no_replay:
        step("replay", replay, 0 if args.tiny else 30)
    res["passed"] = res["steps"]["check"].get("passed", False)
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
