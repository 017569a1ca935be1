"""`rwkv-nvim` console script: one subcommand per module, imported only when chosen."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module providing add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS = {
    "complete": ("rwkv_engine.cli.complete", "complete a file at a cursor position and print the candidates"),
    "bench": ("rwkv_engine.cli.bench", "benchmark prefill, decode and a keystroke replay against a peer (the rwkv package or llama.cpp)"),
    "download": ("rwkv_engine.cli.download", "download an official RWKV-7 model (e.g. g1-0.1b) from Hugging Face"),
    "eval": ("rwkv_engine.cli.evaluate", "evaluate a model on held-out fill-in-the-middle line tasks"),
    "info": ("rwkv_engine.cli.info", "show a model's shape, vocabulary and state size"),
    "kernels": ("rwkv_engine.cli.kernels", "build the compiled WKV-7 kernels now (CPU, and the GPU one where possible)"),
    "export-gguf": ("rwkv_engine.cli.export_gguf", "convert a checkpoint to a llama.cpp GGUF file (arch rwkv7)"),
}


def build_parser(chosen: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkv-nvim",
        description="Local RWKV-7 code completion engine of rwkv.nvim.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("rwkv-nvim: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, never a traceback, for expected failures
        from ..core.checkpoint import CheckpointError
        if isinstance(e, (CheckpointError, FileNotFoundError, ValueError, RuntimeError)):
            print(f"rwkv-nvim {args.command}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
