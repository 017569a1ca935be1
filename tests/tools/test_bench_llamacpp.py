"""`rwkv-nvim bench --peer llama.cpp`: every figure of every column, on a tiny checkpoint.

The end-to-end test is marked ``llamacpp`` (and ``slow``): it uses llama.cpp's CPU tools
from ~/.cache/rwkv.nvim/llama.cpp, building them when absent (minutes), and skips like
tests/core/test_gguf_export.py: without cmake/g++, when the sdist cannot be downloaded, or with
RWKV_LLAMA_CPP_BUILD=0 and no cached build. The KL and Q4_0 helpers are tested without it.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from rwkv_engine.core.random_checkpoint import write_checkpoint
from llama_build import lc, llama_bins_or_skip
from llama_build import lc  # noqa: F401  (puts bench/ on sys.path)
from llamacpp_peer import side_by_side

FIGURES = ("prefill_tok_s", "decode_b1_tok_s", "decode_rows1_tok_s", "decode_rows4_tok_s",
           "decode_rows8_tok_s")


@pytest.fixture(scope="module")
def peaked_tiny(tmp_path_factory):
    """2 x 128, full vocabulary, trained-like (peaked) logits: greedy is not a coin toss."""
    return write_checkpoint(tmp_path_factory.mktemp("peer") / "tiny.pth", n_layer=2, n_embd=128,
                            seed=11, trained_like=True)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.llamacpp
@pytest.mark.slow
def test_peer_llama_cpp_json_has_every_row(peaked_tiny, tmp_path):
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")
    llama_bins_or_skip()
    cmd = [sys.executable, "-m", "rwkv_engine.cli", "bench", "--peer", "llama.cpp", "--model", str(peaked_tiny),
           "--json", "--repeat", "1", "--prefill-tokens", "16", "--decode-steps", "2", "--check-tokens", "8",
           "--kl-context", "16", "--kl-positions", "6", "--kl-top", "64", "--work", str(tmp_path / "gguf")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)

    assert r["peer"] == "llama.cpp" and r["settings"]["threads"] == 2
    assert r["settings"]["rows"] == [1, 4, 8] and r["settings"]["prefill_tokens"] == 16
    for side, cols in (("ours", ("fp32", "int8")), ("theirs", ("f32", "q8_0", "q4_0"))):
        assert sorted(r[side]) == sorted(cols)
        for col in cols:
            for k in FIGURES:
                assert _number(r[side][col][k]) and r[side][col][k] > 0, (side, col, k)
    assert sorted(r["ratios"]) == ["fp32/f32", "int8/q4_0", "int8/q8_0"]
    for pair in r["ratios"].values():
        assert all(_number(pair[k]) and pair[k] > 0 for k in FIGURES)

    ck = r["conversion_check"]
    assert ck["ok"] and ck["equal"] == ck["tokens"] == 8, ck
    assert ck["max_abs_logprob_diff_top5"] < 2e-3

    pairs = r["accuracy"]["pairs"]
    assert sorted(pairs) == sorted(["ours int8 vs ours fp32", "llama.cpp Q8_0 vs llama.cpp f32",
                                    "llama.cpp Q4_0 vs llama.cpp f32", "llama.cpp f32 vs ours fp32"])
    for name, a in pairs.items():
        assert a["positions"] == 6, name
        for k in ("kl_mean", "kl_median", "kl_max", "top1_agreement", "ref_mass_outside_top_k_mean"):
            assert _number(a[k]) and a[k] >= 0, (name, k)
    assert pairs["llama.cpp f32 vs ours fp32"]["kl_mean"] < 1e-3           # same model, two engines
    assert _number(pairs["ours int8 vs ours fp32"]["kl_exact_mean"])
    assert pairs["llama.cpp Q4_0 vs llama.cpp f32"]["kl_mean"] > pairs["llama.cpp Q8_0 vs llama.cpp f32"]["kl_mean"]

    cpu = r["machine"]["cpu"]
    assert cpu["model"] and isinstance(cpu["flags"], list) and isinstance(cpu["amx_workaround_used"], bool)
    assert len(r["machine"]["load_avg_start"]) == 3 and len(r["samples"]["rounds"]) == 1
    assert set(r["llama_cpp"]["gguf"]) == {"f32", "q8_0", "q4_0"}


# -- without llama.cpp ------------------------------------------------------------------------
def test_kl_coarse_is_exact_with_full_support_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.log_softmax(p + 0.3 * torch.randn(50, generator=g, dtype=torch.float64), -1)
    exact = float((p.exp() * (p - q)).sum())
    full = side_by_side._topk_dicts(p[None], 50)[0], side_by_side._topk_dicts(q[None], 50)[0]
    assert abs(side_by_side.kl_coarse(*full) - exact) < 1e-9
    for k in (1, 5, 20):
        part = side_by_side._topk_dicts(p[None], k)[0], side_by_side._topk_dicts(q[None], k)[0]
        assert 0 <= side_by_side.kl_coarse(*part) <= exact + 1e-12
    same = side_by_side._topk_dicts(p[None], 10)[0]
    assert side_by_side.kl_coarse(same, same) == 0.0


def test_requantize_q4_0_from_the_f32_export(peaked_tiny, tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    from rwkv_engine.core.gguf_export import export_gguf

    Q = gguf.GGMLQuantizationType
    export_gguf(peaked_tiny, tmp_path / "f32.gguf", "f32")
    export_gguf(peaked_tiny, tmp_path / "q8.gguf", "q8_0")
    info = lc.requantize_gguf(tmp_path / "f32.gguf", tmp_path / "q8.gguf", tmp_path / "q4.gguf")
    exact = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "f32.gguf")).tensors}
    q8 = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    r = gguf.GGUFReader(str(tmp_path / "q4.gguf"))
    q4 = {t.name: t for t in r.tensors}
    assert list(q4) == list(q8)
    assert int(r.fields["general.file_type"].contents()) == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<s>", "\\x00", "\\x01"]
    for name, t in q4.items():
        if name == "output.weight":
            assert t.tensor_type == Q.Q8_0
        elif q8[name].tensor_type == Q.Q8_0:
            assert t.tensor_type == Q.Q4_0, name
            deq = gguf.quants.dequantize(t.data, Q.Q4_0).reshape(exact[name].data.shape)
            ref = exact[name].data
            assert abs(deq - ref).max() <= abs(ref).max() / 7, name       # 4-bit, per 32 values
        else:
            assert t.tensor_type == q8[name].tensor_type and bytes(t.data) == bytes(q8[name].data)
    assert info["tensor_types"]["Q4_0"] > 0 and info["file_bytes"] < (tmp_path / "q8.gguf").stat().st_size
