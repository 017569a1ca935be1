"""Train the small RWKV-7 code model that ships with the plugin (rwkv_engine/data/default-model.pth).

    python tools/train_default_model.py --minutes 50 --out rwkv_engine/data/default-model.pth
    python3 tools/train_default_model.py --device cuda --minutes 4 --out $OUT   # v2: tools/train_gpu.py

Reproducible: the seed drives the corpus split, the vocabulary, the samples and the
init. The run stops at a wall-time cap (the learning-rate schedule follows the
fraction of that time used, since the CPU is shared and steps/s vary), writes a
checkpoint every --save-minutes, the loss curve (TSV) and the training record
(JSON next to the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Threads that wait for work must sleep, not spin: the CPU is shared, and spinning
# OpenMP threads made a 2-thread step 5-7x slower than 1 thread under contention.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from train_model import ModelConfig, RWKV7Train, export_state_dict  # noqa: E402


VOCAB_COUNT_BYTES = 40_000_000   # the vocabulary is ranked on this much text (whole-file encodings)


@dataclass
class TrainConfig:
    seed: int = 1234
    n_layer: int = 4
    n_embd: int = 192
    vocab_size: int = 4096
    batch: int = 2
    ctx_len: int = 1024
    lr_max: float = 2e-3
    lr_min: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    minutes: float = 50.0          # wall-time cap of the training loop
    save_minutes: float = 5.0
    heldout_rows: int = 12
    threads: int = 2
    export_dtype: str = "bfloat16"
    init_from: str = ""            # warm start from an exported checkpoint (same shape; vocab remapped)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = TrainConfig()
    for name, val in asdict(d).items():
        if isinstance(val, tuple):
            continue
        p.add_argument("--" + name.replace("_", "-"), type=type(val), default=val)
    p.add_argument("--out", default="rwkv_engine/data/default-model.pth", help="checkpoint path")
    p.add_argument("--curve", default="tools/loss_curve.tsv", help="loss curve TSV path")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = time cap only)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="scale every language's byte budget")
    p.add_argument("--no-kernel", action="store_true", help="use the slow torch WKV loop")
    p.add_argument("--keep-heldout", default="",
                   help="training record (JSON) whose heldout_paths stay held out (compare models on them)")
    p.add_argument("--verify-only", action="store_true",
                   help="only compare the logits of --out with rwkv_engine and the rwkv package")
    args = p.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(d) if not isinstance(getattr(d, k), tuple)})
    return cfg, args


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over steps, then cosine from lr_max to lr_min over the wall-time fraction."""
    if step < cfg.warmup_steps:
        return cfg.lr_max * (step + 1) / cfg.warmup_steps
    p = min(1.0, max(0.0, progress))
    return cfg.lr_min + 0.5 * (cfg.lr_max - cfg.lr_min) * (1 + math.cos(math.pi * p))


def build_data(cfg: TrainConfig, budget_scale: float = 1.0, sources=None, force_heldout=()):
    """Corpus -> (train_maker, heldout_rows [R, T+1], world_ids, record dict, held-out paths)."""
    from rwkv_engine.tokenizer import WorldTokenizer

    t0 = time.time()
    sources = sources or corpus.default_sources()
    for s in sources:
        s.budget_bytes = int(s.budget_bytes * budget_scale)
    train, heldout, src_record = corpus.collect_files(sources, cfg.seed, force_heldout=force_heldout)
    rng = random.Random(cfg.seed)
    sample = rng.sample(train, len(train))                      # counts over a seeded sample of files
    full = WorldTokenizer.default()
    counts = corpus.count_world_tokens(sample, full, max_bytes=VOCAB_COUNT_BYTES)
    world_ids = corpus.choose_world_ids(counts, cfg.vocab_size, full)
    tok = WorldTokenizer.from_world_ids(world_ids)
    est_tokens, est_bytes = corpus.count_tokens(sample, tok, max_bytes=VOCAB_COUNT_BYTES // 4)
    train_bytes = sum(sum(len(ln) + 1 for ln in f.lines) for f in train)
    held_bytes = sum(sum(len(ln) + 1 for ln in f.lines) for f in heldout)
    per_byte = est_tokens / max(1, est_bytes)
    maker = corpus.SampleMaker(train, tok, corpus.SampleConfig(), cfg.seed)
    held_maker = corpus.SampleMaker(heldout, tok, corpus.SampleConfig(), cfg.seed + 1)
    held_rows = torch.tensor([held_maker.row(cfg.ctx_len + 1) for _ in range(cfg.heldout_rows)])
    record = {"sources": src_record, "train_files": len(train), "heldout_files": len(heldout),
              "train_tokens_estimate": int(train_bytes * per_byte), "heldout_tokens_estimate": int(held_bytes * per_byte),
              "train_bytes": train_bytes, "vocab_count_bytes": VOCAB_COUNT_BYTES,
              "sample_config": asdict(corpus.SampleConfig()),
              "prompt_layout": "rwkv_engine.pipeline.prompt_layout.PromptBuilder (canonical tokens, healed cursor)",
              "fim_cursor_line": "non-blank; the middle starts with its text, never with an empty line",
              "data_prep_seconds": round(time.time() - t0, 1)}
    return maker, held_rows, world_ids, record, [f.path for f in heldout]


@torch.no_grad()
def heldout_loss(model: RWKV7Train, rows: torch.Tensor, use_kernel: bool = True) -> float:
    model.eval()
    total = 0.0
    for i in range(0, rows.shape[0], 8):
        x = rows[i:i + 8]
        logits = model(x[:, :-1], use_kernel)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item() * x.shape[0]
    model.train()
    return total / rows.shape[0]


def remap_vocab(sd: dict, old_ids, new_ids) -> tuple:
    """Embedding and head rows of a checkpoint trained on vocabulary ``old_ids`` moved to
    ``new_ids``: a shared World id keeps its rows; a new one starts from the rows of the
    first token of its text in the old vocabulary (e.g. "\\n    " from "\\n").
    Returns (state_dict, number of new ids)."""
    from rwkv_engine.tokenizer import WorldTokenizer

    old_ids, new_ids = [int(i) for i in old_ids], [int(i) for i in new_ids]
    where = {w: i for i, w in enumerate(old_ids)}
    old_tok, full = WorldTokenizer.from_world_ids(old_ids), WorldTokenizer.default()
    src = []
    for w in new_ids:
        if w in where:
            src.append(where[w])
        else:
            text = full.token_bytes(w)
            src.append(old_tok.encode(text)[0] if text else 0)
    idx = torch.tensor(src)
    out = dict(sd)
    out["emb.weight"] = sd["emb.weight"].index_select(0, idx)           # [V_new, C]
    out["head.weight"] = sd["head.weight"].index_select(0, idx)         # [V_new, C]
    return out, sum(w not in where for w in new_ids)


def warm_start(model: RWKV7Train, path: str, world_ids, held_rows: torch.Tensor, use_kernel: bool) -> dict:
    """Load the weights of an exported checkpoint into ``model`` (same shape; a different
    vocabulary is remapped with ``remap_vocab``); returns what the training record keeps."""
    from train_model import load_exported

    if not Path(path).is_file():
        raise ValueError(f"--init-from {path}: no such checkpoint")
    init, init_ids = load_exported(path)
    if init.cfg.to_dict() != model.cfg.to_dict():
        raise ValueError(f"--init-from {path}: model {init.cfg.to_dict()} != {model.cfg.to_dict()}")
    sd, new_tokens = init.state_dict(), 0
    if init_ids.tolist() != list(world_ids):
        sd, new_tokens = remap_vocab(sd, init_ids.tolist(), world_ids)
    model.load_state_dict(sd)
    info = {"path": str(path), "remapped_new_tokens": new_tokens,
            "heldout_loss_before": round(heldout_loss(model, held_rows, use_kernel), 4)}
    rec_path = Path(path).with_suffix(".json")
    if rec_path.is_file():
        prev = json.loads(rec_path.read_text())
        info.update({k: prev.get(k) for k in ("steps", "tokens_seen", "train_seconds", "heldout_loss")})
        info["eval"] = {k: prev.get("eval", {}).get(k) for k in ("pass@1", "pass@4", "pass@1+4")}
    return info


def save(model, world_ids, cfg, args, record, path: Path) -> None:
    dtype = getattr(torch, cfg.export_dtype)
    sd = export_state_dict(model, torch.tensor(world_ids), dtype)
    tmp = path.with_suffix(".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


_REFERENCE_SCRIPT = """
import sys, torch
from rwkv.model import RWKV
m = RWKV(model=sys.argv[1], strategy="cpu fp32")
out, _ = m.forward([int(t) for t in sys.argv[2].split(",")], None)
want = torch.load(sys.argv[3])
print("maxdiff", (out.float() - want).abs().max().item())
"""


def verify_checkpoint(path: Path, text: str = "def add(a, b):\n    return a + b\n") -> dict:
    """Logits of the shipped checkpoint: training model vs rwkv_engine.load_model vs the
    ``rwkv`` reference package (when installed). Returns max abs differences."""
    import subprocess
    import tempfile

    from rwkv_engine import load_model
    from train_model import load_exported

    model, _ = load_exported(str(path))
    engine = load_model(str(path), device="cpu")
    seq = [0] + engine.tokenizer.encode(text)
    with torch.no_grad():
        want = model(torch.tensor([seq]))[0]                                  # [T, V]
    state, diffs = engine.new_state(1), []
    for t in range(len(seq)):                                                   # token by token
        logits, state = engine.forward(torch.tensor([[seq[t]]]), state)
        diffs.append((logits[0] - want[t]).abs().max().item())
    result = {"tokens": len(seq), "engine_max_abs_diff": max(diffs)}
    try:
        import rwkv  # noqa: F401
    except ImportError:
        return result
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(want[-1].clone(), Path(tmp) / "want.pt")
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="0")
        res = subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT, str(path)[:-4], ",".join(map(str, seq)),
                              str(Path(tmp) / "want.pt")], capture_output=True, text=True, env=env, timeout=600)
    if res.returncode == 0 and "maxdiff" in res.stdout:
        result["rwkv_package_max_abs_diff"] = float(res.stdout.split("maxdiff")[-1])
    else:
        result["rwkv_package_error"] = res.stderr.strip().splitlines()[-1][:200] if res.stderr else "failed"
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--tiny" or a.startswith("--device") for a in argv):
        import train_gpu           # the GPU path (and its CPU plumbing run): tools/train_gpu.py
        return train_gpu.main(argv)
    t_process = time.time()
    cfg, args = parse_args(argv)
    if args.verify_only:
        out = Path(args.out)
        result = verify_checkpoint(out)
        rec_path = out.with_suffix(".json")
        record = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
        record["verification"] = result
        rec_path.write_text(json.dumps(record, indent=2) + "\n")
        print("verification:", json.dumps(result))
        return 0
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("config:", json.dumps(asdict(cfg)), flush=True)

    keep = json.loads(Path(args.keep_heldout).read_text())["heldout_paths"] if args.keep_heldout else ()
    maker, held_rows, world_ids, data_record, heldout_paths = build_data(cfg, args.budget_scale, force_heldout=keep)
    print("data:", json.dumps(data_record), flush=True)
    mcfg = ModelConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size)
    model = RWKV7Train(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {mcfg.to_dict()} lora {mcfg.lora_dims()} params {n_params / 1e6:.2f}M", flush=True)
    use_kernel = not args.no_kernel
    init_info = warm_start(model, cfg.init_from, world_ids, held_rows, use_kernel) if cfg.init_from else None
    if init_info:
        print("warm start:", json.dumps(init_info), flush=True)
    opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr_max, betas=cfg.betas, eps=1e-8)

    record = {"config": asdict(cfg), "model": {**mcfg.to_dict(), "lora": mcfg.lora_dims(), "params": n_params},
              "data": data_record, "heldout_paths": heldout_paths, "torch": torch.__version__}
    if init_info:
        record["init"] = init_info
    curve = open(args.curve, "w")
    curve.write("step\telapsed_s\ttokens\tlr\ttrain_loss\theldout_loss\n")
    t_start = time.time()
    budget = cfg.minutes * 60
    next_save = cfg.save_minutes * 60
    step, tokens, ema = 0, 0, None
    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            break
        lr = lr_at(cfg, step, elapsed / budget)
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.tensor([maker.row(cfg.ctx_len + 1) for _ in range(cfg.batch)])  # [B, T+1]
        logits = model(x[:, :-1], use_kernel)                                      # [B, T, V]
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens += cfg.batch * cfg.ctx_len
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        elapsed = time.time() - t_start
        held = ""
        if elapsed >= next_save or step == 1:
            held = f"{heldout_loss(model, held_rows, use_kernel):.4f}"
            if elapsed >= next_save:
                next_save += cfg.save_minutes * 60
                record.update(steps=step, tokens_seen=tokens, train_seconds=round(elapsed, 1),
                              train_loss_ema=round(ema, 4), heldout_loss=float(held), final=False)
                save(model, world_ids, cfg, args, record, out)
        if step % 10 == 0 or held:
            curve.write(f"{step}\t{elapsed:.1f}\t{tokens}\t{lr:.6f}\t{ema:.4f}\t{held}\n")
            curve.flush()
            print(f"step {step} t {elapsed:.0f}s tok {tokens} lr {lr:.2e} loss {ema:.4f} {held}"
                  f" ({tokens / max(elapsed, 1e-9):.0f} tok/s)", flush=True)

    elapsed = time.time() - t_start
    held = heldout_loss(model, held_rows, use_kernel)
    record.update(steps=step, tokens_seen=tokens, train_seconds=round(elapsed, 1),
                  train_loss_ema=round(ema, 4) if ema is not None else None,
                  heldout_loss=round(held, 4), final=True)
    save(model, world_ids, cfg, args, record, out)
    # held-out loss of the weights as shipped (rounded to the export dtype)
    from train_model import load_exported
    shipped, _ = load_exported(str(out))
    record["heldout_loss_shipped_weights"] = round(heldout_loss(shipped, held_rows, use_kernel), 4)
    record["checkpoint_bytes"] = out.stat().st_size
    record["verification"] = verify_checkpoint(out)
    record["process_wall_seconds"] = round(time.time() - t_process, 1)   # data prep + training + checks
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    curve.write(f"{step}\t{elapsed:.1f}\t{tokens}\t{0:.6f}\t{ema:.4f}\t{held:.4f}\n")
    curve.close()
    print("done:", json.dumps({k: record[k] for k in ("steps", "tokens_seen", "train_seconds", "heldout_loss",
                                                       "heldout_loss_shipped_weights", "checkpoint_bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
