"""The engine's figures on random weights: ``bench_<shape>`` (prefill tok/s, batch-1 and
batch-N decode, each step against the weight-bytes / bandwidth limit, peak VRAM) and
``replay_1.5b``, the keystroke replay through the completion pipeline on the model the
1.5B bench left behind."""
from __future__ import annotations

import time
from pathlib import Path

from .plumbing import REPLAY_SHAPE, Skip, sync


def bench(check, name: str) -> dict:
    check.require_device()
    args = check.args
    if name not in args.shapes.split(","):
        raise Skip(f"not in --shapes {args.shapes}")
    if name == "7.2b" and args.no_7b:
        raise Skip("--no-7b")
    check.need(f"bench_{name}")
    import torch

    from rwkv_engine.cli.bench import engine_speed
    from rwkv_engine.core.checkpoint import infer_shape
    from rwkv_engine.core.model import RWKV7
    from rwkv_engine.core.random_checkpoint import make_state_dict
    L, C = check.shapes[name]
    dtype = torch.float16 if check.device.type == "cuda" else torch.float32
    if check.cuda:
        torch.cuda.reset_peak_memory_stats(check.device)
    t0 = time.perf_counter()
    sd = make_state_dict(n_layer=L, n_embd=C, seed=1, dtype=dtype, device=check.device, trained_like=True)
    sync(check.device)
    gen_s = time.perf_counter() - t0
    shape, _ = infer_shape(sd, Path(f"<random {name}>"))
    res = {"n_layer": L, "n_embd": C, "vocab": shape.vocab_size, "dtype": str(dtype).replace("torch.", ""),
           "params_m": round(sum(v.numel() for v in sd.values()) / 1e6, 1),
           "generate_seconds": round(gen_s, 2)}
    if name in check.peer_shapes and not args.no_peer:
        t0 = time.perf_counter()
        path = check.work / f"random-{name}.pth"
        torch.save({k: v.cpu() for k, v in sd.items()}, str(path))
        check.ctx["peer_ckpts"][name] = str(path)
        res["checkpoint_save_seconds"] = round(time.perf_counter() - t0, 2)
    model = RWKV7(sd, shape, device=check.device, dtype=dtype if check.cuda else None,
                  use_kernel=check.cuda or args.cpu_kernel)
    del sd
    check.free()
    # bytes one decode step reads (RWKV7.weight_bytes: the layers, the output norm and the
    # head; the embedding is gathered, one row per token: left out)
    res["weight_bytes_per_step"] = int(model.weight_bytes())
    speeds = engine_speed(model, check.prefill_tokens, check.steps, args.batch, check.repeat)
    res.update({k: round(v, 3) for k, v in speeds.items()})
    b = args.batch
    b1_ms, bn_ms = speeds["decode_b1_ms_per_step"], speeds[f"decode_b{b}_ms_per_step"]
    res[f"b{b}_over_b1_step"] = round(bn_ms / b1_ms, 3)
    bw = check.ctx.get("bw")
    if bw:
        limit_ms = res["weight_bytes_per_step"] / bw * 1e3
        res["bw_limit_ms_per_step"] = round(limit_ms, 4)
        res["b1_fraction_of_bw_limit"] = round(limit_ms / b1_ms, 4)
        res[f"b{b}_fraction_of_bw_limit"] = round(limit_ms / bn_ms, 4)
    if check.cuda:
        res["vram_peak_mb"] = round(torch.cuda.max_memory_allocated(check.device) / 2**20, 1)
    check.ctx["bench"][name] = res
    if name == REPLAY_SHAPE and not args.no_replay:
        check.ctx["replay_model"] = model
    del model
    return res


def replay(check) -> dict:
    check.require_device()
    if check.args.no_replay:
        raise Skip("--no-replay")
    model = check.ctx.pop("replay_model", None)
    if model is None:
        raise Skip(f"no {REPLAY_SHAPE} model (bench_{REPLAY_SHAPE} did not run)")
    check.need(f"replay_{REPLAY_SHAPE}")
    from rwkv_engine.cli.bench_replay import replay as replay_keystrokes
    from rwkv_engine.pipeline.config import EngineConfig
    cfg = EngineConfig(device=check.device.type, cache_dir=str(check.work / "replay-cache"), candidates=4,
                       max_lines=1, max_tokens=check.line_tokens)
    r = replay_keystrokes(model, check.args.replay_file, check.replay_lines, config=cfg)
    del model
    ks = r.get("keystroke", {})
    return {"first_text_ms_p50": ks.get("ms_first_p50"), "first_text_ms_p95": ks.get("ms_first_p95"),
            "all_candidates_ms_p50": ks.get("ms_total_p50"), "all_candidates_ms_p95": ks.get("ms_total_p95"),
            "refed_tokens_p50": ks.get("refed_tokens_p50"), "refed_tokens_max": ks.get("refed_tokens_max"),
            "candidates": 4, "line_token_cap": check.line_tokens, "replay": r}
