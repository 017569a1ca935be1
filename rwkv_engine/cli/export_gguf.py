"""`rwkv-nvim export-gguf MODEL.pth OUT.gguf`: write a llama.cpp GGUF (arch rwkv7)."""
from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("model", help="path to an RWKV-7 .pth checkpoint (.pth optional)")
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"],
                   help="type of the large matrices (default f16; norms and vectors stay f32)")
    p.add_argument("--eot-double-newline", action="store_true",
                   help='mark "\\n\\n" as end-of-turn like llama.cpp\'s converter (chat use; '
                        "llama-server then stops at every blank line)")
    p.add_argument("--name", help="general.name written into the file (default: the file stem)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    from ..core.gguf_export import GGUFExportError, export_gguf, require_gguf

    try:
        require_gguf()
    except ImportError as e:
        print(f"rwkv-nvim export-gguf: {e}", file=sys.stderr)
        return 1
    try:
        info = export_gguf(args.model, args.out, args.type, eot_double_newline=args.eot_double_newline,
                           name=args.name, overwrite=args.force)
    except (GGUFExportError, FileExistsError) as e:
        print(f"rwkv-nvim export-gguf: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {info['path']}: {info['type']}, {info['n_layer']} layers x {info['n_embd']}, "
              f"{info['vocabulary']} vocabulary ({info['vocab_size']}), "
              f"{info['file_bytes'] / 2**20:.1f} MiB in {info['seconds']:.1f} s")
    return 0
