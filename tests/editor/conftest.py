"""Fixtures of the headless-Neovim tests: the real Lua plugin in `nvim --embed --headless`
with the test init (tests/support/nvim_init.lua), attached with pynvim ``attach('child')``,
isolated XDG folders and a temporary rplugin manifest per session (tests/support/nvim_harness.py)."""
from __future__ import annotations

from typing import Optional

import pytest

from nvim_harness import NvimSession, start_nvim


@pytest.fixture
def nvim_session(tmp_path):
    """Factory: ``nvim_session(opts=None, manifest=True, extra_env=None) -> NvimSession``;
    every session is closed after the test."""
    sessions = []

    def make(opts: Optional[dict] = None, manifest: bool = True, name: str = "nvim",
             extra_env: Optional[dict] = None) -> NvimSession:
        s = start_nvim(tmp_path / f"{name}{len(sessions)}", opts, manifest=manifest, extra_env=extra_env)
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.close()
