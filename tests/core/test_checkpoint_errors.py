"""Unusable model files give one clear CheckpointError naming the file."""
import os
import pickle

import pytest
import torch

import rwkv_engine
from rwkv_engine.core.checkpoint import CheckpointError
from rwkv_engine.core.random_checkpoint import make_state_dict


def _check(path, match):
    with pytest.raises(CheckpointError) as ei:
        rwkv_engine.load_model(path)
    msg = str(ei.value)
    assert str(path).rstrip("/").split("/")[-1].replace(".pth", "") in msg
    assert "\n" not in msg
    assert match in msg
    return msg


def test_suffix_is_optional(tiny_model_path):
    m = rwkv_engine.load_model(str(tiny_model_path)[:-4])
    assert m.shape.n_layer == 2 and m.shape.n_embd == 128 and m.shape.vocab_size == 65536
    assert m.shape.n_head == 2 and m.shape.dim_ffn == 512


def test_missing_file(tmp_path):
    _check(tmp_path / "nope", "not found")


def test_truncated_file(tmp_path, tiny_model_path):
    data = tiny_model_path.read_bytes()
    p = tmp_path / "trunc.pth"
    p.write_bytes(data[: len(data) // 2])
    _check(p, "truncated or corrupt")


def test_garbage_and_empty_files(tmp_path):
    p = tmp_path / "garbage.pth"
    p.write_bytes(os.urandom(4096))
    _check(p, "checkpoint")
    e = tmp_path / "empty.pth"
    e.write_bytes(b"")
    _check(e, "empty")


def test_bytes_that_break_the_unpickler_itself(tmp_path):
    # random bytes can hit pickle opcodes that make torch's weights-only unpickler raise
    # IndexError ("pop from empty list": TUPLE without MARK) instead of UnpicklingError;
    # seen once in 4096 random bytes in a fresh-clone run
    p = tmp_path / "opcodes.pth"
    p.write_bytes(b"t." + bytes(64))
    _check(p, "checkpoint")


def test_not_rwkv7(tmp_path):
    sd = make_state_dict()
    sd = {k.replace("att.r_k", "att.time_faaaa"): v for k, v in sd.items()}
    p = tmp_path / "rwkv6.pth"
    torch.save(sd, p)
    _check(p, "not an RWKV-7")
    q = tmp_path / "other.pth"
    torch.save({"model.layers.0.weight": torch.zeros(2)}, q)
    _check(q, "transformer")


def test_wrong_vocabulary_without_declaration(tmp_path):
    p = tmp_path / "v1000.pth"
    torch.save(make_state_dict(vocab=1000), p)
    _check(p, "vocabulary")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rwkv_nvim_pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = "/tmp/rwkv_nvim_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    p = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 64), "x": _Evil()}, p)
    _check(p, "refused")
    assert not os.path.exists(marker)


def test_trimmed_vocabulary_checkpoint(tmp_path):
    ids = [0] + list(range(1, 257)) + [10060, 42093, 261]
    p = tmp_path / "trim.pth"
    torch.save(make_state_dict(vocab=len(ids), world_ids=ids), p)
    m = rwkv_engine.load_model(p)
    assert m.shape.vocab_size == len(ids)
    assert m.tokenizer.world_ids == ids
    toks = m.tokenizer.encode("✿prefix✿")
    assert m.tokenizer.to_world_ids(toks) == [10060, 42093, 10060]
    logits, _ = m.forward(torch.tensor([toks]), None)
    assert logits.shape == (1, len(ids))
