"""`rwkv-nvim complete FILE --line N --col N`: one completion from the command line.

Runs the same pipeline as the editor (prompt layout, state cache, forked decode)
without Neovim. ``--line`` is 1-based, ``--col`` a 0-based byte column. With
``--json`` prints ``{"candidates": [{"text", "logprob"}], "stats": {...}, "prompt": {"tokens":
[every id fed, in order], "healed": "<text removed at the cursor>"}}``: anyone can check
that the ids are the whole-text tokenization of the prompt.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="source file to complete in")
    parser.add_argument("--line", type=int, required=True, metavar="N", help="cursor line (1-based)")
    parser.add_argument("--col", type=int, required=True, metavar="N", help="cursor byte column (0-based)")
    parser.add_argument("--model", default=None, metavar="M",
                        help="checkpoint path or downloaded model name (default: the shipped model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--candidates", type=int, default=None, metavar="K", help="number of candidates (1-16)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="T", help="tokens per candidate")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-budget-ms", type=int, default=None, metavar="MS",
                        help="decode time budget (default: the engine's, 1000)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="state cache directory (default: $XDG_CACHE_HOME/rwkv.nvim)")
    parser.add_argument("--json", action="store_true", help="print JSON {candidates, stats, prompt}")


def _config(args: argparse.Namespace):
    from ..pipeline.config import EngineConfig
    opts = {"model": args.model, "device": args.device}
    for name in ("candidates", "max_tokens", "temperature", "seed", "time_budget_ms", "cache_dir"):
        v = getattr(args, name, None)
        if v is not None:
            opts[name] = v
    return EngineConfig.from_dict(opts)


def build_request(path: str, line: int, col: int) -> dict:
    """A request over the whole file with the cursor at (1-based line, 0-based byte col)."""
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()                                   # the file's final newline
    if not 1 <= line <= len(lines):
        raise ValueError(f"--line {line} is outside {path} (1..{len(lines)})")
    n_bytes = len(lines[line - 1].encode("utf-8"))
    if not 0 <= col <= n_bytes:
        raise ValueError(f"--col {col} is outside line {line} (0..{n_bytes} bytes)")
    return {"id": 1, "buf": 0, "tick": 0, "filename": path, "filetype": "",
            "lines": lines, "first": 0, "row": line - 1, "col": col}


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        request = build_request(args.file, args.line, args.col)
    except (OSError, ValueError) as e:
        print(f"rwkv-nvim complete: {e}", file=sys.stderr)
        return 2
    from ..core.checkpoint import CheckpointError
    from ..pipeline.completer import Completer
    try:
        completer = Completer(config)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        from ..core.errors import one_line
        print(f"rwkv-nvim complete: {one_line(e)}", file=sys.stderr)
        return 1
    result = completer.complete(request)
    out = {"candidates": result["candidates"], "stats": result["stats"], "prompt": completer.last_prompt()}
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if not out["candidates"]:
        print("(no candidates)")
    for i, c in enumerate(out["candidates"], 1):
        print(f"--- candidate {i} (mean logprob {c['logprob']:.3f})")
        print(c["text"])
    s = out["stats"]
    print(f"--- {s['reused_tokens']} tokens reused, {s['prefilled_tokens']} prefilled in "
          f"{s['ms_prefill']:.0f} ms, {s['decoded_tokens']} decoded in {s['ms_decode']:.0f} ms",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rwkv-nvim complete", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
