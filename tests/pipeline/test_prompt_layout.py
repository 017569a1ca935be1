"""Prompt layout: FIM/plain text, line-by-line tokenization, stable segment boundaries."""
from __future__ import annotations

import pytest

from rwkv_engine.pipeline.context_ring import ContextRing
from rwkv_engine.pipeline.prompt_layout import (FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, LineTokenizer, PromptBuilder,
                                                chunk_header, split_at_byte_col, window_split)
from rwkv_engine.tokenizer import WorldTokenizer

from pipeline_fixtures import SOURCE_LINES, fast_config, make_request, type_text

TOK = WorldTokenizer.default()


def builder(**kw) -> PromptBuilder:
    return PromptBuilder(fast_config(**kw), TOK)


def text_of(prompt) -> str:
    return TOK.decode(prompt.tokens())


def full_text(prompt) -> bytes:
    """The prompt's text: what it fed after the start token, then what healing removed."""
    return TOK.decode_bytes(prompt.tokens()[1:]) + prompt.healed_bytes


def test_fim_layout_is_suffix_first_and_ends_at_the_cursor():
    lines = ["a = 1", "b = 2", "def f(x):", "    return x", "c = 3"]
    p = builder(n_prefix=8, near_prefix=1, near_suffix=2).build(make_request(lines, 3, col=4))
    assert p.fim
    tokens = p.tokens()
    assert tokens[0] == 0                                 # start token
    expected = ("a = 1\nb = 2\n" + FIM_PREFIX + FIM_SUFFIX + "return x\n" + "c = 3\n" + FIM_MIDDLE
                + "def f(x):\n" + "    ")
    assert full_text(p).decode() == expected
    assert p.healed == "\n    "                            # the newline + indentation token: typing extends it
    assert p.line_prefix == "    " and p.line_suffix == "return x"
    assert p.after_lines == ["return x", "c = 3"]
    kinds = [s.kind for s in p.segments]
    assert kinds == ["start", "far", "far", "far", "marker", "suffix", "suffix", "marker", "near"]   # "far": its newline


def test_plain_continuation_when_only_whitespace_follows():
    lines = ["import os", "", "def main():", "    pri", "   ", ""]
    p = builder().build(make_request(lines, 3))
    assert not p.fim
    assert p.tokens()[0] == 0 and full_text(p).decode() == "import os\n\ndef main():\n    pri"
    assert p.healed == "pri" and text_of(p).endswith("\n    ")
    assert all(s.kind in ("start", "far", "cursor") for s in p.segments)


def test_segments_start_with_their_newline_and_encode_to_the_whole_text():
    lines = SOURCE_LINES[:20]
    p = builder().build(make_request(lines, 18))
    far = [s for s in p.segments if s.kind == "far"]
    for seg in far[1:]:
        text = TOK.decode(seg.tokens)
        assert text.startswith("\n") and seg.tokens == tuple(TOK.encode(text))
    # about one segment per line (lines ending in code keep their boundary: resume points)
    far_lines = TOK.decode([t for s in far for t in s.tokens]).count("\n") + 1
    assert len(far) >= 0.7 * far_lines
    assert p.tokens()[1:] + TOK.encode(p.healed_bytes) == TOK.encode(full_text(p))


def test_ring_chunks_come_first_oldest_first_under_a_comment_naming_the_file():
    ring = ContextRing(4, 8, 4)
    ring.add("x = 1\ny = 2\nz = 3", "one.py")
    ring.add("p = 1\nq = 2\nr = 3", "util.lua")
    ring.promote(), ring.promote()
    p = builder().build(make_request(SOURCE_LINES, 10), ring.chunks)
    text = text_of(p)
    assert text.startswith("# one.py\nx = 1\ny = 2\nz = 3" + "\n\n-- util.lua\np = 1\nq = 2\nr = 3\n\n")
    assert "✿" not in TOK.decode([t for s in p.segments[1:3] for t in s.tokens])   # G1 knows ✿ only in FIM
    assert [s.kind for s in p.segments[:3]] == ["start", "chunk", "chunk"]
    assert p.segments[1].checkpoint == 2                  # chunk checkpoints persist to disk


@pytest.mark.parametrize("name,header", [("a/b.py", "# a/b.py"), ("x.lua", "-- x.lua"), ("k.cpp", "// k.cpp"),
                                         ("init.vim", '" init.vim'), ("Makefile", "# Makefile"),
                                         ("README.md", "<!-- README.md -->")])
def test_chunk_headers_are_comments_in_the_files_language(name, header):
    assert chunk_header(name) == header


def test_typing_changes_only_the_last_segment():
    b = builder()
    lines = list(SOURCE_LINES)
    lines[21] = "    y = x"
    p1 = b.build(make_request(lines, 21, col=7))
    lines2, col2 = type_text(lines, 21, 7, "zz")           # typing keeps the text after the cursor
    p2 = b.build(make_request(lines2, 21, col=col2))
    assert [s.tokens for s in p1.segments[:-1]] == [s.tokens for s in p2.segments[:-1]]
    assert p1.segments[-1].kind == p2.segments[-1].kind == "cursor"


def test_window_split_is_aligned_and_bounded():
    for row in range(0, 400):
        start, split = window_split(0, row, 256, 24)
        assert 0 <= start <= split <= row
        assert row - start <= 256 and (row - split >= 24 or split == start)
        assert split % 8 == 0 or split == start
    # moving one line keeps the far start for 64-line stretches
    starts = {window_split(0, row, 256, 24)[0] for row in range(300, 364)}
    assert len(starts) <= 2
    # the window's first line bounds the start, aligned so a short window stays stable too
    assert window_split(128, 150, 256, 24)[0] == 128
    assert {window_split(row - 100, row, 256, 24)[0] for row in range(300, 330)} == {256}


def test_moving_one_line_keeps_far_segments_within_an_aligned_block():
    b = builder(n_prefix=40, near_prefix=8, near_suffix=4)
    p1 = b.build(make_request(SOURCE_LINES, 33))
    p2 = b.build(make_request(SOURCE_LINES, 34))
    far1 = [s.tokens for s in p1.segments if s.kind == "far"]
    far2 = [s.tokens for s in p2.segments if s.kind == "far"]
    assert far1 == far2 and far1


def test_line_cache_hits_on_rebuild_and_is_bounded():
    lines = [f"line_{i} = {i}" for i in range(2000)]
    b = builder(n_prefix=1900, n_suffix=60, near_prefix=24, near_suffix=8)
    b.build(make_request(lines, 1950))
    misses = b.lines.misses
    b.build(make_request(lines, 1950, col=3))
    assert b.lines.misses - misses <= 3                   # the cursor line's two halves (+ a merge)
    small = LineTokenizer(TOK, max_entries=4)
    for i in range(10):
        small.encode(f"x{i}\n")
    assert len(small._cache) == 4


def test_byte_column_splits_multibyte_lines():
    assert split_at_byte_col("héllo", 3) == ("hé", "llo")
    assert split_at_byte_col("héllo", 2) == ("h", "éllo")  # inside é: backs off
    assert split_at_byte_col("abc", 99) == ("abc", "")


def test_cursor_indentation():
    b = builder()
    lines = ["def f():", "    if x:", "        ", "    return 1"]
    assert b.build(make_request(lines, 2)).indent == 8
    assert b.build(make_request(lines, 1)).indent == 4


@pytest.mark.parametrize("req,msg", [
    ({"lines": ["a"], "first": 0, "row": 3, "col": 0}, "outside"),
    ({"lines": "abc", "first": 0, "row": 0, "col": 0}, "list of strings"),
    ({"lines": ["a"], "first": 0, "row": 0}, "'col'"),
    ({"lines": ["a"], "first": 0, "row": 0, "col": -1}, ">= 0"),
])
def test_bad_requests_raise_one_line_errors(req, msg):
    with pytest.raises(ValueError, match=msg):
        builder().build(req)


def test_very_long_lines_are_cut_to_max_line_bytes():
    long = "x = [" + ", ".join(str(i) for i in range(2000)) + "]"
    lines = [long, "y = 1", long, "z = 2"]
    b = builder(max_line_bytes=64)
    p = b.build(make_request(lines, 2, col=len(long)))
    for seg in p.segments:
        assert len(TOK.decode_bytes(seg.tokens)) <= 64 + 1 or seg.kind == "marker"
    assert p.line_prefix == long[-64:]


def test_bytes_that_are_not_utf8_become_replacement_characters():
    lines = ["caf\udcc3\udca9 \udcff ok", "x = 1", "bad \ud800 surrogate"]
    p = builder().build(make_request(lines, 0, col=8))
    assert p.line_prefix == "caf\u00e9 \ufffd " and p.line_suffix == "ok"
    p = builder().build(make_request(lines, 2, col=7))     # a lone surrogate passes as 3 bytes
    assert p.line_prefix.startswith("bad \ufffd") and p.line_suffix == " surrogate"
    assert split_at_byte_col("\udcff\udcfe", 1) == ("\ufffd", "\ufffd")
