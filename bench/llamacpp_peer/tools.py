"""llama-bench / llama-batched-bench runs, and Q4_0 GGUFs written with gguf-py
(``requantize_gguf``: ggml's reference quantizer, so llama-quantize is not built)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import List, Sequence

from .build import BuildError


# -- llama-bench / llama-batched-bench --------------------------------------------------
def _run_tool(cmd: List[str], timeout: float) -> str:
    """stdout of a llama.cpp tool; BuildError (with its output's tail) when it fails."""
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{Path(cmd[0]).name} ran past {timeout:.0f} s: {' '.join(cmd)}") from None
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-12:])
        raise BuildError(f"{Path(cmd[0]).name} exit {r.returncode} ({' '.join(cmd)}):\n{tail}")
    return r.stdout


def _json_lines(text: str) -> List[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def llama_bench(bins: Path, gguf, prompt_tokens: int, gen_tokens: int, threads: int,
                repetitions: int = 1, timeout: float = 900.0) -> dict:
    """``llama-bench -p P -n N -t T -r R -o jsonl`` (after its own warm-up run).

    Returns ``prefill_tok_s`` (pp: one batch of P random tokens, n_ubatch 512) and
    ``decode_b1_tok_s`` (tg: N tokens one at a time from an empty state), each the best
    of the R samples, plus the samples and the command."""
    cmd = [str(Path(bins) / "llama-bench"), "-m", str(gguf), "-p", str(prompt_tokens),
           "-n", str(gen_tokens), "-t", str(threads), "-r", str(repetitions), "-o", "jsonl"]
    rows = _json_lines(_run_tool(cmd, timeout))
    pp = [r for r in rows if r.get("n_prompt") == prompt_tokens and r.get("n_gen") == 0]
    tg = [r for r in rows if r.get("n_gen") == gen_tokens and r.get("n_prompt") == 0]
    if not pp or not tg:
        raise BuildError(f"llama-bench printed no pp{prompt_tokens}/tg{gen_tokens} result: {rows!r:.300}")
    pps, tgs = [float(x) for x in pp[0]["samples_ts"]], [float(x) for x in tg[0]["samples_ts"]]
    return {"prefill_tok_s": max(pps), "decode_b1_tok_s": max(tgs), "pp_samples": pps,
            "tg_samples": tgs, "model_type": pp[0].get("model_type"),
            "model_size": pp[0].get("model_size"), "command": cmd}


def batched_bench(bins: Path, gguf, rows: Sequence[int], gen_tokens: int, threads: int,
                  prompt_tokens: int = 8, timeout: float = 900.0) -> dict:
    """``llama-batched-bench -npp P -ntg N -npl rows... -t T -tb T`` (one process; it warms
    up with 16 tokens). For each row count: every sequence gets its own P-token prompt,
    then N steps each decode one token per sequence in one batch (logits for every
    row). Returns ``{rows: aggregate decode tok/s (pl*N / t_tg)}`` and the command."""
    rows = [int(r) for r in rows]
    ctx = max(512, max(rows) * (prompt_tokens + gen_tokens) + 64)
    cmd = [str(Path(bins) / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx),
           "-npp", str(prompt_tokens), "-ntg", str(gen_tokens), "-npl", ",".join(map(str, rows)),
           "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
    got = {}
    for r in _json_lines(_run_tool(cmd, timeout)):
        if "pl" in r and "speed_tg" in r:
            got[int(r["pl"])] = max(got.get(int(r["pl"]), 0.0), float(r["speed_tg"]))
    missing = [r for r in rows if r not in got]
    if missing:
        raise BuildError(f"llama-batched-bench printed no result for {missing} sequences")
    return {"decode_rows_tok_s": {r: got[r] for r in rows}, "command": cmd}


# -- Q4_0 (and other gguf-py types) from an exported file ------------------------------------
def requantize_gguf(f32_path, like_path, dst, qtype: str = "q4_0",
                    keep: Sequence[str] = ("output.weight",)) -> dict:
    """Write ``dst``: the GGUF ``like_path`` (an export whose large matrices are Q8_0) with
    every Q8_0 tensor re-quantized to ``qtype`` from the exact values in ``f32_path``
    (the f32 export of the same checkpoint), except the tensors named in ``keep``
    (copied as they are in ``like_path``). Metadata is copied; ``general.file_type``
    is set to the new type.

    With the defaults this is llama-quantize's Q4_0 recipe on an rwkv7 model (all 2-D
    weights but the time_mix_w1/w2 LoRA, the fused lerp and the norms: exactly what the
    q8_0 export makes Q8_0), except that llama-quantize stores ``output.weight`` as Q6_K,
    which gguf-py cannot write: it stays Q8_0 here (8.5 instead of 6.6 bits/weight)."""
    import numpy as np
    import gguf

    Q = gguf.GGMLQuantizationType
    qt = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q8_0": Q.Q8_0}[qtype]
    ftype = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
             "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    t0 = time.perf_counter()
    ref = gguf.GGUFReader(str(f32_path))
    like = gguf.GGUFReader(str(like_path))
    exact = {t.name: t for t in ref.tensors}
    arch = None
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    w = gguf.GGUFWriter(str(tmp), arch="rwkv7")
    try:
        for field in like.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                if field.name == "general.architecture":
                    arch = field.contents() if hasattr(field, "contents") else None
                continue
            if not hasattr(field, "contents"):
                raise BuildError("requantize_gguf needs gguf >= 0.11 (pip install -U gguf)")
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = int(ftype) if field.name == "general.file_type" else field.contents()
            w.add_key_value(field.name, value, vtype, sub_type=sub)
        if arch not in (None, "rwkv7"):
            raise BuildError(f"{like_path}: architecture {arch!r}, not rwkv7")
        plan, counts = [], {}
        for t in like.tensors:
            shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))   # numpy order
            if t.tensor_type == Q.Q8_0 and t.name not in keep:
                src = exact.get(t.name)
                if src is None or src.tensor_type != Q.F32:
                    raise BuildError(f"{f32_path}: no f32 tensor {t.name} to quantize from")
                data = gguf.quants.quantize(np.ascontiguousarray(src.data, dtype=np.float32)
                                            .reshape(shape), qt)
                q = qt
            else:
                data, q = t.data, t.tensor_type
            counts[q.name] = counts.get(q.name, 0) + 1
            plan.append((t.name, data))
            w.add_tensor_info(t.name, shape, np.dtype(np.float32), int(data.nbytes), raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, data in plan:
            w.write_tensor_data(data)
        w.close()
        os.replace(tmp, dst)
    except BaseException:
        w.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return {"path": str(dst), "type": qtype, "tensor_types": counts, "kept": list(keep),
            "file_bytes": dst.stat().st_size, "seconds": round(time.perf_counter() - t0, 3)}
