"""Issue 21 item 1: `:help rwkv` works in every install path.

- doc/tags ships with the plugin and is what `:helptags` makes of doc/rwkv.txt now
  (stale tags would send :help to the wrong lines or miss new tags);
- in a headless Neovim with the plugin on the runtimepath (as the test init, the quick
  start and plugin managers put it) :help finds the plugin's tags;
- where doc/tags is missing or older than the doc, the build (lua/rwkv/build.lua) and
  the quick start (tools/quickstart.py) make it.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

from nvim_harness import REPO, require_nvim

pytestmark = [pytest.mark.nvim]

FIX = "nvim --headless --clean '+helptags doc' +qa"


def helptags(doc_dir) -> str:
    from nvim_harness import NVIM

    proc = subprocess.run([NVIM, "--headless", "--clean", f"+helptags {doc_dir}", "+qa!"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "E154" not in proc.stderr, proc.stderr
    return (doc_dir / "tags").read_text()


def test_shipped_help_tags_are_current(tmp_path):
    require_nvim()
    shipped = REPO / "doc" / "tags"
    assert shipped.exists(), f"doc/tags is missing: run {FIX}"
    (tmp_path / "doc").mkdir()
    shutil.copy(REPO / "doc" / "rwkv.txt", tmp_path / "doc" / "rwkv.txt")
    assert shipped.read_text() == helptags(tmp_path / "doc"), f"doc/tags is stale: run {FIX}"


@pytest.mark.parametrize("topic", ["rwkv", "rwkv-options", ":RwkvStatus", "rwkv-option-float"])
def test_help_finds_the_plugin_in_headless_nvim(nvim_session, topic):
    s = nvim_session(manifest=False)
    s.cmd(f"help {topic}")
    assert s.nvim.current.buffer.name == str(REPO / "doc" / "rwkv.txt")
    line = s.nvim.current.line
    assert f"*{topic}*" in line, line
    assert "E149" not in s.messages()


def test_build_makes_missing_or_stale_tags(nvim_session, tmp_path):
    root = tmp_path / "plugin"
    (root / "doc").mkdir(parents=True)
    shutil.copy(REPO / "doc" / "rwkv.txt", root / "doc" / "rwkv.txt")
    s = nvim_session(manifest=False)
    s.lua("local root = ...; require('rwkv.host').plugin_root = function() return root end", str(root))
    assert s.lua("return require('rwkv.build').help_tags()") is True
    tags = (root / "doc" / "tags").read_text()
    assert tags == (REPO / "doc" / "tags").read_text()
    assert s.lua("return require('rwkv.build').help_tags()") is False  # current: left alone
    os.utime(root / "doc" / "tags", (1, 1))  # older than the doc
    assert s.lua("return require('rwkv.build').help_tags()") is True


def test_quickstart_makes_missing_tags(tmp_path, monkeypatch):
    require_nvim()
    from nvim_harness import NVIM

    spec = importlib.util.spec_from_file_location("quickstart_under_test", REPO / "tools" / "quickstart.py")
    qs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qs)
    (tmp_path / "doc").mkdir()
    shutil.copy(REPO / "doc" / "rwkv.txt", tmp_path / "doc" / "rwkv.txt")
    monkeypatch.setattr(qs, "ROOT", tmp_path)
    assert qs.help_tags_stale()
    qs.ensure_help_tags(NVIM)
    assert (tmp_path / "doc" / "tags").read_text() == (REPO / "doc" / "tags").read_text()
    assert not qs.help_tags_stale()
