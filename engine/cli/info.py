"""`rwkv-nvim info MODEL`: shape, vocabulary and state size of a checkpoint."""
from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("model", help="path to an RWKV-7 .pth checkpoint (.pth optional)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from dataclasses import asdict

    from ..core.checkpoint import load_checkpoint

    path, sd, shape, world_ids = load_checkpoint(args.model)
    params = sum(t.numel() for k, t in sd.items() if k != "vocab.world_ids")
    info = {"path": str(path), **asdict(shape), "params": params,
            "vocabulary": "trimmed World" if world_ids else "RWKV World",
            "state_bytes_fp32": shape.state_bytes(1), "dtype": str(next(iter(sd.values())).dtype)}
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:18} {v}")
    return 0
