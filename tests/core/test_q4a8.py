"""The CPU "q4a8" mode: the q4 weights with 8-bit activations (rwkv_engine/core/linear.py
Q4A8Linear, kernels/rwkv7_cpu_q4a8.h): the byte product against its scalar C++ reference
and plain torch (bit for bit where the math is integer), the mode's wiring, the fused
one-token step against the torch layer path, and the shipped model against fp32."""
from pathlib import Path

import pytest
import torch

from rwkv_engine.core.checkpoint import infer_shape, load_checkpoint
from rwkv_engine.core.cpu_precision_accuracy import logit_error, real_code_texts
from rwkv_engine.core.linear import (ACT8_MAX, Q4A8Linear, Q4Linear, Q8Linear, cpu_ops,
                                     quantize_activations)
from rwkv_engine.core.model import QUANT_PLAN, RWKV7, cpu_modes
from rwkv_engine.core.random_checkpoint import make_state_dict
from q4_cases import exact_q4_weights, fused_pair

ops = cpu_ops()
needs_kernel = pytest.mark.skipif(ops is None, reason="CPU kernels not built (no compiler?)")


def test_activations_are_int8_per_block():
    x = torch.tensor([[127.0, -63.4, 0.3, 1.0] * 8, [0.0] * 32])
    q = quantize_activations(x, ACT8_MAX)
    assert torch.equal(q[0, :4], torch.tensor([127.0, -63.0, 0.0, 1.0]))   # scale 1: whole steps
    assert torch.equal(q[1], torch.zeros(32))                             # a zero block stays zero
    x = torch.randn(3, 96)
    err = (quantize_activations(x, ACT8_MAX) - x).abs().reshape(3, 3, 32)
    step = x.abs().reshape(3, 3, 32).amax(-1, keepdim=True) / 127
    assert (err <= step * 0.5001).all()


@needs_kernel
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9])
def test_q4a8_kernel_integer_math_is_exact(M):
    """Activations that int8 represents exactly (whole steps of 2^-10, each block holding
    +-127 steps) and power-of-two weight scales: every path equals the exact product."""
    W, _, _ = exact_q4_weights(48, 256, seed=M, one_scale=True)
    lin = Q4A8Linear(W)
    g = torch.Generator().manual_seed(100 + M)
    x = torch.randint(-127, 128, (M, 256), generator=g).float()
    x[:, ::32] = 127.0 * torch.where(torch.rand(M, 8, generator=g) < 0.5, -1.0, 1.0)
    x = x * 2.0 ** -10
    fast = ops.q4a8_linear(x, lin.wq, lin.ws)
    assert torch.equal(fast, ops.q4a8_linear_reference(x, lin.wq, lin.ws))
    assert torch.equal(fast, lin.reference(x))
    assert torch.equal(fast, x @ W.T)


@needs_kernel
@pytest.mark.parametrize("O,I", [(16, 32), (48, 96), (320, 1024), (64, 3072)])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 20])
def test_q4a8_kernel_matches_its_references(O, I, M):
    W = torch.randn(O, I, generator=torch.Generator().manual_seed(O + I)) * 0.05
    lin = Q4A8Linear(W)
    x = torch.randn(M, I, generator=torch.Generator().manual_seed(M))
    x[0, :32] *= 1e3
    fast = lin(x)
    scalar = ops.q4a8_linear_reference(x, lin.wq, lin.ws)
    ref = lin.reference(x)
    scale = ref.abs().max()
    assert (fast - scalar).abs().max() <= 1e-5 * scale
    assert (fast - ref).abs().max() <= 1e-4 * scale
    # the same weights with int16 activations: close, but not the same rounding
    q4 = ops.q4_linear(x, lin.wq, lin.ws)
    assert 0 < (fast - q4).abs().max() <= 0.05 * scale
    assert lin(x.view(M, 1, I)).shape == (M, 1, O)
    assert ops.q4a8_isa() in ("avx2", "neon-dotprod", "scalar")


@needs_kernel
def test_q4a8_kernel_errors_are_clear():
    lin = Q4A8Linear(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="x has 32 inputs, the weight 64"):
        ops.q4a8_linear(torch.zeros(1, 32), lin.wq, lin.ws)
    assert ops.q4a8_linear(torch.zeros(0, 64), lin.wq, lin.ws).shape == (0, 32)


def test_q4a8_is_a_cpu_mode_on_the_q4_weights():
    assert "q4a8" in cpu_modes() and QUANT_PLAN["q4a8"] == dict(QUANT_PLAN["q4"], mats="q4a8")
    sd = make_state_dict(n_layer=2, n_embd=128, vocab=65536, seed=4)
    shape, world_ids = infer_shape(sd, "random")
    m = RWKV7(sd, shape, dtype="q4a8", world_ids=world_ids)
    q4 = RWKV7(sd, shape, dtype="q4", world_ids=world_ids)
    layer = m.layers[1]
    mats = ("W_r", "W_k", "W_v", "W_o", "ffn_K", "ffn_V")
    assert all(type(getattr(layer, n)) is Q4A8Linear for n in mats)
    assert all(type(getattr(layer, n)) is Q8Linear for n in ("w1", "w2", "a1", "a2", "g1", "g2"))
    assert type(m.head) is Q8Linear and m.emb.rows.dtype == torch.bfloat16
    assert all(torch.equal(getattr(layer, n).wq, getattr(q4.layers[1], n).wq) for n in mats)
    assert m.weight_bytes() == q4.weight_bytes()
    assert m.model_id != q4.model_id                  # cached states of one never serve the other
    assert isinstance(Q4A8Linear(torch.zeros(16, 32)), Q4Linear)


@needs_kernel
@pytest.mark.parametrize("B", [1, 3, 8])
def test_q4a8_fused_step_matches_the_torch_layers(B):
    fused, unfused = fused_pair("q4a8")
    assert fused._fused_decode().q4_a8 and unfused._fused_decode() is None
    prompt = torch.randint(0, 65536, (B, 7), generator=torch.Generator().manual_seed(B))
    _, state = unfused.forward(prompt, None)
    toks = torch.randint(0, 65536, (B, 1), generator=torch.Generator().manual_seed(B + 1))
    la, sa = fused.forward(toks, state)
    lb, sb = unfused.forward(toks, state)
    # activation rounding near ties: a value one ulp apart in the two paths can round to
    # the next int8 step (1/127 of its block's largest), which moves a row's logits by
    # ~2e-3 of their range (measured: one row of 8, 2.3e-3); the other rows agree to ~1e-5
    tol = 5e-3
    row = (la - lb).abs().amax(1)
    assert row.max() <= tol * lb.abs().max() and row.median() <= 2e-5 * lb.abs().max()
    for x, y in zip(sa.wkv + sa.att_x + sa.ffn_x, sb.wkv + sb.att_x + sb.ffn_x):
        assert x.shape == y.shape and (x - y).abs().max() <= tol * max(1.0, y.abs().max().item())
    # the fused step really ran 8-bit activations: the q4 (int16) step differs from it
    q4_fused, _ = fused_pair("q4")
    lq, _ = q4_fused.forward(toks, state)
    assert (la - lq).abs().amax(1).median() > 100 * row.median()


def test_q4a8_default_model_stays_near_fp32_on_real_code():
    """Teacher-forced over 4 x 128 tokens of real code with the shipped default model.
    Measured (AVX2 kernel): q4a8 KL 0.0204, top-1 90.8 %; q4 KL 0.0199, top-1 90.6 %: the
    8-bit activations add little next to the 4-bit weights. Bounds as for q4."""
    path = Path(__file__).resolve().parents[2] / "rwkv_engine" / "data" / "default-model.pth"
    _, sd, shape, world_ids = load_checkpoint(path)
    ref = RWKV7(sd, shape, dtype="fp32", world_ids=world_ids)
    batches = [torch.tensor([ref.tokenizer.encode(t)[:128]]) for _, t in real_code_texts()]
    want = torch.cat([ref.forward(b, all_logits=True)[0] for b in batches], 1)
    m = RWKV7(sd, shape, dtype="q4a8", world_ids=world_ids)
    got = torch.cat([m.forward(b, all_logits=True)[0] for b in batches], 1)
    kl, _, top1 = logit_error(want, got)
    assert kl <= 0.040 and top1 >= 0.876, (kl, top1)


@needs_kernel
def test_status_names_the_q4a8_product_path(tiny_model_path):
    """:RwkvStatus / info say which kernels run the model: the q8 head and LoRAs, and the
    mode's own product for the big matrices."""
    from rwkv_engine.pipeline.loading import cpu_kernels_in_use
    _, sd, shape, world_ids = load_checkpoint(tiny_model_path)
    lines = {m: cpu_kernels_in_use(RWKV7(sd, shape, dtype=m, world_ids=world_ids)) for m in ("int8", "q4a8")}
    assert lines["int8"] == f"q8: {ops.q8_isa()}"
    assert lines["q4a8"] == f"q8: {ops.q8_isa()}, q4a8: {ops.q4a8_isa()}"
