"""World tokenizer: equals the reference on real text, round-trips bytes, streams safely."""
import glob
import os
import sys

import pytest
from hypothesis import given, settings, strategies as st

from rwkv_engine import tokenizer
from rwkv_engine.tokenizer import TokenizerError, WorldTokenizer

CJK_EMOJI = "中文注释：计算总和 ✿prefix✿ 日本語のテキスト、한국어 🎉🚀👩‍💻 naïve café\r\n\t\tx = '✓'\n"


@pytest.fixture(scope="module")
def reference():
    try:
        import rwkv
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    except ImportError:
        pytest.skip("`rwkv` reference package not installed")
    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


def _real_sources():
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:12]
    files += sorted(glob.glob("/usr/include/*.h"))[:4]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files += sorted(glob.glob(os.path.join(here, "rwkv_engine", "*.py")))[:4]
    return files


def test_equals_reference_on_real_sources(reference):
    files = _real_sources()
    assert len(files) >= 10
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        assert tokenizer.encode(text) == reference.encode(text), path


def test_equals_reference_on_cjk_and_emoji(reference):
    assert tokenizer.encode(CJK_EMOJI) == reference.encode(CJK_EMOJI)
    assert tokenizer.decode(tokenizer.encode(CJK_EMOJI)) == CJK_EMOJI


def test_unused_model_ids_decode_to_nothing():
    tok = WorldTokenizer.default()
    assert tok.vocab_size == 65536
    assert tok.decode([65535, 11]) == "\n"
    assert tok.stream().feed(65533) == ""


def test_known_ids():
    assert tokenizer.encode("\n") == [11]
    assert tokenizer.encode(" ") == [33]
    assert tokenizer.encode("\n\n") == [261]
    assert tokenizer.encode(b"\x00\xff") == [1, 256]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_bytes_round_trip(data):
    assert tokenizer.decode_bytes(tokenizer.encode(data)) == data


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=100))
def test_text_round_trip(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_stream_decoder_holds_back_split_characters():
    tok = WorldTokenizer.default()
    text = "é中🎉"
    ids = tok.encode(text.encode("utf-8"))
    # force byte-level ids so every multibyte character is split across tokens
    byte_ids = [b + 1 for b in text.encode("utf-8")]
    for seq in (ids, byte_ids):
        dec = tok.stream()
        pieces = [dec.feed(i) for i in seq]
        assert "\ufffd" not in "".join(pieces)
        assert "".join(pieces) + dec.flush() == text
    dec = tok.stream()
    assert dec.feed(byte_ids[2]) == ""      # first byte of 中 alone: held back


def test_stream_decoder_flags_truly_invalid_bytes():
    tok = WorldTokenizer.default()
    dec = tok.stream()
    out = dec.feed(256) + dec.feed(tok.encode("a")[0])   # 0xff can never start a character
    assert out == "\ufffda"


def test_trimmed_vocabulary_encodes_with_local_ids():
    full = WorldTokenizer.default()
    keep = [0] + list(range(1, 257)) + sorted(set(full.encode("def return self\n    ")) - set(range(257)))
    tok = WorldTokenizer.from_world_ids(keep)
    text = "def f(self):\n    return self.x  # 中\n"
    ids = tok.encode(text)
    assert max(ids) < len(keep)
    assert tok.decode(ids) == text
    assert all(full.token_bytes(w) == tok.token_bytes(i) for i, w in zip(ids, tok.to_world_ids(ids)))
    assert len(ids) < len(text.encode())      # multi-byte tokens are used


def test_trimmed_vocabulary_must_keep_bytes():
    with pytest.raises(TokenizerError, match="byte"):
        WorldTokenizer.from_world_ids([0] + list(range(1, 200)))


def test_the_fast_vocabulary_parse_equals_literal_eval_on_every_line():
    """tokenizer._token_literal (the fast path) against ast.literal_eval (the reference)."""
    import ast

    from rwkv_engine.core.tokenizer import VOCAB_FILE, _token_literal
    lines = VOCAB_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 65000
    for line in lines:
        text = line[line.index(" ") + 1:line.rindex(" ")]
        assert _token_literal(text) == ast.literal_eval(text), line
    for text in ("'a\\'b'", '"it\'s"', "'\\\\n'", "b'\\xff'", "' '", '"\\""'):
        assert _token_literal(text) == ast.literal_eval(text), text
