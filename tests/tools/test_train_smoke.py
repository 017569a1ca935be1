"""Smoke test of the default-model training code (tools/train_*.py, tools/corpus.py).

A tiny corpus and a tiny RWKV-7 (2 layers x 64): the loss goes down in a few steps,
the exported checkpoint (official key layout + vocab.world_ids) loads with
``rwkv_engine.load_model`` and gives the training model's logits, and the C++ WKV
kernel's gradients match plain autograd.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import corpus  # noqa: E402
from train_default_model import TrainConfig, build_data, warm_start  # noqa: E402
from train_model import ModelConfig, RWKV7Train, export_state_dict, load_exported  # noqa: E402
from train_wkv_kernel import load_kernel, wkv7_train, wkv7_train_torch  # noqa: E402

PY_FILE = textwrap.dedent('''
    def add(a, b):
        """Return a + b."""
        return a + b


    class Point:
        def __init__(self, x, y):
            self.x = x
            self.y = y

        def norm(self):
            return (self.x ** 2 + self.y ** 2) ** 0.5
''')


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for i in range(12):
        (root / f"mod{i}.py").write_text(PY_FILE.replace("add", f"add{i}").replace("Point", f"Point{i}"))
    cfg = TrainConfig(seed=3, n_layer=2, n_embd=64, vocab_size=280, batch=4, ctx_len=64, heldout_rows=2)
    sources = [corpus.Source("python", str(root), ".py", 10_000_000)]
    maker, held_rows, world_ids, record, heldout_paths = build_data(cfg, sources=sources)
    record["heldout_paths"] = heldout_paths
    return cfg, maker, held_rows, world_ids, record


def test_corpus_record_and_vocab(tiny_data):
    cfg, maker, held_rows, world_ids, record = tiny_data
    assert record["sources"][0]["files"] == 12
    assert record["heldout_files"] == 1 and record["train_files"] == 11
    assert len(world_ids) == cfg.vocab_size and world_ids[:257] == list(range(257))
    from rwkv_engine.tokenizer import WorldTokenizer
    full = WorldTokenizer.default()
    for marker in (corpus.FIM_PREFIX, corpus.FIM_SUFFIX, corpus.FIM_MIDDLE):
        assert set(full.encode(marker)) <= set(world_ids)
    assert held_rows.shape == (2, cfg.ctx_len + 1)


def test_fim_sample_layout(tiny_data):
    """Samples come from the pipeline's PromptBuilder: FIM where text follows the cursor
    (plain where only whitespace does, as the pipeline decides), whole-text tokens."""
    cfg, maker, *_ = tiny_data
    tok = maker.tok
    fim = canonical = 0
    for _ in range(40):
        seq = maker.fim(maker.files[0])
        assert seq[0] == 0 and seq[-1] == 0
        text = tok.decode(seq)
        if corpus.FIM_MIDDLE in text:
            fim += 1
            assert text.count(corpus.FIM_PREFIX + corpus.FIM_SUFFIX) == 1
            assert text.index(corpus.FIM_SUFFIX) < text.index(corpus.FIM_MIDDLE)
        canonical += tok.encode(tok.decode_bytes(seq[1:-1])) == seq[1:-1]
    assert fim >= 30 and canonical >= 38
    row = maker.row(cfg.ctx_len + 1)
    assert len(row) == cfg.ctx_len + 1


def test_fim_middle_never_starts_with_empty_line(tiny_data):
    _, maker, *_ = tiny_data
    tok = maker.tok
    f = maker.files[0]
    assert any(not ln.strip() for ln in f.lines)         # the file has blank lines to avoid
    for _ in range(300):
        cut = maker.fim_cut(f)
        line = f.lines[cut.row]
        assert line.strip(), cut                          # the cursor line is never blank
        assert not cut.middle.startswith("\n") and cut.middle.split("\n")[0].strip(), cut
        if cut.line_suffix:                               # a middle inside one line
            assert cut.last == cut.row and cut.line_prefix + cut.middle + cut.line_suffix == line
        else:
            assert cut.line_prefix + cut.middle == "\n".join(f.lines[cut.row:cut.last + 1])
        text = tok.decode(maker.fim(f, cut))
        if corpus.FIM_MIDDLE not in text:                 # only whitespace after the cursor: plain
            assert text.endswith(cut.line_prefix + cut.middle)
            continue
        after_middle_marker = text.split(corpus.FIM_MIDDLE)[1]
        assert after_middle_marker.endswith(cut.line_prefix + cut.middle), (after_middle_marker, cut)


def test_kernel_gradients_match_autograd():
    if load_kernel() is None:
        pytest.skip("C++ WKV kernel cannot be built here")
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 2, 21, 2, 64
    r, k, v = (torch.randn(B, T, H, N, generator=g) * 0.5 for _ in range(3))
    w = torch.rand(B, T, H, N, generator=g) * 0.45 + 0.545
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a, b = -kk, kk * torch.rand(B, T, H, N, generator=g)
    inputs = [x.clone().requires_grad_() for x in (w, r, k, v, a, b)]
    ref_inputs = [x.clone().requires_grad_() for x in (w, r, k, v, a, b)]
    dy = torch.randn(B, T, H, N, generator=g)
    y = wkv7_train(*inputs)
    y_ref = wkv7_train_torch(*ref_inputs)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-3, atol=1e-3)


def _train_tiny(cfg, maker, steps=12):
    torch.manual_seed(cfg.seed)
    model = RWKV7Train(ModelConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size))
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=5e-3)
    x = torch.tensor([maker.row(cfg.ctx_len + 1) for _ in range(cfg.batch)])
    losses = []
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    cfg, maker, _, world_ids, _ = tiny_data
    model, losses = _train_tiny(cfg, maker)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(export_state_dict(model, torch.tensor(world_ids), torch.float32), path)
    return model, losses, path, world_ids


def test_loss_decreases(trained):
    _, losses, _, _ = trained
    assert losses[-1] < losses[0] - 0.5, losses


def test_warm_start_loads_exported_weights(trained, tiny_data):
    model, _, path, world_ids = trained
    cfg, _, held_rows, _, _ = tiny_data
    fresh = RWKV7Train(ModelConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size))
    info = warm_start(fresh, str(path), world_ids, held_rows, use_kernel=False)
    seq = torch.tensor([[0, 5, 9, 270, 11]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(seq), model(seq))
    assert info["path"] == str(path) and info["heldout_loss_before"] > 0
    # another vocabulary: shared World ids keep their rows wherever they are now
    moved = [0] + list(range(1, 257)) + list(reversed(world_ids[257:]))
    info = warm_start(fresh, str(path), moved, held_rows, use_kernel=False)
    assert info["remapped_new_tokens"] == 0
    last = world_ids[-1]
    assert torch.equal(fresh.emb.weight[moved.index(last)], model.emb.weight[world_ids.index(last)])
    assert torch.equal(fresh.head.weight[257], model.head.weight[len(world_ids) - 1])


def test_checkpoint_key_layout(trained):
    model, _, path, world_ids = trained
    sd = torch.load(path, weights_only=True)
    C, H = model.cfg.n_embd, model.cfg.n_head
    assert sd["vocab.world_ids"].dtype == torch.int64 and sd["vocab.world_ids"].tolist() == world_ids
    assert sd["blocks.0.ln0.weight"].shape == (C,) and "blocks.1.ln0.weight" not in sd
    for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
        assert sd[f"blocks.1.att.{name}"].shape == (1, 1, C), name
    assert sd["blocks.1.att.r_k"].shape == (H, 64)
    assert sd["blocks.0.att.w1"].shape[0] == C and sd["blocks.0.att.w2"].shape[1] == C
    assert sd["blocks.0.ffn.key.weight"].shape == (4 * C, C)
    assert sd["blocks.0.ffn.value.weight"].shape == (C, 4 * C)
    assert sd["head.weight"].shape == (model.cfg.vocab_size, C)


def test_engine_loader_gives_training_logits(trained):
    from rwkv_engine import load_model

    model, _, path, world_ids = trained
    engine = load_model(str(path), device="cpu")
    assert engine.tokenizer.world_ids == world_ids
    seq = torch.tensor([[0] + engine.tokenizer.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        want = model(seq)                                            # [1, T, V]
    logits, state = engine.forward(seq, engine.new_state(1))          # whole sequence at once
    torch.testing.assert_close(logits, want[:, -1], rtol=1e-4, atol=1e-4)
    state = engine.new_state(1)
    for t in range(seq.shape[1]):                                     # token by token
        logits, state = engine.forward(seq[:, t:t + 1], state)
        torch.testing.assert_close(logits, want[:, t], rtol=1e-4, atol=1e-4)


def test_bf16_export_roundtrip(trained, tmp_path):
    model, _, _, world_ids = trained
    path = tmp_path / "bf16.pth"
    torch.save(export_state_dict(model, torch.tensor(world_ids), torch.bfloat16), path)
    back, ids = load_exported(str(path))
    assert ids.tolist() == world_ids
    seq = torch.tensor([[0, 5, 9, 270, 11]])
    with torch.no_grad():
        torch.testing.assert_close(back(seq), model(seq), rtol=0.1, atol=0.1)


def test_rwkv_reference_package_gives_training_logits(trained, tmp_path):
    pytest.importorskip("rwkv")
    model, _, path, _ = trained
    seq = [0, 40, 41, 270, 11, 12]
    with torch.no_grad():
        want = model(torch.tensor([seq]))[0, -1]
    torch.save(want, tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import torch
        from rwkv.model import RWKV
        m = RWKV(model={str(path)[:-4]!r}, strategy="cpu fp32")
        out, _ = m.forward({seq}, None)
        want = torch.load({str(tmp_path / 'want.pt')!r})
        print("maxdiff", (out.float() - want).abs().max().item())
    """)
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    diff = float(res.stdout.split("maxdiff")[-1])
    assert diff < 1e-3, res.stdout


def test_eval_tasks_and_baselines(tmp_path):
    from rwkv_engine.cli.evaluate import make_tasks

    src = tmp_path / "a.py"
    src.write_text("x = 1\nx = 1\n\ny = 2\nz = 3\n")
    tasks = make_tasks([str(src)], 10, seed=0)
    by_row = {t.row: t for t in tasks}
    assert sorted(by_row) == [1, 3]              # line 0 has no previous line; line 4 has nothing below
    assert by_row[1].target == "x = 1" and by_row[1].prev_line == "x = 1" and by_row[1].lines[1] == ""
    assert by_row[3].prev_line == "" and by_row[3].prev_nonblank == "x = 1"


def test_eval_runs_on_tiny_checkpoint(trained, tiny_data):
    from rwkv_engine import load_model
    from rwkv_engine.cli.evaluate import evaluate, make_tasks

    _, _, path, _ = trained
    record = tiny_data[4]
    tasks = make_tasks(record["heldout_paths"], 3, seed=1)
    result = evaluate(load_model(str(path)), tasks, n_samples=2, max_tokens=6)
    assert result["tasks"] == 3 and result["samples"] == 2
    for key in ("pass@1", "pass@2", "pass@1+2", "baseline_prev_line"):
        assert 0.0 <= result[key] <= 1.0
    assert result["pass@1+2"] >= max(result["pass@1"], result["pass@2"])
    assert len(result["examples"]) == 3 and len(result["examples"][0]["sampled"]) == 2
    assert set(result["positions"]) == {"col0", "indent", "typed1", "typed2", "typed3", "typed4", "typed5"}
    for by in result["positions"].values():
        assert set(by) <= {"healed", "not_healed"}
        for v in by.values():
            assert 0 < v["tasks"] <= 3 and 0.0 <= v["pass@1"] <= 1.0


def test_eval_cursor_positions_type_part_of_the_line(tmp_path):
    from rwkv_engine.cli.evaluate import make_tasks, typed_text

    src = tmp_path / "a.py"
    src.write_text("def f():\n    return 1\nx = 2\n")
    (task,) = [t for t in make_tasks([str(src)], 10, seed=0) if t.row == 1]
    assert typed_text(task, "col0") == "" and typed_text(task, "indent") == "    "
    assert typed_text(task, "typed3") == "    ret" and typed_text(task, "typed5") == "    retur"
    task.target = "    ab"
    assert typed_text(task, "typed2") is None            # nothing would be left to complete


def test_eval_window_tokens_shrinks_the_fim_window(tmp_path, tiny_model):
    """``--window-tokens``: the prompts of a budgeted FIM window (``fim_window_ms``), the same tasks."""
    from rwkv_engine.cli.evaluate import evaluate, make_tasks

    src = tmp_path / "a.py"
    src.write_text("".join(f"value_{i} = compute({i}, {i * 7})\n" for i in range(60)))
    tasks = [t for t in make_tasks([str(src)], 60, seed=0) if 24 <= t.row < 40][:2]
    kw = dict(n_samples=1, max_tokens=2, positions=("col0",), healing=(True,))
    full = evaluate(tiny_model, tasks, **kw)
    small = evaluate(tiny_model, tasks, window_tokens=24, **kw)
    assert full["window_tokens"] is None and small["window_tokens"] == 24
    # the suffix lines left out of the window are not in the prompt (the prefix lines are, as far prefix)
    assert small["mean_prompt_tokens"] < full["mean_prompt_tokens"] - 30
