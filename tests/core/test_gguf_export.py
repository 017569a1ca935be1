"""`rwkv-nvim export-gguf`: the GGUF layout llama.cpp's rwkv7 loader wants, and (marked
``llamacpp``) llama.cpp's greedy continuation against ours on the same random checkpoint.

The llama.cpp tests build llama.cpp's CPU tools once into ~/.cache/rwkv.nvim/llama.cpp
(bench/llamacpp_peer, command line bench/llama_cpp.py; minutes cold, then
cached). They skip without cmake/g++, when the sdist cannot be downloaded, or with
RWKV_LLAMA_CPP_BUILD=0 and no cached build. Deselect them with ``-m "not llamacpp"``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")

from rwkv_engine.core.random_checkpoint import make_state_dict  # noqa: E402
from rwkv_engine.core.gguf_export import export_gguf, token_text  # noqa: E402
from rwkv_engine.core.tokenizer import WorldTokenizer, _read_world_vocab  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ("def fibonacci(n):\n    if n < 2:\n        return n\n"
          "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nclass Stack:\n    def __init__(self")
N_PREDICT = 32


def _peaked_state_dict(**kw) -> dict:
    """A random checkpoint whose next-token distributions are peaked like a trained model's
    (flat random logits make greedy decoding a coin toss between near-ties)."""
    try:
        return make_state_dict(trained_like=True, **kw)
    except TypeError:      # an older random_checkpoint without trained_like: log-normal rows
        sd = make_state_dict(**kw)
        g = torch.Generator().manual_seed(7)
        sd["head.weight"] = sd["head.weight"] * torch.exp(
            0.5 * torch.randn(sd["head.weight"].shape[0], 1, generator=g))
        return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny: 2 x 128 (2 heads); small: 2 x 256 (4 heads); both the full World vocabulary."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, C, seed in (("tiny", 128, 11), ("small", 256, 12)):
        p = d / f"{name}.pth"
        torch.save(_peaked_state_dict(n_layer=2, n_embd=C, seed=seed), str(p))
        out[name] = p
    return out


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(model, type) -> (gguf path, export summary), written once per module."""
    d = tmp_path_factory.mktemp("gguf-out")
    cache = {}

    def get(name: str, out_type: str):
        key = (name, out_type)
        if key not in cache:
            dst = d / f"{name}-{out_type}.gguf"
            cache[key] = (dst, export_gguf(models[name], dst, out_type))
        return cache[key]
    return get


def _reader(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _field(r, key):
    f = r.fields[key]
    if hasattr(f, "contents"):                # gguf >= 0.11
        return f.contents()
    vals = [f.parts[i] for i in f.data]       # older readers: decode the raw parts
    as_str = f.types[-1] == gguf.GGUFValueType.STRING
    vals = [bytes(v).decode("utf-8") if as_str else v.tolist()[0] for v in vals]
    return vals if f.types[0] == gguf.GGUFValueType.ARRAY else vals[0]


def unescape_rwkv(text: str) -> bytes:
    """Port of llama.cpp's llama_unescape_rwkv_token (src/llama-vocab.cpp)."""
    out, i, raw = bytearray(), 0, text.encode("utf-8")
    while i < len(raw):
        c = raw[i]
        if c == 0x5C:                                     # backslash
            e = raw[i + 1]
            if e == ord("x"):
                out.append(int(raw[i + 2:i + 4].decode(), 16))
                i += 4
                continue
            out.append({ord("t"): 9, ord("n"): 10, ord("r"): 13}.get(e, e))
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out)


# -- layout -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_f32_metadata_and_every_tensor(models, exported, name):
    path, info = exported(name, "f32")
    sd = torch.load(str(models[name]), weights_only=True)
    C = sd["emb.weight"].shape[1]
    r, t = _reader(path)
    assert _field(r, "general.architecture") == "rwkv7"
    want = {"rwkv7.embedding_length": C, "rwkv7.block_count": 2, "rwkv7.feed_forward_length": 4 * C,
            "rwkv7.wkv.head_size": 64, "rwkv7.token_shift_count": 2, "rwkv7.attention.head_count": 0,
            "rwkv7.attention.decay_lora_rank": sd["blocks.0.att.w1"].shape[1],
            "rwkv7.attention.iclr_lora_rank": sd["blocks.0.att.a1"].shape[1],
            "rwkv7.attention.value_residual_mix_lora_rank": sd["blocks.1.att.v1"].shape[1],
            "rwkv7.attention.gate_lora_rank": sd["blocks.0.att.g1"].shape[1],
            "general.file_type": 0, "tokenizer.ggml.model": "rwkv",
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0}
    for k, v in want.items():
        assert _field(r, k) == v, k
    assert abs(_field(r, "rwkv7.attention.layer_norm_epsilon") - 1e-5) < 1e-9
    assert "tokenizer.ggml.eot_token_id" not in r.fields          # no stop at blank lines
    assert len(t) == 6 + 28 * 2 and info["tensors"] == len(t)
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in t.values())

    def same(gname, ref):
        got = torch.from_numpy(t[gname].data.copy()).reshape(ref.shape)
        assert torch.equal(got, ref.float().contiguous()), gname

    same("token_embd.weight", sd["emb.weight"])                  # ln0 kept, not folded
    same("token_embd_norm.weight", sd["blocks.0.ln0.weight"])
    same("output.weight", sd["head.weight"])
    same("output_norm.bias", sd["ln_out.bias"])
    for i in range(2):
        a, o = f"blocks.{i}.att.", f"blk.{i}."
        lerp = torch.stack([sd[a + "x_" + c].reshape(C) for c in "rwkvag"]).reshape(6, 1, 1, C)
        same(o + "time_mix_lerp_fused.weight", lerp)
        assert tuple(t[o + "time_mix_lerp_fused.weight"].shape) == (C, 1, 1, 6)   # ggml ne
        for m in ("w", "a", "g"):
            same(o + f"time_mix_{m}1.weight", sd[a + m + "1"].t())
            same(o + f"time_mix_{m}2.weight", sd[a + m + "2"].t())
        v = a + ("a" if i == 0 else "v")                          # layer 0: a copies
        same(o + "time_mix_v0.weight", sd[v + "0"].reshape(C))
        same(o + "time_mix_v1.weight", sd[v + "1"].t())
        same(o + "time_mix_v2.weight", sd[v + "2"].t())
        same(o + "time_mix_w0.weight", sd[a + "w0"].reshape(C))
        same(o + "time_mix_r_k.weight", sd[a + "r_k"].reshape(C))
        same(o + "time_mix_k_k.weight", sd[a + "k_k"].reshape(C))
        same(o + "time_mix_receptance.weight", sd[a + "receptance.weight"])
        same(o + "time_mix_output.weight", sd[a + "output.weight"])
        same(o + "time_mix_ln.bias", sd[a + "ln_x.bias"])
        same(o + "attn_norm_2.weight", sd[f"blocks.{i}.ln2.weight"])
        same(o + "channel_mix_lerp_k.weight", sd[f"blocks.{i}.ffn.x_k"].reshape(C))
        same(o + "channel_mix_key.weight", sd[f"blocks.{i}.ffn.key.weight"])
        same(o + "channel_mix_value.weight", sd[f"blocks.{i}.ffn.value.weight"])
        assert tuple(t[o + "time_mix_w1.weight"].shape) == (C, sd[a + "w1"].shape[1])


def test_vocabulary_round_trips_through_llama_cpp_unescaping(exported):
    path, _ = exported("tiny", "f16")
    r, _ = _reader(path)
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    world = _read_world_vocab()
    assert len(tokens) == 65536 and tokens[0] == "<s>" and types[0] == 3
    assert tokens[11] == "\\n" and tokens[33] == " " and tokens[261] == "\\n\\n"
    for i in range(1, 65536):
        if i in world:
            assert unescape_rwkv(tokens[i]) == world[i], i
            assert types[i] == 1
        else:
            assert tokens[i] == f"[PAD{i}]" and types[i] == 5
    assert unescape_rwkv(token_text(b"a\\x'\"\t\xff").decode()) == b"a\\x'\"\t\xff"


def test_f16_and_q8_0_types(exported):
    Q = gguf.GGMLQuantizationType
    for out_type, big, ftype in (("f16", Q.F16, 1), ("q8_0", Q.Q8_0, 7)):
        path, _ = exported("small", out_type)
        r, t = _reader(path)
        assert _field(r, "general.file_type") == ftype
        for n in ("token_embd.weight", "output.weight", "blk.1.time_mix_key.weight",
                  "blk.1.channel_mix_value.weight", "blk.1.time_mix_a1.weight", "blk.1.time_mix_g2.weight"):
            assert t[n].tensor_type == big, (out_type, n)
        for n in ("blk.1.time_mix_w1.weight", "blk.1.time_mix_w2.weight", "blk.1.time_mix_lerp_fused.weight",
                  "blk.1.time_mix_r_k.weight", "blk.1.attn_norm.weight", "token_embd_norm.bias"):
            assert t[n].tensor_type == Q.F32, (out_type, n)


def test_trimmed_vocabulary_is_written_with_its_world_ids(tmp_path):
    ids = [0] + list(range(1, 257)) + [261, 10060, 33, 300, 4000]
    ids = list(dict.fromkeys(ids))
    src = tmp_path / "trim.pth"
    torch.save(make_state_dict(n_layer=2, n_embd=128, vocab=len(ids), world_ids=ids, seed=5), str(src))
    info = export_gguf(src, tmp_path / "trim.gguf", "f32")
    assert info["vocabulary"] == "trimmed World" and info["vocab_size"] == len(ids)
    r, t = _reader(tmp_path / "trim.gguf")
    tokens = _field(r, "tokenizer.ggml.tokens")
    world = _read_world_vocab()
    assert len(tokens) == len(ids) and tokens[0] == "<s>"
    assert [unescape_rwkv(x) for x in tokens[1:]] == [world[i] for i in ids[1:]]
    assert list(_field(r, "rwkv_nvim.vocab.world_ids")) == ids
    assert tuple(t["output.weight"].shape) == (128, len(ids))


def test_cli_export_and_missing_package_message(models, tmp_path, monkeypatch, capsys):
    from rwkv_engine.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export-gguf", str(models["tiny"]), str(out), "--type", "q8_0"]) == 0
    assert out.is_file() and not out.with_name(out.name + ".part").exists()
    assert "wrote" in capsys.readouterr().out
    assert main(["export-gguf", str(models["tiny"]), str(out)]) == 1          # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["export-gguf", str(models["tiny"]), str(out), "--force", "--json",
                 "--eot-double-newline", "--type", "f16"]) == 0
    assert json.loads(capsys.readouterr().out)["eot"] == 261
    assert _field(_reader(out)[0], "tokenizer.ggml.eot_token_id") == 261   # llama.cpp's chat stop
    monkeypatch.setitem(sys.modules, "gguf", None)                            # not installed
    assert main(["export-gguf", str(models["tiny"]), str(tmp_path / "x.gguf")]) == 1
    assert "pip install" in capsys.readouterr().err


# -- llama.cpp ----------------------------------------------------------------------------
from llama_build import lc, llama_bins_or_skip  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    """(bench/llamacpp_peer, bin dir): the cached build, or built now."""
    return lc, llama_bins_or_skip()


def _ours(path, prompt_ids, n):
    """Our engine's greedy continuation and each step's log-softmax (fp32, CPU)."""
    import rwkv_engine

    model = rwkv_engine.load_model(path, use_kernel=False)
    logits, state = model.forward(torch.tensor([prompt_ids]))
    toks, logps = [], []
    for _ in range(n):
        logps.append(torch.log_softmax(logits[0].double(), -1))
        t = int(logits[0].argmax())
        toks.append(t)
        logits, state = model.forward(torch.tensor([[t]]), state)
    return toks, logps


def _compare(lc, bins, gguf_path, ckpt, n_probs=5):
    prompt = WorldTokenizer.default().encode(PROMPT)
    with lc.Server(gguf_path, bins=bins) as srv:
        theirs = srv.greedy(prompt, N_PREDICT, n_probs)
        # llama.cpp's tokenizer on the same text (the GGUF vocabulary, via the server)
        tokenized = srv.post("/tokenize", {"content": PROMPT})["tokens"]
    ours, logps = _ours(ckpt, prompt, N_PREDICT)
    agree = sum(a == b for a, b in zip(ours, theirs["tokens"]))
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs["tokens"])) if a != b), None)
    # logprob difference on llama.cpp's top-n of every step where both were on the same path
    upto = N_PREDICT if first_diff is None else first_diff + 1
    diff = max(abs(lp - float(logps[s][tid])) for s in range(upto)
               for tid, lp in theirs["top_logprobs"][s].items())
    return {"agree": agree, "first_diff": first_diff, "max_logprob_diff": diff, "ours": ours,
            "theirs": theirs["tokens"], "tokenized_equal": tokenized == prompt}


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_llama_cpp_f32_greedy_matches_ours(llama, models, exported, name):
    lc, bins = llama
    path, _ = exported(name, "f32")
    res = _compare(lc, bins, path, models[name])
    print(f"\n{name} f32: greedy {res['agree']}/{N_PREDICT}, max |logprob diff| "
          f"{res['max_logprob_diff']:.2e}")
    assert res["tokenized_equal"], "llama.cpp tokenizes the prompt differently"
    assert res["ours"] == res["theirs"], res
    assert res["max_logprob_diff"] < 2e-3


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llama_cpp_f16_and_q8_0_stay_close(llama, models, exported):
    lc, bins = llama
    for out_type in ("f16", "q8_0"):
        path, _ = exported("small", out_type)
        res = _compare(lc, bins, path, models["small"])
        print(f"\nsmall {out_type}: greedy {res['agree']}/{N_PREDICT} (first difference at "
              f"{res['first_diff']}), max |logprob diff| before it {res['max_logprob_diff']:.3f}")
        # reduced precision may flip a near-tie late; the first steps must agree
        assert res["first_diff"] is None or res["first_diff"] >= 8, res
        assert res["max_logprob_diff"] < 0.5


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llama_cpp_loads_a_trimmed_vocabulary(llama, tmp_path):
    lc, bins = llama
    ids = list(dict.fromkeys([0] + list(range(1, 257)) + [261, 33, 300, 4000, 10060]))
    src = tmp_path / "trim.pth"
    torch.save(_peaked_state_dict(n_layer=2, n_embd=128, vocab=len(ids), world_ids=ids, seed=6), str(src))
    export_gguf(src, tmp_path / "trim.gguf", "f32")
    tok = WorldTokenizer.from_world_ids(ids)
    text = "    return x\n\nhello world ✿"
    with lc.Server(tmp_path / "trim.gguf", bins=bins) as srv:
        assert srv.post("/tokenize", {"content": text})["tokens"] == tok.encode(text)
        theirs = srv.greedy(tok.encode(text), 8)["tokens"]
    import rwkv_engine
    model = rwkv_engine.load_model(src, use_kernel=False)
    logits, state = model.forward(torch.tensor([tok.encode(text)]))
    ours = []
    for _ in range(8):
        ours.append(int(logits[0].argmax()))
        logits, state = model.forward(torch.tensor([[ours[-1]]]), state)
    assert ours == theirs


def test_llama_cpp_build_flags_switch_amx_off_on_amx_hosts(tmp_path):
    amx = {"machine": "x86_64", "model": "Intel(R) Xeon(R) Platinum 8480+", "amx": True,
           "flags": {"avx512f", "amx_tile", "amx_int8", "amx_bf16"}}
    cmd, extra = lc.cmake_args(tmp_path / "src", tmp_path / "b", amx)
    assert extra == ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    assert "-DGGML_NATIVE=ON" in cmd and "-DCMAKE_BUILD_TYPE=Release" in cmd
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in cmd
    assert lc.cpu_tag(amx).endswith("-noamx") and lc.cpu_tag(amx).startswith("x86_64-intel-")
    epyc = dict(amx, model="AMD EPYC 9B14", amx=False, flags={"avx512f", "avx512_vnni"})
    cmd, extra = lc.cmake_args(tmp_path / "src", tmp_path / "b", epyc)
    assert extra == [] and "-DCMAKE_C_FLAGS=" in cmd
    assert not lc.cpu_tag(epyc).endswith("-noamx") and lc.cpu_tag(epyc) != lc.cpu_tag(amx)
