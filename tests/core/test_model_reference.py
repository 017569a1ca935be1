"""Logits of rwkv_engine equal the `rwkv` package's RWKV_x070 on random checkpoints."""
import torch
import pytest

import rwkv_engine
from rwkv_engine.tokenizer import encode

TEXT = "import os\n\ndef main(argv):\n    for i, arg in enumerate(argv):\n        print(i, arg)\n"


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("fixture", ["tiny_model_path", "small_model_path"])
@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch", "kernel"])
def test_prefill_and_decode_match_reference(fixture, use_kernel, request, rwkv_reference):
    path = request.getfixturevalue(fixture)
    model = rwkv_engine.load_model(path, device="cpu", use_kernel=use_kernel)
    ref = rwkv_reference(model=str(path)[:-4], strategy="cpu fp32")
    toks = encode(TEXT)
    logits, state = model.forward(torch.tensor([toks]), model.new_state(1))
    ref_logits, ref_state = ref.forward(toks, None)
    assert logits.shape == (1, model.shape.vocab_size)
    assert _rel_err(logits[0], ref_logits) < 1e-3
    nxt = toks[-1]
    for step in range(20):
        nxt = int(ref_logits.argmax()) if step % 2 else (nxt * 7919 + 13) % 65536
        logits, state = model.forward(torch.tensor([[nxt]]), state)
        ref_logits, ref_state = ref.forward([nxt], ref_state)
        assert _rel_err(logits[0], ref_logits) < 1e-3, f"decode step {step}"
    # the WKV states agree too (layout [H, 64, 64], S[value, key])
    for layer in range(model.shape.n_layer):
        assert torch.allclose(state.wkv[layer][0], ref_state[layer * 3 + 1], atol=1e-3, rtol=1e-3)
