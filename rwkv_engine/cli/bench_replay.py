"""Keystroke replay over a real source file, through the real completion pipeline.

Scenario (deterministic): open the file with the cursor on a line inside it, then
  1. cold request (everything prefilled),
  2. retype --lines lines character by character (one request per keystroke),
     pressing Enter between lines,
  3. accept the best suggestion's first line once per typed line (speculative
     continuation: the next request starts from the state after the accepted text),
  4. move the cursor down and up line by line (one request per move).
Reported per kind of event: tokens re-fed (prefilled) per request, latency p50/p95
and the time to the first streamed suggestion text.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Optional


def _pct(values, q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return float(values[min(len(values) - 1, int(round(q * (len(values) - 1))))])


def default_replay_file() -> str:
    import json
    return os.path.join(os.path.dirname(json.__file__), "decoder.py")


def _pick_start(lines, want_lines: int) -> int:
    """A line in the middle of the file with `want_lines` non-blank lines after it."""
    start = len(lines) // 2
    for i in range(start, len(lines) - want_lines):
        if all(lines[j].strip() for j in range(i, i + want_lines)):
            return i
    return min(start, max(0, len(lines) - want_lines - 1))


class _Session:
    def __init__(self, completer, path: str, lines):
        self.c = completer
        self.path = path
        self.lines = list(lines)
        self.tick = 0
        self.events = []            # (kind, stats, ms_first)

    def request(self, kind: str, row: int, col: int) -> Optional[dict]:
        self.tick += 1
        first = max(0, row - self.c.config.n_prefix)
        last = min(len(self.lines), row + self.c.config.n_suffix + 1)
        req = {"id": self.tick, "buf": 1, "tick": self.tick, "filename": self.path,
               "filetype": "python", "lines": self.lines[first:last], "first": first,
               "row": row, "col": col}
        t0 = time.perf_counter()
        first_ms = []

        def on_partial(text):
            if text.strip() and not first_ms:
                first_ms.append((time.perf_counter() - t0) * 1000)
        res = self.c.complete(req, on_partial=on_partial)
        if res is not None:
            total = res["stats"]["ms_total"]
            self.events.append((kind, res["stats"], first_ms[0] if first_ms else total))
        return res


def replay(model, path: Optional[str] = None, n_lines: int = 6, config=None) -> dict:
    from ..pipeline.completer import Completer
    from ..pipeline.config import EngineConfig

    path = path or default_replay_file()
    with open(path, encoding="utf-8", errors="replace") as fh:
        original = fh.read().splitlines()
    cfg = config or EngineConfig(cache_dir=os.path.join(os.path.expanduser("~"), ".cache",
                                                         "rwkv.nvim", "bench"))
    completer = Completer(cfg, model=model)
    start = _pick_start(original, n_lines)
    typed = original[start:start + n_lines]
    s = _Session(completer, path, original[:start] + [""] + original[start + n_lines:])
    s.request("cold", start, 0)
    row = start
    for li, target in enumerate(typed):
        indent = len(target) - len(target.lstrip())
        s.lines[row] = target[:indent]
        for col in range(indent, len(target) + 1):
            s.lines[row] = target[:col]
            res = s.request("keystroke", row, len(target[:col].encode("utf-8")))
        # accept the first line of the best suggestion once per line, then continue
        if res and res["candidates"]:
            text = res["candidates"][0]["text"].split("\n")[0]
            if text:
                completer.accept(res["id"], text)
                s.lines[row] = target + text
                s.request("after_accept", row, len(s.lines[row].encode("utf-8")))
                s.lines[row] = target
        if li < len(typed) - 1:          # Enter: a new line below
            row += 1
            s.lines.insert(row, "")
            s.request("newline", row, 0)
    for _ in range(3):
        row += 1
        s.request("move_line", row, 0)
    for _ in range(3):
        row -= 1
        s.request("move_line", row, 0)

    out = {"file": path, "typed_lines": len(typed), "requests": len(s.events)}
    for kind in ("cold", "keystroke", "after_accept", "newline", "move_line"):
        ev = [e for e in s.events if e[0] == kind]
        if not ev:
            continue
        fed = [e[1]["prefilled_tokens"] for e in ev]
        ms = [e[1]["ms_total"] for e in ev]
        first = [e[2] for e in ev]
        out[kind] = {
            "n": len(ev),
            "refed_tokens_p50": _pct(fed, 0.5), "refed_tokens_max": max(fed),
            "refed_tokens_mean": round(statistics.mean(fed), 2),
            "ms_first_p50": round(_pct(first, 0.5), 1), "ms_first_p95": round(_pct(first, 0.95), 1),
            "ms_total_p50": round(_pct(ms, 0.5), 1), "ms_total_p95": round(_pct(ms, 0.95), 1),
            "ms_first_lines_p50": round(_pct([e[1].get("ms_first_lines", e[1]["ms_total"]) for e in ev], 0.5), 1),
            "decoded_tokens_mean": round(statistics.mean(e[1]["decoded_tokens"] for e in ev), 1),
        }
    out["cache"] = completer.cache_stats()
    return out


def _summary(events, kind: str) -> dict:
    ev = [e for e in events if e[0] == kind]
    if not ev:
        return {}
    fed = [e[1]["prefilled_tokens"] for e in ev]
    first = [e[2] for e in ev]
    ms = [e[1]["ms_total"] for e in ev]
    return {"n": len(ev), "refed_tokens_p50": _pct(fed, 0.5), "refed_tokens_max": max(fed),
            "refed_tokens_mean": round(statistics.mean(fed), 2),
            "ms_prefill_p50": round(_pct([e[1]["ms_prefill"] for e in ev], 0.5), 1),
            "ms_first_p50": round(_pct(first, 0.5), 1), "ms_first_p95": round(_pct(first, 0.95), 1),
            "ms_total_p50": round(_pct(ms, 0.5), 1)}


def replay_moves(model, path: Optional[str] = None, n_moves: int = 8, idle: bool = False,
                 config=None) -> dict:
    """Line moves only: a cold request in the middle of ``path`` (cursor at column 0),
    then ``n_moves`` one-line moves down, a jump to the line above the start and
    ``n_moves`` one-line moves up from there (every move lands on a line not visited
    before), one request each.
    ``idle``: between requests the editor is idle long enough for the completer's idle
    priming (``prime_step`` until it has nothing left to do; its time is reported
    apart, under "idle"), as after a CursorHoldI."""
    from ..pipeline.completer import Completer
    from ..pipeline.config import EngineConfig

    path = path or default_replay_file()
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().splitlines()
    cfg = config or EngineConfig(cache_disk_mb=0)
    completer = Completer(cfg, model=model)
    s = _Session(completer, path, lines)
    start = max(n_moves + 2, _pick_start(lines, 2 * n_moves + 1))
    idle_ms, idle_fed = [], []

    def go(kind: str, row: int) -> None:
        s.request(kind, row, 0)
        if idle:
            t0, fed = time.perf_counter(), 0
            while completer.prime_step():
                fed += completer.last_prime.get("prefilled_tokens") or 0
            idle_ms.append((time.perf_counter() - t0) * 1000)
            idle_fed.append(fed)

    row = start
    go("cold", row)
    for _ in range(n_moves):
        row += 1
        go("move_down", row)
    row = start - 1                      # a jump above the start, then up over rows not seen yet
    go("jump", row)
    for _ in range(n_moves):
        row -= 1
        go("move_up", row)
    speed = completer.prefiller.speed.tokens_per_s()
    out = {"file": path, "start_row": start, "idle": idle, "requests": len(s.events),
           "near_prefix": cfg.near_prefix, "near_suffix": cfg.near_suffix,
           "fim_window_ms": cfg.fim_window_ms, "window_tokens": completer.builder.window_tokens,
           "prefill_tok_s_measured": round(speed, 1) if speed else None}
    for kind in ("cold", "move_down", "move_up"):
        out[kind] = _summary(s.events, kind)
    out["jump"] = _summary(s.events, "jump")
    s.events = [("move_line", e[1], e[2]) for e in s.events if e[0] in ("move_down", "move_up")]
    out["move_line"] = _summary(s.events, "move_line")
    if idle:
        out["idle"] = {"ms_p50": round(_pct(idle_ms, 0.5), 1), "ms_max": round(max(idle_ms), 1),
                       "prefilled_tokens_p50": _pct(idle_fed, 0.5)}
    out["cache"] = completer.cache_stats()
    return out


def main(argv=None) -> int:
    """``python -m rwkv_engine.cli.bench_replay --model M [--moves N] [--idle] [--json]``"""
    import argparse
    import json

    from ..pipeline.config import EngineConfig
    from ..pipeline.loading import load_configured_model

    p = argparse.ArgumentParser(prog="python -m rwkv_engine.cli.bench_replay",
                                description="line-move replay through the completion pipeline")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="auto", help="auto (default): what the plugin runs on this CPU")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--file", help="source file (default: a stdlib module)")
    p.add_argument("--moves", type=int, default=8, help="one-line moves down, then as many up")
    p.add_argument("--idle", action="store_true", help="idle priming between requests")
    p.add_argument("--near-prefix", type=int)
    p.add_argument("--near-suffix", type=int)
    p.add_argument("--fim-window-ms", type=int, help="engine option fim_window_ms (0: the fixed window)")
    p.add_argument("--time-budget-ms", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    kw = {"cache_disk_mb": 0, "time_budget_ms": a.time_budget_ms}
    if a.near_prefix is not None:
        kw["near_prefix"] = a.near_prefix
    if a.near_suffix is not None:
        kw["near_suffix"] = a.near_suffix
    if a.fim_window_ms is not None:
        kw["fim_window_ms"] = a.fim_window_ms
    model = load_configured_model(EngineConfig(model=a.model, device="cpu", dtype=a.dtype, threads=a.threads))
    out = replay_moves(model, a.file, a.moves, a.idle, EngineConfig(**kw))
    out.update({"model": a.model, "dtype": model.precision["mode"], "threads": a.threads})
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for k, v in out.items():
            print(f"{k:12} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
