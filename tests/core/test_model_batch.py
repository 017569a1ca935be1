"""Batching, prefill/decode equivalence, state value semantics, forking."""
import torch

from rwkv_engine.core.state import State
from rwkv_engine.tokenizer import encode

SEQS = ["def f(x):\n    return x * 2\n", "#include <stdio.h>\nint main(void) {\n",
        "local M = {}\nfunction M.setup(o)\n", "SELECT name FROM users WHERE id = 1;\n"]


def test_batch_equals_single_runs(tiny_model):
    toks = [encode(s)[:8] for s in SEQS]
    assert all(len(t) == 8 for t in toks)
    batch_logits, batch_state = tiny_model.forward(torch.tensor(toks), tiny_model.new_state(len(toks)))
    for b, t in enumerate(toks):
        logits, state = tiny_model.forward(torch.tensor([t]), tiny_model.new_state(1))
        assert torch.allclose(batch_logits[b], logits[0], atol=1e-4, rtol=1e-4)
        for l in range(tiny_model.shape.n_layer):
            assert torch.allclose(batch_state.wkv[l][b], state.wkv[l][0], atol=1e-5)


def test_prefill_equals_one_step_decodes(tiny_model):
    toks = encode(SEQS[0])
    logits, state = tiny_model.forward(torch.tensor([toks]), tiny_model.new_state(1))
    s = tiny_model.new_state(1)
    for t in toks:
        step_logits, s = tiny_model.forward(torch.tensor([[t]]), s)
    assert torch.allclose(logits, step_logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(state.tensors(), s.tensors()):
        assert torch.allclose(a, b, atol=1e-5)


def test_all_logits_last_row_matches(tiny_model):
    toks = torch.tensor([encode(SEQS[1])])
    last, _ = tiny_model.forward(toks, None)
    every, _ = tiny_model.forward(toks, None, all_logits=True)
    assert every.shape == (1, toks.shape[1], tiny_model.shape.vocab_size)
    assert torch.allclose(every[:, -1], last, atol=1e-5)


def test_forward_does_not_mutate_input_state(tiny_model):
    _, state = tiny_model.forward(torch.tensor([encode(SEQS[2])]), None)
    snapshot = state.copy()
    tiny_model.forward(torch.tensor([[11, 33]]), state)
    assert state.equal(snapshot)


def test_forked_state_gives_identical_continuations(tiny_model):
    logits, state = tiny_model.forward(torch.tensor([encode(SEQS[0])]), None)
    forked = state.fork(3)
    assert forked.batch == 3
    cont = torch.tensor([[33, 400, 11]] * 3)
    out, new = tiny_model.forward(cont, forked)
    single, _ = tiny_model.forward(cont[:1], state)
    for b in range(3):
        assert torch.allclose(out[b], single[0], atol=1e-5)
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[1], out[2], atol=1e-5)


def test_select_and_dict_roundtrip(tiny_model):
    _, state = tiny_model.forward(torch.tensor([encode(s)[:6] for s in SEQS]), None)
    picked = state.select([2, 0])
    assert picked.batch == 2 and torch.equal(picked.wkv[0][0], state.wkv[0][2])
    back = State.from_dict(state.to_dict())
    assert back.equal(state)
    assert state.nbytes == tiny_model.state_bytes(4)
