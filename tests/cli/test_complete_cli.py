"""`rwkv-nvim complete FILE --line N --col N --json` end to end on a tiny random checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rwkv_engine.cli import complete as complete_cmd

from pipeline_fixtures import SOURCE_LINES, one_torch_thread  # noqa: F401


def kernel_dir() -> str:
    """Where the WKV kernel is normally built: keep using it when XDG_CACHE_HOME is changed
    (a fresh XDG dir would otherwise rebuild the kernel)."""
    root = os.environ.get("RWKV_NVIM_KERNEL_DIR")
    if root:
        return root
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(xdg, "rwkv.nvim", "kernels")


@pytest.fixture
def source_file(tmp_path):
    p = tmp_path / "demo.py"
    p.write_text("\n".join(SOURCE_LINES[:12]) + "\n", encoding="utf-8")
    return p


def test_complete_json_end_to_end_in_a_subprocess(tiny_model_path, source_file, tmp_path):
    env = dict(os.environ, RWKV_NVIM_KERNEL_DIR=kernel_dir(), XDG_CACHE_HOME=str(tmp_path / "xdg"),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv_engine.cli", "complete", str(source_file), "--line", "10",
         "--col", "4", "--model", str(tiny_model_path), "--candidates", "3", "--max-tokens", "4",
         "--json"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"candidates", "stats", "prompt"}
    assert 1 <= len(out["candidates"]) <= 3
    for c in out["candidates"]:
        assert isinstance(c["text"], str) and c["text"].strip() and isinstance(c["logprob"], float)
    s = out["stats"]
    assert s["prefilled_tokens"] == s["prompt_tokens"] > 0 and s["reused_tokens"] == 0
    assert s["decoded_tokens"] > 0 and s["cache_hits"]["miss"] == 1
    assert s["fim"] is True                              # code follows line 10
    assert (tmp_path / "xdg" / "rwkv.nvim").is_dir()     # the cache lives under XDG_CACHE_HOME
    # every id fed, and the healed text: together the whole-text tokenization of the prompt
    from rwkv_engine.tokenizer import WorldTokenizer
    tok, prompt = WorldTokenizer.default(), out["prompt"]
    assert prompt["tokens"][0] == 0 and len(prompt["tokens"]) == s["prompt_tokens"]
    text = tok.decode(prompt["tokens"][1:]) + prompt["healed"]
    assert tok.encode(text)[:len(prompt["tokens"]) - 1] == prompt["tokens"][1:]
    assert SOURCE_LINES[9][:4] in text and prompt["healed"]


def test_complete_text_output_in_process(tiny_model_path, source_file, tmp_path, capsys):
    rc = complete_cmd.main([str(source_file), "--line", "12", "--col", "0", "--model",
                            str(tiny_model_path), "--candidates", "2", "--max-tokens", "3",
                            "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert rc == 0
    assert "--- candidate 1" in out.out or "(no candidates)" in out.out
    assert "prefilled" in out.err
    assert (tmp_path / "cache").is_dir()


@pytest.mark.parametrize("args,msg", [
    (["--line", "99", "--col", "0"], "--line 99 is outside"),
    (["--line", "1", "--col", "99"], "--col 99 is outside"),
    (["--line", "1", "--col", "0", "--candidates", "40"], "candidates"),
])
def test_bad_arguments_give_one_line_errors(source_file, capsys, args, msg):
    rc = complete_cmd.main([str(source_file), *args, "--model", "unused.pth"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_a_missing_model_file_is_named(source_file, tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    rc = complete_cmd.main([str(source_file), "--line", "1", "--col", "0", "--model", str(missing)])
    err = capsys.readouterr().err
    assert rc == 1 and "nope" in err and err.count("\n") == 1
