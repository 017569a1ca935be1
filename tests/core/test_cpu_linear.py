"""The CPU fast paths against their references: q8 products (kernels/rwkv7_cpu_linear.cpp)
against the scalar C++ loop and plain torch, the few-row fp32 product against F.linear,
and the fused one-token step (kernels/rwkv7_cpu_step.cpp) against the torch layer code."""
import pytest
import torch
import torch.nn.functional as F

from rwkv_engine.core.random_checkpoint import make_state_dict
from rwkv_engine.core.checkpoint import infer_shape
from rwkv_engine.core.linear import (F32Linear, Q8Linear, cpu_ops, dequantize_q8, make_linear,
                                     quantize_activations, quantize_q8)
from rwkv_engine.core.model import RWKV7

ops = cpu_ops()
needs_kernel = pytest.mark.skipif(ops is None, reason="CPU kernels not built (no compiler?)")


def _weights(O, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(O, I, generator=g) * 0.05


def test_q8_packing_holds_each_block_to_half_a_step():
    W = _weights(64, 96)
    W[3, 32:64] = 0.0                                           # an all-zero block: scale 0, exact
    wq, ws = quantize_q8(W)
    assert wq.shape == (4, 3, 512) and wq.dtype == torch.int8 and ws.shape == (4, 3, 16)
    assert ws.dtype == torch.float16
    back = dequantize_q8(wq, ws)
    step = W.abs().reshape(64, 3, 32).amax(-1, keepdim=True) / 127          # [o, b, 1]
    # half a step, plus the fp16 rounding of the scale over up to 127 steps
    assert ((back - W).abs().reshape(64, 3, 32) <= step / 2 + step * 127 * 2**-11 + 1e-7).all()
    assert (back[3, 32:64] == 0).all()
    # the documented layout: wq[tile, block, g, lane, p] = q[16 tile + lane, 32 block + 2 g + p]
    o, i = 37, 70
    tile, lane, blk, g, p = o // 16, o % 16, i // 32, (i % 32) // 2, i % 2
    q = wq.view(4, 3, 16, 16, 2)[tile, blk, g, lane, p].item()
    assert q == round(W[o, i].item() / ws[tile, blk, lane].float().item())


def test_q8_rejects_shapes_it_cannot_pack():
    with pytest.raises(ValueError, match="O % 16"):
        quantize_q8(torch.zeros(24, 64))
    assert isinstance(make_linear(torch.zeros(24, 64), "int8"), F32Linear)   # falls back to fp32
    assert isinstance(make_linear(torch.zeros(32, 64), "int8"), Q8Linear)
    assert isinstance(make_linear(torch.zeros(32, 64), None), F32Linear)


def test_activation_rounding_is_per_row_and_block():
    x = torch.tensor([[1000.0] + [0.001] * 31 + [0.001] * 32])
    xq = quantize_activations(x)
    assert xq[0, 32:].sub(0.001).abs().max() < 1e-7     # the second block keeps its small values
    assert xq[0, 1] == 0.0                              # the first block's are below its step


@needs_kernel
@pytest.mark.parametrize("O,I", [(16, 32), (48, 96), (768, 768), (320, 1024), (64, 3072)])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 20])
def test_q8_kernel_matches_its_references(O, I, M):
    W = _weights(O, I, seed=O + I)
    lin = Q8Linear(W)
    x = torch.randn(M, I, generator=torch.Generator().manual_seed(M))
    x[0, :32] *= 1e3                                   # one loud block must not drown the others
    fast = ops.q8_linear(x, lin.wq, lin.ws)
    scalar = ops.q8_linear_reference(x, lin.wq, lin.ws)
    torch_ref = lin.reference(x)
    scale = torch_ref.abs().max()
    assert (fast - scalar).abs().max() <= 1e-5 * scale
    assert (fast - torch_ref).abs().max() <= 1e-4 * scale
    # and what it approximates: the fp32 product, within the quantization error
    assert (fast - x @ W.T).abs().max() <= 2e-2 * (x @ W.T).abs().max()


@needs_kernel
def test_q8_linear_keeps_leading_dims_and_zero_rows():
    lin = Q8Linear(_weights(32, 64))
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    assert lin(x).shape == (2, 3, 32)
    ref = lin.reference(x)      # an activation at a rounding tie may land one int16 step apart
    assert (lin(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert ops.q8_linear(torch.zeros(0, 64), lin.wq, lin.ws).shape == (0, 32)
    assert (ops.q8_linear(torch.zeros(2, 64), lin.wq, lin.ws) == 0).all()


@needs_kernel
def test_q8_kernel_errors_are_clear():
    lin = Q8Linear(_weights(32, 64))
    with pytest.raises(RuntimeError, match="x has 32 inputs, the weight 64"):
        ops.q8_linear(torch.zeros(1, 32), lin.wq, lin.ws)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.q8_linear(torch.zeros(1, 64, dtype=torch.float64), lin.wq, lin.ws)
    assert ops.q8_isa() in ("avx512-vnni", "avx512bw", "avx2", "scalar")


@needs_kernel
@pytest.mark.parametrize("M", [1, 4, 8, 11])
def test_few_row_fp32_kernel_matches_torch(M):
    W = _weights(200, 136)                             # I not a multiple of 16: the tail loop
    x = torch.randn(M, 136)
    assert torch.allclose(ops.f32_linear(x, W), F.linear(x, W), rtol=1e-5, atol=1e-5)


def _models(dtype, n_layer=3, n_embd=128):
    sd = make_state_dict(n_layer=n_layer, n_embd=n_embd, vocab=65536, seed=4)
    shape, world_ids = infer_shape(sd, "random")
    fused = RWKV7(sd, shape, dtype=dtype, world_ids=world_ids)
    unfused = RWKV7(sd, shape, dtype=dtype, world_ids=world_ids, fused=False)
    return fused, unfused


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_fused_step_matches_the_torch_layers(dtype, B):
    fused, unfused = _models(dtype)
    assert fused._fused_decode() is not None and unfused._fused_decode() is None
    prompt = torch.randint(0, 65536, (B, 7), generator=torch.Generator().manual_seed(B))
    _, state = unfused.forward(prompt, None)                        # a non-trivial state
    snapshot = [t.clone() for t in state.wkv + state.att_x + state.ffn_x]
    toks = torch.randint(0, 65536, (B, 1), generator=torch.Generator().manual_seed(B + 1))
    la, sa = fused.forward(toks, state)
    lb, sb = unfused.forward(toks, state)
    tol = 1e-4 if dtype == "fp32" else 2e-3   # int8: activation rounding may flip near ties
    assert (la - lb).abs().max() <= tol * lb.abs().max()
    for x, y in zip(sa.wkv + sa.att_x + sa.ffn_x, sb.wkv + sb.att_x + sb.ffn_x):
        assert x.shape == y.shape and (x - y).abs().max() <= tol * max(1.0, y.abs().max().item())
    # forward never mutates the state it is given
    assert all(torch.equal(a, b) for a, b in zip(snapshot, state.wkv + state.att_x + state.ffn_x))
    # a second step from the fused state continues the same sequence
    la2, _ = fused.forward(toks, sa)
    lb2, _ = unfused.forward(toks, sb)
    assert (la2 - lb2).abs().max() <= 2 * tol * lb2.abs().max()


@needs_kernel
def test_fused_step_equals_prefill_of_the_same_tokens():
    fused, _ = _models("fp32", n_layer=2)
    toks = torch.tensor([[5, 9, 200, 17]])
    whole, _ = fused.forward(toks, None)
    _, s = fused.forward(toks[:, :3], None)
    last, _ = fused.forward(toks[:, 3:], s)
    assert torch.allclose(whole, last, rtol=1e-4, atol=1e-4)


def test_int8_weights_are_held_once():
    sd = make_state_dict(n_layer=2, n_embd=128, vocab=65536, seed=4)
    shape, world_ids = infer_shape(sd, "random")
    m = RWKV7(sd, shape, dtype="int8", world_ids=world_ids)
    layer = m.layers[1]
    for name in ("W_r", "W_k", "W_v", "W_o", "ffn_K", "ffn_V", "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
        lin = getattr(layer, name)
        assert isinstance(lin, Q8Linear) and not hasattr(lin, "weight"), name
    assert isinstance(m.head, Q8Linear)


def test_embedding_table_is_built_in_chunks_and_kept_once():
    from rwkv_engine.core import embedding
    sd = make_state_dict(n_layer=1, n_embd=64, vocab=65536, seed=5)
    ref = F.layer_norm(sd["emb.weight"].float(), (64,), sd["blocks.0.ln0.weight"], sd["blocks.0.ln0.bias"])
    fp32 = embedding.EmbeddingTable.build(sd["emb.weight"], sd["blocks.0.ln0.weight"],
                                          sd["blocks.0.ln0.bias"], None, torch.float32, "cpu")
    int8 = embedding.EmbeddingTable.build(sd["emb.weight"], sd["blocks.0.ln0.weight"],
                                          sd["blocks.0.ln0.bias"], "int8", torch.float32, "cpu")
    toks = torch.tensor([[0, 4095, 4096, 65535]])              # both sides of a chunk edge
    assert torch.allclose(fp32[toks], ref[toks], atol=1e-6)
    assert int8.rows.dtype == torch.bfloat16 and int8[toks].dtype == torch.float32
    assert torch.equal(int8[toks], ref[toks].bfloat16().float())
    assert int8.nbytes == fp32.nbytes // 2


_ISA_CHECK = r"""
import sys, torch
from torch.utils import cpp_extension
build, flags = sys.argv[1], sys.argv[2].split()
cpp_extension.load(name="rwkv_q8_isa_check", sources=[sys.argv[3]], extra_cflags=["-O3", "-fopenmp-simd", *flags],
                   build_directory=build, is_python_module=False)
from rwkv_engine.core.linear import quantize_q8, dequantize_q8, quantize_activations
ops = torch.ops.rwkv_nvim_cpu
print(ops.q8_isa())
g = torch.Generator().manual_seed(0)
for O, I in ((48, 96), (320, 1024)):
    W = torch.randn(O, I, generator=g) * 0.05
    wq, ws = quantize_q8(W)
    for M in (1, 2, 3, 4, 5, 8, 9):
        x = torch.randn(M, I, generator=g)
        ref = quantize_activations(x) @ dequantize_q8(wq, ws).T
        for y in (ops.q8_linear(x, wq, ws), ops.q8_linear_reference(x, wq, ws)):
            assert (y - ref).abs().max() <= 1e-4 * ref.abs().max(), (O, I, M)
print("ok")
"""


@pytest.mark.skipif(ops is None or ops.q8_isa() == "scalar", reason="needs an x86 CPU kernel build")
@pytest.mark.parametrize("flags,isa", [("-march=native -mno-avx512vnni", "avx512bw"),
                                       ("-march=native -mno-avx512f", "avx2"),
                                       ("-march=native -mno-avx512f -mno-avx2", "scalar")])
def test_narrower_instruction_sets_compute_the_same(tmp_path, flags, isa):
    """The AVX2 and scalar paths of the q8 product, compiled here with the wider units
    switched off (in a child process: the op namespace can be registered once)."""
    import subprocess
    import sys
    from pathlib import Path

    if isa != "scalar" and isa not in Path("/proc/cpuinfo").read_text().split():
        pytest.skip(f"no {isa} on this CPU")
    src = Path(__file__).resolve().parents[2] / "kernels" / "rwkv7_cpu_linear.cpp"
    out = subprocess.run([sys.executable, "-c", _ISA_CHECK, str(tmp_path), flags, str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [isa, "ok"]


@needs_kernel
def test_the_kernels_really_run_on_several_threads():
    """at::parallel_for is an OpenMP pragma in a header: a build without -fopenmp ran every
    kernel loop on one thread (the WKV kernel included) without a word."""
    import os
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ops.parallel_threads() == 2
        torch.set_num_threads(1)
        assert ops.parallel_threads() == 1
    finally:
        torch.set_num_threads(before)
