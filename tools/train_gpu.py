"""Default model v2 on a GPU (issue 25, section 3): ``train_default_model.py --device cuda``.

    python3 tools/train_default_model.py --device cuda --minutes 4 --out $OUT
    python3 tools/train_default_model.py --device cpu --tiny --out /tmp/v2   # CI plumbing

Everything happens inside the wall-time budget (--minutes, the whole run):

1. corpus, built on the machine itself: its Python's standard library and site-packages
   (torch, numpy, scipy, transformers, ...), C headers (/usr/include, CUDA's), plus any
   --extra-corpus folders (e.g. a carried Neovim runtime); files are split train /
   held-out by file (corpus.collect_files), and the v1 model's held-out files (by path
   relative to their root, rwkv_engine/data/default-model.json) are never trained on, so
   both models can be evaluated on the same tasks. Samples come from corpus.py's sample
   builder (the pipeline's prompt layout). Tokenized in a fork pool.
2. size, by measurement: tokens/s of each candidate shape at the real batch
   (``pick_size``), the largest that sees >= --tokens-per-param tokens per parameter in
   the training time left and fits the export limit;
3. training: bf16 autocast, fp32 master weights, AdamW, linear warm-up then cosine over
   the time left, the WKV-7 recurrence through tools/train_wkv_chunked.py (autograd), or
   flash-linear-attention's chunk_rwkv7 when it is installed (carried wheel), matches the
   chunked op and is faster on this GPU (``choose_backend``, recorded as "wkv");
   rows from DataLoader workers; a checkpoint into --out every --save-minutes;
4. export: the official-layout .pth (bf16 + vocab.world_ids), split into parts of at most
   --part-mib MiB when larger (``default-model-v2.pth.part0`` ...; ``python3
   tools/train_gpu.py reassemble DIR OUT.pth`` joins them and checks the sha256 in
   train.json), and ``train.json`` (config, sizing table, data, curve, losses).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import corpus  # noqa: E402
from train_model import ModelConfig, RWKV7Train, export_state_dict  # noqa: E402

NAME = "default-model-v2.pth"
V1_RECORD = REPO / "rwkv_engine" / "data" / "default-model.json"
SKIP_DIRS = ("test", "tests", "testing", "idle_test", "__pycache__", "lib2to3", "_vendor", "vendored")
# (n_layer, n_embd), smallest first; pick_size keeps those inside [min, max] params
CANDIDATES = ((6, 320), (6, 384), (8, 384), (10, 384), (8, 448), (10, 448), (12, 448), (10, 512), (12, 512))
TINY_CANDIDATES = ((1, 64), (2, 64), (2, 128))


@dataclass
class GpuTrainConfig:
    seed: int = 2025
    vocab_size: int = 8192
    batch: int = 32
    ctx_len: int = 1024
    lr_max: float = 1.5e-3
    lr_min: float = 1e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    minutes: float = 4.0            # the whole run: corpus + sizing + training + export
    save_minutes: float = 1.0
    export_reserve_s: float = 20.0  # kept at the end for the final export and checks
    heldout_rows: int = 32
    tokens_per_param: float = 8.0   # sizing: at least this many training tokens per parameter
    min_params: float = 10e6
    max_params: float = 40e6
    part_mib: float = 15.5          # the device tool returns files of at most 16 MiB
    max_parts: int = 3              # of at most 8 files back, 64 MiB together
    budget_mb: float = 48.0         # corpus text bytes, all languages
    workers: int = 10               # DataLoader worker processes
    tiny: bool = False


def tiny_config(cfg: GpuTrainConfig) -> GpuTrainConfig:
    return GpuTrainConfig(**{**asdict(cfg), **dict(
        vocab_size=400, batch=4, ctx_len=64, warmup_steps=2, save_minutes=0.05, export_reserve_s=2.0,
        heldout_rows=2, tokens_per_param=0.05, min_params=0, max_params=2e6, part_mib=0.1,
        budget_mb=0.25, workers=0, tiny=True)})


# ----------------------------------------------------------------------------- corpus
def device_sources(cfg: GpuTrainConfig, extra: Sequence[str] = ()) -> List[corpus.Source]:
    """Code on this machine: the stdlib and site-packages of this Python, C headers, and
    --extra-corpus folders (their .lua / .vim / .py / .h files). Budgets share budget_mb."""
    mb = cfg.budget_mb * 1e6
    std = sysconfig.get_paths()["stdlib"]
    site = sysconfig.get_paths()["purelib"]
    srcs = [corpus.Source("python", std, ".py", int(0.25 * mb), SKIP_DIRS + ("site-packages",))]
    if not cfg.tiny:
        srcs.append(corpus.Source("python-site", site, ".py", int(0.45 * mb), SKIP_DIRS))
        for root in ("/usr/include", "/usr/local/cuda/include"):
            if Path(root).is_dir():
                srcs.append(corpus.Source("c", root, ".h", int(0.08 * mb), ("c++", "llvm-14", "node", "clang")))
    for d in extra:
        for lang, suffix in (("lua", ".lua"), ("vim", ".vim")):
            srcs.append(corpus.Source(lang, d, suffix, int(0.1 * mb)))
    return [s for s in srcs if Path(s.root).is_dir()]


def rel_key(path: str) -> str:
    """A file's path relative to its corpus root, the same on any machine:
    lib/python3.11/json/decoder.py -> json/decoder.py; .../runtime/lua/vim/x.lua -> lua/vim/x.lua;
    /usr/include/stdio.h -> stdio.h."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, -1, -1):
        p = parts[i]
        if p in ("site-packages", "runtime", "include") or (p.startswith("python3") and i > 0 and parts[i - 1] == "lib"):
            return "/".join(parts[i + 1:])
    return Path(path).name


def v1_heldout_keys(record: Path = V1_RECORD) -> set:
    if not record.is_file():
        return set()
    return {rel_key(p) for p in json.loads(record.read_text()).get("heldout_paths", [])}


_POOL: dict = {}


def _count_shard(i: int):
    return corpus.count_world_tokens(_POOL["shards"][i], _POOL["tok"])


def _count_tokens_shard(i: int):
    """(tokens, bytes) of the shard's whole-file encodings (samples are built on demand)."""
    return corpus.count_tokens(_POOL["shards"][i], _POOL["tok"])


def _pooled(fn, files, tok, procs: int):
    shards = [files[i::procs] for i in range(procs)]
    _POOL.update(shards=shards, tok=tok)
    try:
        if procs <= 1:
            return shards, [fn(0)]
        with mp.get_context("fork").Pool(procs) as pool:
            return shards, pool.map(fn, range(procs))
    finally:
        _POOL.clear()


def build_corpus(cfg: GpuTrainConfig, sources, procs: int, log=print):
    """-> (train maker, held-out rows [R, T+1], world_ids, record, held-out paths)."""
    from collections import Counter

    from rwkv_engine.tokenizer import WorldTokenizer
    t0 = time.time()
    train, heldout, src_record = corpus.collect_files(sources, cfg.seed)
    keys = v1_heldout_keys()
    kept = [f for f in train if rel_key(f.path) not in keys]
    dropped = len(train) - len(kept)
    train = kept
    full = WorldTokenizer.default()
    _, counts = _pooled(_count_shard, train, full, procs)
    world_ids = corpus.choose_world_ids(sum(counts, Counter()), cfg.vocab_size, full)
    tok = WorldTokenizer.from_world_ids(world_ids)
    n_tok = {}
    for name, files in (("train", train), ("heldout", heldout)):
        _, results = _pooled(_count_tokens_shard, files, tok, procs)
        n_tok[name] = sum(t for t, _ in results)
    maker = corpus.SampleMaker(train, tok, corpus.SampleConfig(), cfg.seed)
    held = corpus.SampleMaker(heldout, tok, corpus.SampleConfig(), cfg.seed + 1)
    held_rows = torch.tensor([held.row(cfg.ctx_len + 1) for _ in range(cfg.heldout_rows)])
    record = {"sources": src_record, "train_files": len(train), "heldout_files": len(heldout),
              "v1_heldout_files_excluded": dropped, "train_tokens": n_tok["train"],
              "heldout_tokens": n_tok["heldout"], "train_bytes": sum(len("\n".join(f.lines)) for f in train),
              "processes": procs, "data_prep_seconds": round(time.time() - t0, 1)}
    log(f"corpus: {json.dumps({k: v for k, v in record.items() if k != 'sources'})}")
    return maker, held_rows, world_ids, record, [f.path for f in heldout]


class RowStream(torch.utils.data.IterableDataset):
    """Endless batches [batch, T+1] int64 from a sample maker; each DataLoader worker
    draws from its own seeded copy."""

    def __init__(self, maker, length: int, batch: int, seed: int):
        self.maker, self.length, self.batch, self.seed = maker, length, batch, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        maker = copy.copy(self.maker)
        if hasattr(maker, "rng"):
            maker.rng = random.Random(self.seed * 1000 + (info.id + 1 if info else 0))
        while True:
            yield torch.tensor([maker.row(self.length) for _ in range(self.batch)])


# ------------------------------------------------------------------------------ sizing
def count_params(n_layer: int, n_embd: int, vocab: int) -> int:
    """Parameters of RWKV7Train(ModelConfig(n_layer, n_embd, vocab)), without building it."""
    C = n_embd
    d = ModelConfig(n_layer=n_layer, n_embd=C, vocab_size=vocab).lora_dims()
    att = 11 * C + 2 * C * (d["w"] + d["a"] + d["v"] + d["g"]) + C + 4 * C * C + 2 * C   # vectors, LoRAs, r_k, W, ln_x
    block = att + C + 8 * C * C + 4 * C                                                  # ffn, ln1, ln2
    return n_layer * block + 2 * C + 2 * vocab * C + 2 * C                               # ln0, emb+head, ln_out


def pick_size(candidates: Sequence[Tuple[int, int]], vocab: int, measure: Callable[[int, int], float],
              train_seconds: float, tokens_per_param: float, min_params: float, max_params: float,
              log=print) -> Tuple[Tuple[int, int], List[dict]]:
    """The largest candidate (n_layer, n_embd) with min_params <= params <= max_params whose
    measured tokens/s gives >= tokens_per_param * params tokens in ``train_seconds``;
    the smallest such candidate when none does. Measures from the largest down and stops
    at the first that fits. Returns (choice, table of what was measured)."""
    fit = [c for c in candidates if min_params <= count_params(*c, vocab) <= max_params]
    fit = sorted(fit or [min(candidates, key=lambda c: count_params(*c, vocab))],
                 key=lambda c: count_params(*c, vocab))
    table = []
    for c in reversed(fit):
        n = count_params(*c, vocab)
        tps = measure(*c)
        tokens = tps * train_seconds
        row = {"n_layer": c[0], "n_embd": c[1], "params": n, "tok_s": round(tps, 1),
               "tokens_in_budget": int(tokens), "tokens_per_param": round(tokens / n, 2)}
        table.append(row)
        log(f"sizing: {row}")
        if tokens >= tokens_per_param * n:
            return c, table
    return fit[0], table


def train_step(model, opt, x: torch.Tensor, device: torch.device, use_kernel, grad_clip: float) -> torch.Tensor:
    """One optimizer step on rows x [B, T+1]; returns the loss (a 0-d tensor, not synced)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x[:, :-1], use_kernel)                                        # [B, T, V]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach()


def make_optimizer(model, cfg: GpuTrainConfig, device):
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr_max, betas=(0.9, 0.99),
                             eps=1e-8, **kw)


def measure_tok_s(n_layer: int, n_embd: int, cfg: GpuTrainConfig, device, use_kernel, steps: int = 2) -> float:
    """Training tokens/s of a shape at the real batch and context (random tokens)."""
    model = RWKV7Train(ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=cfg.vocab_size)).to(device)
    opt = make_optimizer(model, cfg, device)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.ctx_len + 1), device=device)
    train_step(model, opt, x, device, use_kernel, cfg.grad_clip)                    # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, x, device, use_kernel, cfg.grad_clip)
    _sync(device)
    dt = time.perf_counter() - t0
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return steps * cfg.batch * cfg.ctx_len / dt


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ export
def write_checkpoint(sd: dict, out: Path, part_bytes: int, name: str = NAME) -> dict:
    """torch.save(sd) as ``out/name`` or, when larger than part_bytes, as name.part0, .part1 ...
    (stale files of the other form removed). Returns {"files", "bytes", "sha256"}."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    data = buf.getvalue()
    parts = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)]
    names = [name] if len(parts) == 1 else [f"{name}.part{i}" for i in range(len(parts))]
    for old in out.glob(name + "*"):
        if old.name not in names:
            old.unlink()
    for fname, chunk in zip(names, parts):
        tmp = out / (fname + ".tmp")
        tmp.write_bytes(chunk)
        os.replace(tmp, out / fname)
    return {"files": names, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def reassemble(src: Path, dest: Path, name: str = NAME) -> Path:
    """Join ``src``'s parts (or copy the single file) into ``dest``; checks the sha256 that
    train.json records."""
    src = Path(src)
    rec = json.loads((src / "train.json").read_text())["export"]
    data = b"".join((src / f).read_bytes() for f in rec["files"])
    if hashlib.sha256(data).hexdigest() != rec["sha256"] or len(data) != rec["bytes"]:
        raise ValueError(f"{src}: the parts do not add up to the exported checkpoint (sha256 mismatch)")
    dest = Path(dest)
    dest.write_bytes(data)
    return dest



# ------------------------------------------------------------------------------ training
def lr_at(cfg: GpuTrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine from lr_max to lr_min over the time fraction."""
    if step < cfg.warmup_steps:
        return cfg.lr_max * (step + 1) / cfg.warmup_steps
    p = min(1.0, max(0.0, progress))
    return cfg.lr_min + 0.5 * (cfg.lr_max - cfg.lr_min) * (1 + math.cos(math.pi * p))


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor, device, use_kernel) -> float:
    model.eval()
    total = 0.0
    for i in range(0, rows.shape[0], 8):
        x = rows[i:i + 8].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1], use_kernel)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item() * x.shape[0]
    model.train()
    return total / rows.shape[0]


def verify_export(out: Path, text: str = "def add(a, b):\n    return a + b\n") -> dict:
    """The exported file (reassembled) through rwkv_engine.load_model on the CPU against the
    training model rebuilt from the same file: max |logit difference| token by token."""
    import tempfile

    from rwkv_engine import load_model
    from train_model import load_exported
    with tempfile.TemporaryDirectory() as tmp:
        path = reassemble(out, Path(tmp) / NAME)
        ref, _ = load_exported(str(path))
        engine = load_model(str(path), device="cpu")
        seq = [0] + engine.tokenizer.encode(text)
        with torch.no_grad():
            want = ref(torch.tensor([seq]), False)[0]                                     # [T, V]
        state, diff = engine.new_state(1), 0.0
        for t, tok in enumerate(seq):
            logits, state = engine.forward(torch.tensor([[tok]]), state)
            diff = max(diff, float((logits[0] - want[t]).abs().max()))
    return {"tokens": len(seq), "engine_max_abs_diff": diff}


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny corpus, model and budget (CI plumbing)")
    ap.add_argument("--minutes", type=float, default=None, help="wall time of the whole run")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./train_v2_out)")
    ap.add_argument("--extra-corpus", action="append", default=[], help="more source folders (.lua/.vim)")
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--wkv", default="auto", choices=["auto", "chunked", "fla"],
                    help="WKV-7 op on CUDA (auto: fla if installed, matching and faster, when > 150 s are left)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    cfg = GpuTrainConfig()
    if args.tiny:
        cfg = tiny_config(cfg)
    if args.minutes is not None:
        cfg.minutes = args.minutes
    elif args.tiny:
        cfg.minutes = 0.4
    if args.seed is not None:
        cfg.seed = args.seed
    return train(cfg, args)


def train(cfg: GpuTrainConfig, args) -> int:
    t0 = time.monotonic()
    deadline = t0 + cfg.minutes * 60
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    out = Path(args.out or os.environ.get("OUT") or "train_v2_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"config": asdict(cfg), "device": str(device), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "status": "running"}

    def write_record():
        tmp = out / "train.json.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, out / "train.json")

    def log(msg):
        print(f"[train {time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    torch.manual_seed(cfg.seed)
    procs = 1 if cfg.tiny else max(1, min(14, (os.cpu_count() or 2) - 1))
    maker, held_rows, world_ids, data_rec, held_paths = build_corpus(
        cfg, device_sources(cfg, args.extra_corpus), procs, log)
    record.update(data=data_rec, heldout_paths=held_paths)
    write_record()
    loader = torch.utils.data.DataLoader(
        RowStream(maker, cfg.ctx_len + 1, cfg.batch, cfg.seed), batch_size=None, num_workers=cfg.workers,
        pin_memory=cuda, prefetch_factor=4 if cfg.workers else None, persistent_workers=bool(cfg.workers))
    rows = iter(loader)                  # the workers fork now, before CUDA is initialised
    if cuda:
        record["gpu"] = torch.cuda.get_device_name(0)
    from train_wkv_chunked import choose_backend
    if args.wkv == "auto" and deadline - time.monotonic() > 150:
        record["wkv"] = choose_backend(device, log=log)  # fla's Triton op if it matches and is faster
    else:
        record["wkv"] = {"backend": "chunked" if args.wkv == "auto" else args.wkv, "why": f"--wkv {args.wkv}"}
    use_kernel = "fla" if record["wkv"]["backend"] == "fla" else True if cuda else "chunked"
    cands = TINY_CANDIDATES if cfg.tiny else CANDIDATES
    sizing_s = 2.0 if cfg.tiny else 25.0
    est = deadline - time.monotonic() - cfg.export_reserve_s - sizing_s
    max_params = min(cfg.max_params, cfg.part_mib * 2**20 * cfg.max_parts / 2 * 0.98)   # bf16 export
    (n_layer, n_embd), table = pick_size(
        cands, cfg.vocab_size, lambda L, C: measure_tok_s(L, C, cfg, device, use_kernel, 1 if cfg.tiny else 2),
        est, cfg.tokens_per_param, cfg.min_params, max_params, log)
    mcfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    model = RWKV7Train(mcfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, cfg, device)
    record.update(sizing=table, model={**mcfg.to_dict(), "lora": mcfg.lora_dims(), "params": n_params},
                  curve=[])
    log(f"model {mcfg.to_dict()} {n_params / 1e6:.2f}M params")
    t_start = time.monotonic()
    t_end = deadline - cfg.export_reserve_s
    budget = max(1e-3, t_end - t_start)
    next_save = t_start + cfg.save_minutes * 60
    step, tokens, pending, ema = 0, 0, [], None
    world = torch.tensor(world_ids)

    def checkpoint(final: bool):
        held = heldout_loss(model, held_rows, device, use_kernel)
        sd = export_state_dict(model, world, torch.bfloat16)
        record["export"] = write_checkpoint(sd, out, int(cfg.part_mib * 2**20))
        record.update(steps=step, tokens_seen=tokens, train_seconds=round(time.monotonic() - t_start, 1),
                      train_loss_ema=None if ema is None else round(ema, 4), heldout_loss=round(held, 4),
                      final=final)
        write_record()
        log(f"checkpoint: step {step} held-out loss {held:.4f} -> {record['export']['files']}")
        return held

    while True:
        now = time.monotonic()
        if now >= t_end or (args.max_steps and step >= args.max_steps):
            break
        lr = lr_at(cfg, step, (now - t_start) / budget)
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(rows).to(device, non_blocking=True)                      # [B, T+1]
        pending.append(train_step(model, opt, x, device, use_kernel, cfg.grad_clip))
        step += 1
        tokens += cfg.batch * cfg.ctx_len
        if step % 10 == 0 or step == 1:
            for loss in torch.stack(pending).tolist():                    # one sync per 10 steps
                ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            pending.clear()
            el = time.monotonic() - t_start
            record["curve"].append([step, round(el, 1), tokens, round(lr, 6), round(ema, 4)])
            log(f"step {step} tok {tokens} lr {lr:.2e} loss {ema:.4f} ({tokens / max(el, 1e-9):.0f} tok/s)")
        if time.monotonic() >= next_save:
            next_save += cfg.save_minutes * 60
            checkpoint(False)
    for loss in (torch.stack(pending).tolist() if pending else []):
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
    checkpoint(True)
    record["verification"] = verify_export(out)
    record["status"] = "done"
    record["process_wall_seconds"] = round(time.monotonic() - t0, 1)
    write_record()
    log(f"done: {json.dumps({k: record[k] for k in ('steps', 'tokens_seen', 'heldout_loss', 'verification')})}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "reassemble":
        print(reassemble(Path(sys.argv[2]), Path(sys.argv[3])))
        sys.exit(0)
    sys.exit(main())
