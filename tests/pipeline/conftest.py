"""Fixtures of the pipeline tests: every test here runs torch on one thread (the tiny models
are fastest single-threaded on a busy 2-core machine), and ``completer_factory`` builds a
Completer around the session's tiny model with small windows and a fresh cache."""
from __future__ import annotations

import pytest

from pipeline_fixtures import fast_config, one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture
def completer_factory(tiny_model, tmp_path):
    """Completer(config) sharing the session's tiny model; fresh cache per call."""
    from rwkv_engine.pipeline.completer import Completer

    def make(**overrides):
        return Completer(fast_config(tmp_path, **overrides), model=tiny_model)

    return make
