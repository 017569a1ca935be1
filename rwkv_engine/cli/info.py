"""`rwkv-nvim info [MODEL]`: shape, vocabulary and state size of a checkpoint, the
weight precision ``dtype = "auto"`` runs it with on this CPU (``--measure-precision``
measures it now and rewrites the cached verdict, then checks the picked mode on this model:
``core.model_precision``), and the instruction-set path of the CPU
kernels' q8 product (``cpu_kernels  q8: avx2``; builds the CPU kernel if needed)."""
from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="path to an RWKV-7 .pth checkpoint (.pth optional) or a downloaded model name "
                        "(default: the model bundled with the plugin)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--measure-precision", action="store_true",
                   help="measure which CPU weight precision (fp32, int8, ...) is fastest under the accuracy "
                        "gate on this CPU now (~10 s) and rewrite the cached verdict")
    p.add_argument("--threads", type=int, default=0, help="CPU threads the model runs with (0 = as the plugin)")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $XDG_CACHE_HOME/rwkv.nvim)")


def run(args) -> int:
    import sys
    from dataclasses import asdict

    from ..core.checkpoint import load_checkpoint
    from ..pipeline.config import EngineConfig
    from ..pipeline.loading import resolve_model_path

    config = EngineConfig(model=args.model, threads=args.threads, cache_dir=args.cache_dir)
    model_path = resolve_model_path(config)
    path, sd, shape, world_ids = load_checkpoint(model_path)
    params = sum(t.numel() for k, t in sd.items() if k != "vocab.world_ids")
    info = {"path": str(path), **asdict(shape), "params": params,
            "vocabulary": "trimmed World" if world_ids else "RWKV World",
            "state_bytes_fp32": shape.state_bytes(1), "dtype": str(next(iter(sd.values())).dtype)}
    del sd
    progress = None if args.json else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    verdict = precision_verdict(config, path, args.measure_precision, progress)
    if verdict is None:
        info["precision"] = ("not measured yet on this CPU (measured when the plugin first loads a model, "
                             "or: rwkv-nvim info --measure-precision)")
    model_check = None
    if verdict is not None:
        info["precision"], model_check = model_precision_line(config, path, verdict, args.measure_precision,
                                                              progress)
    info["cpu_kernels"] = cpu_kernels_line(progress)
    if args.json:
        if verdict is not None:
            info["precision_verdict"] = verdict
        if model_check is not None:
            info["precision_model_check"] = model_check
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:18} {v}")
        if verdict is not None and verdict.get("measured"):
            print(precision_table(verdict))
        if model_check is not None:
            state = "passes" if model_check["passed"] else "fails"
            print(f"{'':18} this model, {model_check['mode']} vs fp32 on real code: {model_check['why']}: {state}")
    return 0


def cpu_kernels_line(progress=None) -> str:
    """"q8: <path>" (avx512-vnni, avx2, neon-dotprod, neon, scalar), or why there is none."""
    import warnings

    from ..core import kernel_loader as kl
    if kl.kernels_disabled():
        return "q8: none (RWKV_NVIM_NO_KERNEL is set: the torch code runs)"
    with warnings.catch_warnings():  # the failure is said here, once
        warnings.simplefilter("ignore", RuntimeWarning)
        isas = kl.cpu_isas(progress)
    if isas is None:
        return f"q8: none (CPU kernel unavailable: {kl.kernel_status().get('cpu', '?')})"
    return ", ".join(f"{name}: {path}" for name, path in isas.items())


def precision_verdict(config, path, remeasure: bool, progress=None):
    """The CPU precision verdict for ``config``'s model: the cached one (None when there is
    none), or measured now and stored with ``remeasure``."""
    from ..core import cpu_precision as cp
    from ..pipeline.loading import resolve_cpu_precision
    if remeasure:
        cp.forget()
    return resolve_cpu_precision(config, path, progress=progress, remeasure=remeasure, measure_now=remeasure)


def model_precision_line(config, path, verdict: dict, measure: bool, progress=None):
    """(the precision line, the model gate's result or None): the CPU verdict's mode once
    this model passed its gate (``core.model_precision``; checked now with ``measure``)."""
    from ..pipeline.loading import cpu_precision_for
    _, record = cpu_precision_for(config, path, progress=progress, measure_now=measure)
    if record.get("pending"):
        mode = verdict.get("decode", "?")
        return (f"fp32 (auto: this CPU prefers {mode}; not checked on this model yet: checked when the plugin "
                f"first loads it, or: rwkv-nvim info --measure-precision)"), None
    check = record.get("model_check")
    return record["summary"], ({k: v for k, v in check.items() if k != "key"} if check else None)


def precision_table(verdict: dict) -> str:
    """The measured figures, one mode a line."""
    from ..core.cpu_precision import TOP1_MIN
    rows = [f"{'':18} {'mode':8} {'decode 1':>9} {'decode 8':>9} {'prefill 64':>10} {'top-1':>7} "
            f"{'KL':>7} {'logit err':>9}  verdict"]
    rejected = verdict.get("rejected") or {}
    chosen = {verdict.get("decode"), verdict.get("prefill")}

    def num(f, k, fmt):
        return format(f[k], fmt) if isinstance(f.get(k), (int, float)) else "-"
    for mode, f in verdict["measured"].items():
        top1 = f"{f['top1'] * 100:.1f}%" if isinstance(f.get("top1"), (int, float)) else "-"
        state = "chosen" if mode in chosen else ("rejected: " + rejected[mode] if mode in rejected else "passes")
        rows.append(f"{'':18} {mode:8} {num(f, 'decode_1', '8.1f')}ms {num(f, 'decode_8', '8.1f')}ms "
                    f"{num(f, 'prefill_64', '9.1f')}ms {top1:>7} {num(f, 'kl', '7.4f')} "
                    f"{num(f, 'max_logit_err', '9.4f')}  {state}")
    key = verdict.get("key") or {}
    rows.append(f"{'':18} measured at {key.get('shape', '?')} with {key.get('threads', '?')} thread(s) on "
                f"{key.get('cpu', '?')}; gate: top-1 >= {TOP1_MIN * 100:.0f} % on real code")
    return "\n".join(rows)
