"""The ids a prompt feeds are the whole-text tokenization of its text (issue 20).

G1 models were trained on text tokenized whole (greedy longest match). The prompt is
built from cached segments (one per line, each newline at the START of the next line's
segment) and healed at the cursor: the ids fed, followed by the encoding of the healed
text, must equal ``encode(prompt text)``, for every file and cursor. Line-by-line
encoding (each line with its own "\\n") failed this on ~14 % of positions of indented code.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from rwkv_engine.core.tokenizer import WorldTokenizer
from rwkv_engine.core.vocab_index import vocab_index
from rwkv_engine.pipeline.context_ring import Chunk
from rwkv_engine.pipeline.prompt_layout import PromptBuilder

from pipeline_fixtures import fast_config, make_request

TOK = WorldTokenizer.default()
ROOT = Path(__file__).resolve().parents[2]


def check_canonical(prompt, tok=TOK) -> None:
    """fed ids + encode(healed) == encode(text); the healed text is what the heal removed."""
    fed = prompt.tokens()
    assert fed[0] == 0
    text = tok.decode_bytes(fed[1:]) + prompt.healed_bytes
    whole = tok.encode(text)
    assert whole[:len(fed) - 1] == fed[1:], _first_difference(whole, fed[1:], tok)
    assert tok.decode_bytes(whole[len(fed) - 1:]) == prompt.healed_bytes


def _first_difference(a, b, tok) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at {i}: whole {tok.decode(a[i:i + 4])!r} vs fed {tok.decode(b[i:i + 4])!r}"


def _files():
    ours = sorted(p for p in (list(ROOT.glob("tests/*/*.py")) + list(ROOT.glob("lua/rwkv/*.lua"))
                              + list(ROOT.glob("kernels/*.[ch]*")) + list(ROOT.glob("doc/*.txt"))))
    stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    std = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    return ours + random.Random(20).sample(std, min(40, len(std)))


def _random_requests(lines, rng, n):
    for _ in range(n):
        row = rng.randrange(len(lines))
        width = len(lines[row].encode("utf-8"))
        col = rng.choice([0, width, rng.randrange(width + 1)])
        yield make_request(lines, row, col=col)


@pytest.mark.parametrize("heal", [True, False])
@pytest.mark.parametrize("window", [None, 40], ids=["fixed-window", "window-40-tokens"])
def test_prompt_ids_are_the_whole_text_encoding_on_real_files(heal, window):
    """``window``: the FIM window's token budget (``fim_window_ms``; None = the fixed lines)."""
    rng = random.Random(7)
    files = _files()
    assert len(files) > 60
    b = PromptBuilder(fast_config(n_prefix=96, n_suffix=16, near_prefix=16, near_suffix=6, ring_chunk_size=16),
                      TOK, heal=heal)
    b.window_tokens = window
    checked = 0
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
        other = Chunk("other" + path.suffix, tuple(rng.sample(lines, min(12, len(lines)))))
        for req in _random_requests(lines, rng, 6):
            chunks = [other] if rng.random() < 0.5 else []
            p = b.build(req, chunks)
            check_canonical(p)
            assert heal or not p.healed_bytes
            checked += 1
    assert checked > 300


CASES = {
    "blank lines": (["def f():", "", "", "    x = 1", "", "    return x", "y = 2"], 3, 5),
    "trailing whitespace": (["a = 1   ", "b = 2\t", "    ", "c = 3 ", "d"], 3, 2),
    "crlf": (["a = 1\r", "if a:\r", "    b = 2\r", "c\r"], 2, 6),
    "tabs": (["func() {", "\tif x {", "\t\treturn 1", "\t}", "}"], 2, 3),
    "cjk line ends": (["# 中文注释。", "x = 1  # 说明，", "y = 2…", "z = 3"], 2, 3),
    "lines cut to max_line_bytes": (["x = [" + ", ".join(str(i) for i in range(40)) + "]   ", "    " * 30 + "y",
                                     "z = 1"], 2, 3),
    "cursor in column 0": (["class A:", "    def f(self):", "        pass", "", "    def g(self):"], 3, 0),
    "only indentation": (["class A:", "    def f(self):", "        ", "    x = 1"], 2, 8),
    "mid word": (["import os", "def main():", "    ret", "main()"], 2, 7),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hard_cases_stay_canonical(case):
    lines, row, col = CASES[case]
    for heal in (True, False):
        for kw in (dict(), dict(near_prefix=1, near_suffix=1), dict(max_line_bytes=64)):
            b = PromptBuilder(fast_config(**kw), TOK, heal=heal)
            chunk = Chunk("x.py", ("a = 1   ", "", "b = 2。"))
            for chunks in ((), (chunk,), (chunk, Chunk("y.lua", ("local z = 1", "return z", "\t")))):
                check_canonical(b.build(make_request(lines, row, col=col), chunks))


def test_a_trimmed_vocabulary_stays_canonical_too():
    ids = [0] + list(range(1, 257)) + sorted(set(TOK.encode("    return self.x\n        if y:\n\t\t✿prefix✿")))
    ids = list(dict.fromkeys(ids))
    small = WorldTokenizer.from_world_ids(ids)
    b = PromptBuilder(fast_config(), small)
    lines = ["class A:", "    def f(self):", "        return self.x", "        if y:", "\t\tz"]
    for row in range(len(lines)):
        check_canonical(b.build(make_request(lines, row, col=3)), small)


def test_healing_drops_what_the_cursor_may_still_extend():
    b = PromptBuilder(fast_config(), TOK)
    idx = vocab_index(TOK)
    lines = ["def f(x):", "    ret", "f(1)"]
    p = b.build(make_request(lines, 1, col=7))
    assert p.healed == "ret"                              # the last token of the cursor line
    kept = TOK.token_bytes(p.tokens()[-1])
    assert not idx.extends(kept + p.healed_bytes)         # no longer token could absorb it
    p = b.build(make_request(["def f(x):", "        ", "f(1)"], 1, col=8))
    assert p.healed == "\n        "                      # newline + indentation: typing extends it
    p = b.build(make_request(["x = 1", "", "f(1)"], 1, col=0))
    assert p.healed == "\n"                                # column 0: the newline may join the indentation
