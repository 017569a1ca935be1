"""`rwkv-nvim eval`: fill-in-the-middle line tasks on held-out source files.

Task: a non-blank line whose text was removed, with the cursor in it at one of several
positions: column 0 of the emptied line ("col0"), after its indentation ("indent"),
or after 1..5 characters of its text typed ("typed1".."typed5"). The prompt is the
completion pipeline's FIM layout (PromptBuilder: far prefix, ``✿prefix✿✿suffix✿`` near
suffix ``✿middle✿`` near prefix), with token healing at the cursor or without it. The
model decodes a greedy candidate and N sampled candidates with the plugin's own
candidate decoder (``pipeline.candidates.decode_candidates``, what users get); a task
passes when the typed text + the first line of a candidate, right-stripped, equals the
removed line.

Reported: pass@1 (greedy), pass@N (any of the N sampled), pass@1+N (greedy or any
sampled) at column 0 with healing (the headline figures), the same per position with
and without healing (``positions``), and the baselines "repeat the previous line" /
"repeat the previous non-blank line".
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from ..pipeline.loading import DEFAULT_MODEL



@dataclass
class LineTask:
    path: str
    lines: List[str]      # the file's lines with line ``row`` emptied
    row: int
    target: str           # the removed line, right-stripped
    indent: int           # characters of its indentation
    prev_line: str
    prev_nonblank: str


def make_tasks(paths: Sequence[str], n_tasks: int, seed: int, near_suffix: int = 8) -> List[LineTask]:
    """Seeded, uniform over eligible lines: non-blank, not the first line, with some
    non-blank text in the ``near_suffix`` lines below (so the prompt is FIM)."""
    candidates = []
    files = {}
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read held-out file {p}: {e}") from None
        lines = text.replace("\r\n", "\n").split("\n")
        files[p] = lines
        for r in range(1, len(lines)):
            if lines[r].strip() and any(ln.strip() for ln in lines[r + 1:r + 1 + near_suffix]):
                candidates.append((p, r))
    if not candidates:
        raise ValueError("no eligible lines in the held-out files")
    rng = random.Random(seed)
    picked = rng.sample(candidates, min(n_tasks, len(candidates)))
    tasks = []
    for p, r in picked:
        lines = list(files[p])
        target = lines[r].rstrip()
        lines[r] = ""
        prev_nb = next((ln for ln in reversed(lines[:r]) if ln.strip()), "")
        indent = len(target) - len(target.lstrip())
        tasks.append(LineTask(p, lines, r, target, indent, lines[r - 1].rstrip(), prev_nb.rstrip()))
    return tasks


POSITIONS = ("col0", "indent", "typed1", "typed2", "typed3", "typed4", "typed5")


def typed_text(task: LineTask, position: str) -> Optional[str]:
    """What the cursor line holds at ``position`` (None when the line is too short)."""
    if position == "col0":
        return ""
    k = 0 if position == "indent" else int(position[len("typed"):])
    if task.indent + k >= len(task.target):
        return None                      # nothing would be left to complete
    return task.target[:task.indent + k]


def _first_lines(model, state, logits, n: int, params, seeds, max_tokens: int, heal: bytes) -> List[str]:
    """First lines of ``n`` candidates decoded by the plugin's own decoder
    (``pipeline.candidates.decode_candidates``: same sampler, stops, healing and streaming)."""
    from ..pipeline.candidates import StopRules, decode_candidates

    rows = decode_candidates(model, state, logits, n, params, seeds,
                             StopRules(max_tokens=max_tokens, max_lines=1), heal=heal)
    return [r.text.split("\n")[0].rstrip() for r in rows]


def evaluate(model, tasks: Sequence[LineTask], n_samples: int = 4, max_tokens: int = 48,
             seed: int = 0, n_prefix: int = 64, progress: bool = False,
             positions: Sequence[str] = POSITIONS, healing: Sequence[bool] = (True, False),
             window_tokens: Optional[int] = None) -> dict:
    """Run the tasks at each cursor position, with and without token healing; returns the
    metrics dict (fractions in 0..1). ``window_tokens``: the FIM window's token budget, as
    ``fim_window_ms`` sets it from a prefill speed (None: the fixed near_prefix / near_suffix lines)."""
    import torch

    from ..core.sampler import SamplingParams
    from ..pipeline.config import EngineConfig
    from ..pipeline.prompt_layout import PromptBuilder

    cfg = EngineConfig(n_prefix=n_prefix)
    builders = {h: PromptBuilder(cfg, model.tokenizer, heal=h) for h in healing}
    for b in builders.values():
        b.window_tokens = window_tokens
    sampled_params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    greedy_params = SamplingParams(temperature=0.0, top_p=1.0, alpha_frequency=0.0)
    per: dict = {}                        # (position, heal) -> [tasks, greedy, any sampled, either]
    hits = {"baseline_prev_line": 0, "baseline_prev_nonblank": 0}
    by_suffix: dict = {}                  # file suffix -> [tasks, greedy hits, any-sampled hits] (col0, healed)
    prompt_tokens = runs = 0
    t0 = time.time()
    examples = []
    for i, task in enumerate(tasks):
        hits["baseline_prev_line"] += task.prev_line == task.target
        hits["baseline_prev_nonblank"] += task.prev_nonblank == task.target
        for pos in positions:
            typed = typed_text(task, pos)
            if typed is None:
                continue
            lines = list(task.lines)
            lines[task.row] = typed
            req = {"lines": lines, "first": 0, "row": task.row, "col": len(typed.encode("utf-8"))}
            for heal, builder in builders.items():
                prompt = builder.build(req)
                if not prompt.fim:
                    raise ValueError(f"{task.path}:{task.row + 1}: prompt is not FIM")
                ids = prompt.tokens()
                prompt_tokens += len(ids)
                runs += 1
                logits, state = model.forward(torch.tensor([ids]), model.new_state(1))
                greedy = typed + _first_lines(model, state, logits, 1, greedy_params, [0], max_tokens,
                                              prompt.healed_bytes)[0]
                seeds = [seed * 1000003 + i * 101 + j for j in range(n_samples)]
                sampled = [typed + t for t in _first_lines(model, state, logits, n_samples, sampled_params,
                                                           seeds, max_tokens, prompt.healed_bytes)]
                g, a = greedy.rstrip() == task.target, task.target in [x.rstrip() for x in sampled]
                c = per.setdefault((pos, heal), [0, 0, 0, 0])
                c[0], c[1], c[2], c[3] = c[0] + 1, c[1] + g, c[2] + a, c[3] + (g or a)
                if pos == positions[0] and heal == healing[0]:
                    counts = by_suffix.setdefault(Path(task.path).suffix or "(none)", [0, 0, 0])
                    counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + g, counts[2] + a
                    if len(examples) < 8:
                        examples.append({"file": Path(task.path).name, "line": task.row + 1,
                                         "target": task.target, "greedy": greedy, "sampled": sampled})
        if progress and (i + 1) % 20 == 0:
            c = per.get((positions[0], healing[0]), [1, 0, 0, 0])
            print(f"  {i + 1}/{len(tasks)} tasks, pass@1 {c[1] / max(1, c[0]):.3f}", file=sys.stderr)
    n = max(1, len(tasks))
    result = {}
    head = per.get((positions[0], healing[0]), [0, 0, 0, 0])
    result["pass@1"] = round(head[1] / max(1, head[0]), 4)
    result[f"pass@{n_samples}"] = round(head[2] / max(1, head[0]), 4)
    result[f"pass@1+{n_samples}"] = round(head[3] / max(1, head[0]), 4)
    result.update({k: round(v / n, 4) for k, v in hits.items()})
    result["positions"] = {
        pos: {("healed" if h else "not_healed"): {"tasks": c[0], "pass@1": round(c[1] / max(1, c[0]), 4),
                                                   f"pass@{n_samples}": round(c[2] / max(1, c[0]), 4)}
              for (p2, h), c in per.items() if p2 == pos}
        for pos in positions}
    result.update(tasks=len(tasks), samples=n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                  n_prefix_lines=n_prefix, near_prefix_lines=cfg.near_prefix, near_suffix_lines=cfg.near_suffix,
                  window_tokens=window_tokens,
                  mean_prompt_tokens=round(prompt_tokens / max(1, runs), 1), seconds=round(time.time() - t0, 1),
                  by_file_suffix={k: {"tasks": c[0], "pass@1": c[1], f"pass@{n_samples}": c[2]}
                                  for k, c in sorted(by_suffix.items())},
                  examples=examples)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint (.pth optional)")
    parser.add_argument("--files", nargs="*", default=None,
                        help="held-out source files (default: heldout_paths of the model's .json record)")
    parser.add_argument("--tasks", type=int, default=200, help="number of line tasks")
    parser.add_argument("--samples", type=int, default=4, help="sampled candidates per task (N)")
    parser.add_argument("--max-tokens", type=int, default=48, help="decode limit per candidate")
    parser.add_argument("--n-prefix", type=int, default=64, help="lines above the cursor in the prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window-tokens", type=int, default=None,
                        help="token budget of the FIM window, as engine option fim_window_ms sets it from the "
                             "prefill speed (default: the fixed near_prefix / near_suffix lines)")
    parser.add_argument("--positions", default=",".join(POSITIONS),
                        help=f"cursor positions, comma-separated (of {','.join(POSITIONS)})")
    parser.add_argument("--healing", choices=["both", "on", "off"], default="both",
                        help="token healing at the cursor: compare both, or only on / off")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--update-record", action="store_true",
                        help="write the result under 'eval' into the model's .json training record")


def _record_path(model_path: str) -> Path:
    p = Path(model_path)
    return (p if p.suffix == ".pth" else Path(str(p) + ".pth")).with_suffix(".json")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import load_model

    torch.set_num_threads(args.threads)
    record_path = _record_path(args.model)
    files: Optional[List[str]] = args.files
    if not files:
        if not record_path.is_file():
            raise ValueError(f"no --files given and no training record {record_path}")
        files = json.loads(record_path.read_text()).get("heldout_paths") or []
        if not files:
            raise ValueError(f"{record_path} lists no heldout_paths; pass --files")
    model = load_model(args.model, device="cpu")
    tasks = make_tasks(files, args.tasks, args.seed)
    positions = [p for p in args.positions.split(",") if p]
    bad = [p for p in positions if p not in POSITIONS]
    if bad or not positions:
        raise ValueError(f"--positions {args.positions}: choose from {','.join(POSITIONS)}")
    healing = {"both": (True, False), "on": (True,), "off": (False,)}[args.healing]
    result = evaluate(model, tasks, args.samples, args.max_tokens, args.seed, args.n_prefix,
                      progress=not args.json, positions=positions, healing=healing,
                      window_tokens=args.window_tokens)
    if args.update_record:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        record["eval"] = result
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        n = result["samples"]
        print(f"{result['tasks']} tasks from {len(files)} files ({result['seconds']} s)")
        for key in ("pass@1", f"pass@{n}", f"pass@1+{n}", "baseline_prev_line", "baseline_prev_nonblank"):
            print(f"  {key:24s} {result[key]:.3f}")
        for pos, by in result["positions"].items():
            cells = "  ".join(f"{h}: pass@1 {v['pass@1']:.3f} pass@{n} {v[f'pass@{n}']:.3f} ({v['tasks']})"
                              for h, v in by.items())
            print(f"  {pos:8s} {cells}")
    return 0
