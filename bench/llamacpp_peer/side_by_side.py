"""`rwkv-nvim bench --peer llama.cpp`: our engine against llama.cpp on the same checkpoint.

One run, one process (llama.cpp's tools as subprocesses):

1. llama.cpp's CPU tools are built or reused (``llamacpp_peer.build``: cached in
   ~/.cache/rwkv.nvim/llama.cpp, minutes when cold).
2. The checkpoint is exported with our exporter to f32 and Q8_0 GGUFs; Q4_0 is the Q8_0
   file with every Q8_0 matrix re-quantized to Q4_0 from the f32 values (gguf-py, ggml's
   reference Q4_0; output.weight stays Q8_0 where llama-quantize would write Q6_K).
3. Conversion check: greedy continuation (``--check-tokens``, 32) of the same prompt by
   llama-server on the f32 GGUF and by our fp32 engine; any difference is reported loudly
   and the command exits with status 3 (after printing everything).
4. Accuracy of each quantized mode against fp32 at the same positions of one fixed token
   sequence (the replay's source file, teacher-forced): ours int8 vs ours fp32, llama.cpp
   Q8_0/Q4_0 vs llama.cpp f32, and llama.cpp f32 vs ours fp32. llama-server's ``n_probs``
   gives each position's top-K log-probabilities (K = ``--kl-top``), so the KL divergence
   KL(ref || mode) is computed on a coarse-grained vocabulary: one bin per token in both
   top-K lists, one bin for everything else (by the data-processing inequality a lower
   bound of the full KL, equal to it when the rest bin holds ~no mass; the mean mass
   outside the reference's top-K is reported). Ours gets the same coarse-grained KL, so
   the columns compare, plus the exact full-vocabulary KL.
5. Speed, interleaved: each of ``--repeat`` rounds takes one sample of every figure of
   every column (ours fp32, ours int8, llama.cpp f32, Q8_0, Q4_0), and the best sample
   is kept, so load from other processes hits all columns alike. Same threads
   (``--threads``, default 2 here), prompt length (``--prefill-tokens``) and generated
   tokens (``--decode-steps``) on both sides:
     prefill       ours: forward of B=1 x T random tokens; llama.cpp: llama-bench pp T
     decode b1     ours: ``steps`` single-row steps; llama.cpp: llama-bench tg ``steps``
     rows R        aggregate tok/s of R rows decoding together for ``steps`` steps after
                   an 8-token prompt each; ours: one [R, 1] forward per step; llama.cpp:
                   llama-batched-bench -npp 8 -ntg steps -npl R (one batch of R tokens
                   per step, logits for every row)
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .build import bin_dir, build, build_info, cpu_summary, version
from .server import Server
from .tools import batched_bench, llama_bench, requantize_gguf

MODES = ("fp32", "int8", "q4", "q4a8")
TYPES = ("f32", "q8_0", "q4_0")
PAIRS = (("fp32", "f32"), ("int8", "q8_0"), ("int8", "q4_0"), ("q4", "q4_0"), ("q4a8", "q4_0"))  # ours / theirs
LABEL = {"fp32": "fp32", "int8": "int8", "q4": "q4", "q4a8": "q4a8", "f32": "f32", "q8_0": "Q8_0", "q4_0": "Q4_0"}
BATCHED_PROMPT = 8          # tokens of prompt per row before the timed decode (both sides)


def _csv(text: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"--{what}: {', '.join(bad) or 'nothing given'}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _say(msg: str) -> None:
    print(f"bench[llama.cpp]: {msg}", file=sys.stderr, flush=True)


def _load() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# -- ours ---------------------------------------------------------------------------------
class OursSampler:
    """One sample of every figure per call, for one loaded model (warm-up on the first)."""

    def __init__(self, model, prefill_tokens: int, steps: int, rows: Sequence[int]):
        import torch

        self.model, self.steps = model, steps
        self.rows = sorted(set([1, *rows]))
        g = torch.Generator().manual_seed(0)
        V = model.shape.vocab_size
        lo = 257 if V > 1024 else 1
        self.prompt = torch.randint(lo, V, (1, prefill_tokens), generator=g)       # [1, T]
        self.tok = {r: torch.randint(lo, V, (r, 1), generator=g) for r in self.rows}  # [r, 1]
        self.warm = False

    def _prefill(self) -> float:
        t0 = time.perf_counter()
        self.model.forward(self.prompt, self.model.new_state(1))
        return time.perf_counter() - t0

    def _decode(self, rows: int) -> float:
        m = self.model
        _, s = m.forward(self.prompt[:, :BATCHED_PROMPT].expand(rows, -1), m.new_state(rows))
        tok = self.tok[rows]
        t0 = time.perf_counter()
        for _ in range(self.steps):
            _, s = m.forward(tok, s)
        return time.perf_counter() - t0

    def sample(self) -> Dict[str, float]:
        import torch

        with torch.inference_mode():
            if not self.warm:
                self._prefill()
                for r in self.rows:
                    self._decode(r)
                self.warm = True
            out = {"prefill_tok_s": self.prompt.shape[1] / self._prefill()}
            for r in self.rows:
                out[f"decode_rows{r}_tok_s"] = r * self.steps / self._decode(r)
        out["decode_b1_tok_s"] = out["decode_rows1_tok_s"]       # the same single-row steps
        return out


def _ours_logprobs(model, ids: Sequence[int], start: int, n: int):
    """[n, V] float64 log-softmax at positions start .. start+n-1 (teacher-forced)."""
    import torch

    with torch.inference_mode():
        logits, _ = model.forward(torch.tensor([list(ids[:start + n])]), model.new_state(1),
                                  all_logits=True)
    return torch.log_softmax(logits[0, start:start + n].double(), -1)


def _ours_greedy(model, prompt: Sequence[int], n: int):
    import torch

    toks, logps = [], []
    with torch.inference_mode():
        logits, state = model.forward(torch.tensor([list(prompt)]), model.new_state(1))
        for _ in range(n):
            logps.append(torch.log_softmax(logits[0].double(), -1))
            toks.append(int(logits[0].argmax()))
            logits, state = model.forward(torch.tensor([[toks[-1]]]), state)
    return toks, logps


def _align_steps(tokens: Sequence[int], tops: List[Dict[int, float]]):
    """(step, top log-probabilities) pairs of a llama-server greedy run: it leaves out the
    probabilities of a token whose text is an incomplete UTF-8 sequence, so each entry is
    matched to the step whose greedy token is its argmax."""
    j = 0
    for s, tok in enumerate(tokens):
        if j < len(tops) and tops[j] and max(tops[j], key=tops[j].get) == tok:
            yield s, tops[j]
            j += 1


def _topk_dicts(logp, k: int) -> List[Dict[int, float]]:
    v, i = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [dict(zip(ii.tolist(), vv.tolist())) for vv, ii in zip(v, i)]


# -- KL -----------------------------------------------------------------------------------
def kl_coarse(p: Dict[int, float], q: Dict[int, float]) -> float:
    """KL(p || q) over bins {each token in both top-K lists} + {the rest}, from top-K
    log-probabilities (a lower bound of the full KL; equal when the rest is ~empty)."""
    common = [i for i in p if i in q]
    kl, sp, sq = 0.0, 0.0, 0.0
    for i in common:
        pi = math.exp(p[i])
        kl += pi * (p[i] - q[i])
        sp += pi
        sq += math.exp(q[i])
    pr, qr = 1.0 - sp, 1.0 - sq
    if pr > 1e-12:
        kl += pr * math.log(pr / max(qr, 1e-12))
    return max(kl, 0.0)


def _summary(ps: List[Dict[int, float]], qs: List[Dict[int, float]], exact=None) -> dict:
    kls = [kl_coarse(p, q) for p, q in zip(ps, qs)]
    top1 = [max(p, key=p.get) == max(q, key=q.get) for p, q in zip(ps, qs)]
    outside = [1.0 - sum(math.exp(v) for v in p.values()) for p in ps]
    s = sorted(kls)
    out = {"positions": len(kls), "kl_mean": sum(kls) / len(kls), "kl_median": s[len(s) // 2],
           "kl_max": s[-1], "top1_agreement": sum(top1) / len(top1),
           "ref_mass_outside_top_k_mean": sum(outside) / len(outside)}
    if exact is not None:
        out["kl_exact_mean"] = float(exact.mean())
        out["kl_exact_max"] = float(exact.max())
    return out


def _exact_kl(p_logp, q_logp):
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1).clamp_min(0)


# -- the run ------------------------------------------------------------------------------
def _best(samples: List[Dict[str, float]]) -> Dict[str, float]:
    keys = [k for k in samples[0] if k.endswith("_tok_s")]
    return {k: max(s[k] for s in samples) for k in keys}


def _token_sequence(model, path: Optional[str], need: int) -> List[int]:
    from rwkv_engine.cli.bench_replay import default_replay_file

    with open(path or default_replay_file(), encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    ids = model.tokenizer.encode(text)
    if not ids:
        raise ValueError(f"{path}: no tokens to measure on")
    while len(ids) < need:
        ids = ids + ids
    return ids[:need]


def run(args) -> int:
    import torch

    from rwkv_engine import load_model
    from rwkv_engine.core.gguf_export import export_gguf, require_gguf
    from rwkv_engine.pipeline.config import EngineConfig
    from rwkv_engine.pipeline.loading import resolve_model_path, settle_garbage_collector

    if args.device != "cpu":
        raise ValueError("--peer llama.cpp compares CPU figures: use --device cpu")
    modes = _csv(args.modes, MODES, "modes")
    types = _csv(args.gguf_types, TYPES, "gguf-types")
    rows = sorted({int(r) for r in str(args.rows).split(",") if r.strip()})
    if not rows or rows[0] < 1:
        raise ValueError("--rows: positive row counts, e.g. 1,4,8")
    threads = args.threads or 2
    steps, T, K = args.decode_steps, args.prefill_tokens, args.kl_top
    try:
        require_gguf()
    except ImportError as e:
        print(f"rwkv-nvim bench --peer llama.cpp: {e}", file=sys.stderr)
        return 1
    load_start = _load()
    t_start = time.perf_counter()

    bins = bin_dir()
    if bins is None or not all((bins / t).is_file() for t in ("llama-bench", "llama-batched-bench")):
        _say("building llama.cpp's CPU tools (cached afterwards; minutes) ...")
    bins = build(jobs=args.jobs, log=_say)
    for tool in ("llama-server", "llama-bench", "llama-batched-bench"):
        if not (bins / tool).is_file():
            raise RuntimeError(f"{bins}: no {tool} in the cached llama.cpp build "
                               "(rebuild: python bench/llama_cpp.py build --force)")

    path = resolve_model_path(EngineConfig(model=args.model))
    torch.set_num_threads(threads)
    # what a user gets without configuring anything: dtype "auto" (measured per CPU, cached)
    from rwkv_engine.pipeline.loading import cpu_precision_for
    auto_mode, auto_record = cpu_precision_for(EngineConfig(model=str(path), threads=threads), path)
    _say(f"dtype auto picks {auto_record.get('summary', auto_mode)}")
    models = {m: load_model(path, device="cpu", dtype=m) for m in modes if m != "fp32"}
    models["fp32"] = load_model(path, device="cpu", dtype="fp32")     # the reference, always
    settle_garbage_collector()          # as the plugin does after loading (pipeline/loading.py)
    shape = models["fp32"].shape

    tmp = None
    if args.work:
        work = Path(args.work).expanduser()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="rwkv-llamacpp-peer-")
        work = Path(tmp.name)
    try:
        # -- GGUFs
        ggufs, conv = {}, {}
        for t in ["f32"] + [t for t in ("q8_0",) if t in types or "q4_0" in types]:
            dst = work / f"{Path(path).stem}-{t}.gguf"
            info = export_gguf(path, dst, t)
            ggufs[t] = dst
            conv[t] = {"path": str(dst), "file_bytes": info["file_bytes"], "seconds": info["seconds"],
                       "how": f"rwkv-nvim export-gguf --type {t}"}
        if "q4_0" in types:
            dst = work / f"{Path(path).stem}-q4_0.gguf"
            info = requantize_gguf(ggufs["f32"], ggufs["q8_0"], dst, "q4_0")
            ggufs["q4_0"] = dst
            conv["q4_0"] = {"path": str(dst), "file_bytes": info["file_bytes"], "seconds": info["seconds"],
                            "tensor_types": info["tensor_types"],
                            "how": "Q8_0 export re-quantized to Q4_0 from the f32 values (gguf-py "
                                   "reference Q4_0); output.weight kept Q8_0 (llama-quantize: Q6_K)"}
        sizes = ", ".join("%s %.0f MiB" % (t, conv[t]["file_bytes"] / 2**20) for t in conv)
        _say(f"GGUFs written: {sizes}")

        # -- conversion check and accuracy (llama-server, teacher-forced)
        start = max(1, args.kl_context) - 1
        n_pos = args.kl_positions
        ids = _token_sequence(models["fp32"], args.replay_file,
                              max(start + n_pos, args.kl_context) + 1)
        prompt = ids[:max(1, args.kl_context)]
        ctx = max(4096, len(ids) + args.check_tokens + 64)
        theirs_top, check = {}, None
        for t in ["f32"] + [t for t in types if t != "f32"]:
            with Server(ggufs[t], bins=bins, threads=threads, ctx=ctx) as srv:
                if t == "f32":
                    g = srv.greedy(prompt, args.check_tokens, n_probs=5)
                if n_pos > 0:
                    theirs_top[t] = srv.teacher_forced(ids, start, n_pos, K)
            if t == "f32":
                ours_toks, ours_logps = _ours_greedy(models["fp32"], prompt, args.check_tokens)
                first = next((i for i, (a, b) in enumerate(zip(ours_toks, g["tokens"])) if a != b), None)
                if len(g["tokens"]) != len(ours_toks) and first is None:
                    first = min(len(g["tokens"]), len(ours_toks))
                upto = len(ours_toks) if first is None else first + 1
                diff = max((abs(lp - float(ours_logps[s][tid])) for s, top in
                            _align_steps(g["tokens"][:upto], g["top_logprobs"]) for tid, lp in top.items()),
                           default=float("nan"))
                check = {"tokens": args.check_tokens, "prompt_tokens": len(prompt),
                         "equal": sum(a == b for a, b in zip(ours_toks, g["tokens"])),
                         "first_difference": first, "ok": first is None,
                         "max_abs_logprob_diff_top5": diff, "ours": ours_toks, "llama_cpp": g["tokens"]}
                if not check["ok"]:
                    _say(f"CONVERSION MISMATCH: llama.cpp f32 and our fp32 greedy tokens differ from "
                         f"step {first} ({check['equal']}/{args.check_tokens} equal) -- the comparison "
                         "below is NOT of the same model")
        accuracy = {"method": (
            f"teacher-forced over {n_pos} positions (after {start + 1} .. {start + n_pos} tokens of "
            f"{os.path.basename(args.replay_file or 'json/decoder.py')}); KL(ref || mode) on bins = "
            f"tokens in both top-{K} lists + one rest bin (lower bound of the full KL); llama.cpp "
            "log-probabilities from llama-server n_probs (log-softmax of the raw logits, "
            "post_sampling_probs false); ours also exact over the full vocabulary"),
            "top_k": K, "positions": n_pos, "pairs": {}}
        if n_pos > 0:
            ref = _ours_logprobs(models["fp32"], ids, start, n_pos)
            ref_top = _topk_dicts(ref, K)
            for m in (m for m in modes if m != "fp32"):
                q = _ours_logprobs(models[m], ids, start, n_pos)
                accuracy["pairs"][f"ours {m} vs ours fp32"] = _summary(ref_top, _topk_dicts(q, K), _exact_kl(ref, q))
            for t in types:
                if t != "f32":
                    accuracy["pairs"][f"llama.cpp {LABEL[t]} vs llama.cpp f32"] = _summary(theirs_top["f32"], theirs_top[t])
            accuracy["pairs"]["llama.cpp f32 vs ours fp32"] = _summary(ref_top, theirs_top["f32"])

        # -- speed, interleaved rounds
        samplers = {m: OursSampler(models[m], T, steps, rows) for m in modes}
        samples: Dict[str, List[dict]] = {k: [] for k in list(modes) + list(types)}
        from rwkv_engine.cli.bench import read_bandwidth_gbs
        rounds = []
        stream = []
        for rep in range(max(1, args.repeat)):
            r0, l0 = time.perf_counter(), _load()
            stream.append(read_bandwidth_gbs())
            for m in modes:
                samples[m].append(samplers[m].sample())
            for t in types:
                lb = llama_bench(bins, ggufs[t], T, steps, threads, repetitions=1)
                bb = batched_bench(bins, ggufs[t], rows, steps, threads, prompt_tokens=BATCHED_PROMPT)
                s = {"prefill_tok_s": lb["prefill_tok_s"], "decode_b1_tok_s": lb["decode_b1_tok_s"]}
                s.update({f"decode_rows{r}_tok_s": v for r, v in bb["decode_rows_tok_s"].items()})
                samples[t].append(s)
            rounds.append({"round": rep + 1, "load_avg_before": l0, "load_avg_after": _load(),
                           "seconds": round(time.perf_counter() - r0, 1)})
            _say(f"round {rep + 1}/{args.repeat} done in {rounds[-1]['seconds']} s (load {l0} -> "
                 f"{rounds[-1]['load_avg_after']})")
        ours = {m: _best(samples[m]) for m in modes}
        theirs = {t: _best(samples[t]) for t in types}
        # batch-1 step against the memory read rate measured in the same rounds
        for m in modes:
            wb = models[m].weight_bytes()
            ours[m]["weights_mb"] = wb / 2**20
            ours[m]["decode_b1_gbs"] = wb * ours[m]["decode_b1_tok_s"] / 1e9
            ours[m]["decode_b1_of_read_rate"] = ours[m]["decode_b1_gbs"] / statistics.median(stream)
        ratios = {}
        for a, b in PAIRS:
            if a in ours and b in theirs:
                ratios[f"{a}/{b}"] = {k: ours[a][k] / theirs[b][k] for k in ours[a] if k in theirs[b]}
    finally:
        if tmp is not None:
            tmp.cleanup()

    cpu = cpu_summary()
    binfo = build_info() or {}
    result = {
        "schema": 1, "peer": "llama.cpp",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "rwkv-nvim " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "load_avg_start": load_start,
                    "load_avg_end": _load()},
        "model": {"path": str(path), "n_layer": shape.n_layer, "n_embd": shape.n_embd,
                  "vocab": shape.vocab_size},
        "settings": {"threads": threads, "prefill_tokens": T, "decode_steps": steps, "rows": rows,
                     "batched_prompt_tokens": BATCHED_PROMPT, "repeat": args.repeat,
                     "best_of": "max tok/s over interleaved rounds", "modes": modes, "gguf_types": types},
        "llama_cpp": {"version": binfo.get("llama_cpp_python_version", version()),
                      "bin_dir": str(bins), "built_at": binfo.get("built_at"),
                      "amx_disabled_flags": binfo.get("amx_disabled_flags", []),
                      "ggml_native": binfo.get("ggml_native"), "gguf": conv},
        "conversion_check": check,
        "read_rate_gbs": {"median": round(statistics.median(stream), 2), "best": round(max(stream), 2),
                          "samples": [round(x, 2) for x in stream],
                          "how": "torch sum over a 256 MB fp32 tensor, best of 5, each round; the "
                                 "median over rounds is the yardstick of decode_b1_of_read_rate"},
        "auto": {"mode": auto_mode, "summary": auto_record.get("summary"), "why": auto_record.get("why")},
        "ours": ours, "theirs": theirs, "ratios": ratios,
        "accuracy": accuracy,
        "samples": {"ours": {m: samples[m] for m in modes}, "theirs": {t: samples[t] for t in types},
                    "rounds": rounds},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    if check is not None and not check["ok"]:
        print("bench: CONVERSION MISMATCH between llama.cpp's f32 GGUF and our fp32 engine "
              f"(greedy {check['equal']}/{check['tokens']} equal, first difference at step "
              f"{check['first_difference']}); exit status 3", file=sys.stderr)
        return 3
    return 0


def _figures(r: dict) -> List[tuple]:
    s = r["settings"]
    out = [("prefill_tok_s", f"prefill (B=1, T={s['prefill_tokens']})"),
           ("decode_b1_tok_s", "decode batch 1 (llama-bench tg)")]
    for n in s["rows"]:
        out.append((f"decode_rows{n}_tok_s", f"decode {n} row{'s' if n > 1 else ''}, aggregate"))
    return out


def print_table(r: dict) -> None:
    m, s, c = r["model"], r["settings"], r["machine"]["cpu"]
    print(f"model    {m['path']}  ({m['n_layer']}x{m['n_embd']}, vocab {m['vocab']})")
    print(f"cpu      {c['model']}, {c['cores']} cores; flags {' '.join(c['flags']) or '-'}; "
          f"AMX {'present' if c['amx'] else 'absent'}, workaround "
          f"{'used (' + ' '.join(c['amx_disabled_flags']) + ')' if c['amx_workaround_used'] else 'not used'}")
    print(f"settings {s['threads']} threads, prompt {s['prefill_tokens']} tokens, {s['decode_steps']} "
          f"decode steps, rows {','.join(map(str, s['rows']))}, best of {s['repeat']} interleaved rounds; "
          f"load avg {r['machine']['load_avg_start']} -> {r['machine']['load_avg_end']}")
    if r.get("auto"):
        print(f"auto     dtype \"auto\" (no configuration) runs {r['auto']['mode']}: {r['auto']['summary']}")
    lcp = r["llama_cpp"]
    print(f"llama.cpp {lcp['version']} (llama-cpp-python sdist, GGML_NATIVE), {lcp['bin_dir']}")
    ck = r["conversion_check"]
    if ck:
        print(f"conversion check (f32 GGUF vs our fp32, greedy {ck['tokens']} tokens): "
              f"{ck['equal']}/{ck['tokens']} equal, max |logprob diff| {ck['max_abs_logprob_diff_top5']:.1e}  "
              + ("OK" if ck["ok"] else f"*** MISMATCH from step {ck['first_difference']} ***"))
    cols = [("ours", k) for k in r["ours"]] + [("theirs", k) for k in r["theirs"]]
    head = [f"{'rwkv.nvim ' + LABEL[k] if w == 'ours' else 'llama.cpp ' + LABEL[k]}" for w, k in cols]
    rat = list(r["ratios"])
    print(f"{'tok/s':32}" + "".join(f"{h:>15}" for h in head) + "".join(f"{x:>12}" for x in rat))
    for key, label in _figures(r):
        vals = [r[w][k].get(key) for w, k in cols]
        line = f"{label:32}" + "".join(f"{v:15.1f}" if v is not None else f"{'-':>15}" for v in vals)
        line += "".join(f"{r['ratios'][x].get(key, float('nan')):11.2f}x" for x in rat)
        print(line)
    if r.get("read_rate_gbs"):
        rr = r["read_rate_gbs"]["median"]
        parts = [f"{LABEL.get(k, k)}: {v['weights_mb']:.0f} MB weights, {v['decode_b1_gbs']:.1f} GB/s = "
                 f"{100 * v['decode_b1_of_read_rate']:.0f} %" for k, v in r["ours"].items() if "weights_mb" in v]
        print(f"batch-1 step vs the read rate measured in the same rounds ({rr:.1f} GB/s): " + "; ".join(parts))
    acc = r["accuracy"]
    if acc["pairs"]:
        print(f"accuracy ({acc['positions']} positions, KL on top-{acc['top_k']} bins + rest):")
        for name, a in acc["pairs"].items():
            extra = (f", exact {a['kl_exact_mean']:.4g}" if "kl_exact_mean" in a else "")
            print(f"  {name:32} KL mean {a['kl_mean']:.4g} (median {a['kl_median']:.3g}, max "
                  f"{a['kl_max']:.3g}{extra}), top-1 agree {100 * a['top1_agreement']:.1f} %, "
                  f"ref mass outside top-K {a['ref_mass_outside_top_k_mean']:.3f}")
