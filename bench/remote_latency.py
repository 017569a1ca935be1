#!/usr/bin/env python3
"""Keystroke -> first ghost text: the remote backend (llama-server on loopback) against the
local engine, on the same random checkpoint.

    python bench/remote_latency.py                      # 0.1B shape: 12 layers x 768
    python bench/remote_latency.py --layers 4 --embd 256 --lines 2 --json

Writes a random RWKV-7 checkpoint (rwkv_engine/core/random_checkpoint.py, trained_like) or takes
``--model``, exports it to an f32 GGUF (``rwkv-nvim export-gguf``), and replays the same
typing session (rwkv_engine/cli/bench_replay.py's scenario: a cold request, retyping ``--lines``
lines of a real file character by character with Enter between them, then the cursor one
line down and up, three times each) through

  * ``local``:  Completer, the in-process engine (fp32, CPU, ``--threads`` torch threads);
  * ``remote``: server_backend (llama-server protocol) -> llama-server (bench/llama_cpp.py's cached CPU build,
    ``-np`` = candidates, ``-t`` = ``--threads``), one after the other (never at once).

Per kind of event: time from the request to the first streamed text (what the ghost text
waits for) p50/p95, to all candidates, and the prompt tokens re-processed per request
(local: prefilled tokens; remote: the server's ``timings.prompt_n``, with ``cache_n``
reused). Random weights never end a candidate early, so every request decodes
``--max-tokens`` tokens per candidate (or until ``time_budget_ms``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pct(values, q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return float(values[min(len(values) - 1, int(round(q * (len(values) - 1))))])


def session(completer, path: str, original, n_lines: int, n_prefix: int, n_suffix: int) -> list:
    """The replay scenario; returns [(kind, stats, ms_first, ms_total)]."""
    from rwkv_engine.cli.bench_replay import _pick_start
    events = []
    start = _pick_start(original, n_lines)
    typed = original[start:start + n_lines]
    lines = original[:start] + [""] + original[start + n_lines:]
    tick = [0]

    def request(kind: str, row: int, col: int) -> None:
        tick[0] += 1
        first = max(0, row - n_prefix)
        last = min(len(lines), row + n_suffix + 1)
        req = {"id": tick[0], "buf": 1, "tick": tick[0], "filename": path, "filetype": "python",
               "lines": lines[first:last], "first": first, "row": row, "col": col}
        t0 = time.perf_counter()
        first_ms = []

        def on_partial(text):
            if text.strip() and not first_ms:
                first_ms.append((time.perf_counter() - t0) * 1000)

        res = completer.complete(req, on_partial=on_partial)
        total = (time.perf_counter() - t0) * 1000
        events.append((kind, res["stats"], first_ms[0] if first_ms else total, total))

    request("cold", start, 0)
    row = start
    for li, target in enumerate(typed):
        indent = len(target) - len(target.lstrip())
        for col in range(indent, len(target) + 1):
            lines[row] = target[:col]
            request("keystroke", row, len(target[:col].encode("utf-8")))
        if li < len(typed) - 1:
            row += 1
            lines.insert(row, "")
            request("newline", row, 0)
    for step in (1, 1, 1, -1, -1, -1):
        row += step
        request("move_line", row, 0)
    return events


def summary(events) -> dict:
    out = {}
    for kind in ("cold", "keystroke", "newline", "move_line"):
        ev = [e for e in events if e[0] == kind]
        if not ev:
            continue
        fed = [e[1]["prefilled_tokens"] for e in ev]
        reused = [e[1]["reused_tokens"] for e in ev]
        first = [e[2] for e in ev]
        total = [e[3] for e in ev]
        out[kind] = {"n": len(ev),
                     "ms_first_p50": round(pct(first, 0.5), 1), "ms_first_p95": round(pct(first, 0.95), 1),
                     "ms_all_p50": round(pct(total, 0.5), 1), "ms_all_p95": round(pct(total, 0.95), 1),
                     "refed_p50": pct(fed, 0.5), "refed_max": max(fed),
                     "refed_mean": round(statistics.mean(fed), 2),
                     "reused_p50": pct(reused, 0.5)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an RWKV-7 .pth (default: a random checkpoint of --layers x --embd)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--file", help="the file to retype (default: json/decoder.py of this Python)")
    ap.add_argument("--lines", type=int, default=3, help="lines retyped character by character")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("local", "remote"), help="run one backend only")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from rwkv_engine.core.random_checkpoint import make_state_dict
    from rwkv_engine.cli.bench_replay import default_replay_file
    from rwkv_engine.core.gguf_export import export_gguf
    from rwkv_engine.pipeline.config import EngineConfig
    lc = _load("rwkv_bench_llama_cpp", ROOT / "bench" / "llama_cpp.py")

    tmp = Path(tempfile.mkdtemp(prefix="rwkv-remote-bench-"))
    ckpt = Path(a.model) if a.model else tmp / "model.pth"
    if not a.model:
        torch.save(make_state_dict(n_layer=a.layers, n_embd=a.embd, seed=3, trained_like=True), str(ckpt))
    path = a.file or default_replay_file()
    with open(path, encoding="utf-8", errors="replace") as fh:
        original = fh.read().splitlines()
    common = dict(candidates=a.candidates, max_tokens=a.max_tokens, temperature=1.0, time_budget_ms=1000,
                  cache_dir=str(tmp / "cache"), cache_disk_mb=0, threads=a.threads)
    results = {"model": str(ckpt) if a.model else f"random {a.layers} x {a.embd}", "file": path,
               "lines": a.lines, "candidates": a.candidates, "max_tokens": a.max_tokens,
               "threads": a.threads, "load_average": os.getloadavg()[0]}

    if a.only in (None, "local"):
        import rwkv_engine
        from rwkv_engine.pipeline.completer import Completer
        cfg = EngineConfig(**common)
        local = Completer(cfg, model=rwkv_engine.load_model(ckpt, device="cpu"))
        ev = session(local, path, original, a.lines, cfg.n_prefix, cfg.n_suffix)
        results["local"] = summary(ev)
        del local

    if a.only in (None, "remote"):
        from rwkv_engine.pipeline.remote_backend import server_backend
        gguf_path = tmp / "model-f32.gguf"
        export_gguf(ckpt, gguf_path, "f32")
        bins = lc.build(log=lambda m: print(m, file=sys.stderr))
        with lc.Server(gguf_path, bins=bins, ctx=16384, threads=a.threads,
                       extra=["-np", str(a.candidates)]) as srv:
            cfg = EngineConfig(backend="llama.cpp", url=srv.url, timeout_first_byte_ms=120_000,
                               timeout_total_ms=300_000, **common)
            remote = server_backend(cfg)
            ev = session(remote, path, original, a.lines, cfg.n_prefix, cfg.n_suffix)
            results["remote"] = summary(ev)
            results["remote_server"] = {k: remote.server.get(k) for k in ("fim", "ids", "slots")}
            remote.close()
    results["load_average_after"] = os.getloadavg()[0]
    shutil.rmtree(tmp, ignore_errors=True)              # the checkpoint and the GGUF (GBs at 0.1B)

    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{results['model']}, {a.candidates} candidates x {a.max_tokens} tokens, {a.threads} threads, "
          f"load average {results['load_average']:.1f} -> {results['load_average_after']:.1f}")
    print("| backend | event | n | first text p50 / p95 | all candidates p50 / p95 | tokens re-processed p50 / max | reused p50 |")
    print("|---|---|---|---|---|---|---|")
    for backend in ("local", "remote"):
        for kind, s in results.get(backend, {}).items():
            print(f"| {backend} | {kind} | {s['n']} | {s['ms_first_p50']} / {s['ms_first_p95']} ms | "
                  f"{s['ms_all_p50']} / {s['ms_all_p95']} ms | {s['refed_p50']:g} / {s['refed_max']} | "
                  f"{s['reused_p50']:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
