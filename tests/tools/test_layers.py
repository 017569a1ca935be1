"""The tree's layers import only downwards.

Inside the package: core < pipeline < cli. Around it: the host bridge
(rplugin/python3/rwkv_nvim) and the developer tooling (bench/, tools/) sit on top of the
package; the tests' helpers (tests/support) on top of everything. No import cycles
anywhere in the package, the bridge or the tooling.

Every ``import`` / ``from ... import`` in rwkv_engine/ (module scope and inside functions)
is resolved to an absolute ``rwkv_engine.<layer>...`` name and checked. The
orchestrator (``pipeline.completer``) is imported only by the service, the backend factory
and the CLI.
"""
import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "rwkv_engine"
RANK = {"core": 0, "pipeline": 1, "cli": 2}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["rwkv_engine", *parts])


def imports_of(path: Path):
    """Absolute names imported by ``path`` (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None or mod in ("rwkv_engine", "rwkv_engine.core", "rwkv_engine.pipeline",
                                              "rwkv_engine.cli"):
                for a in node.names:                # `from . import x` names submodules
                    yield node.lineno, f"{mod}.{a.name}"
            else:
                yield node.lineno, mod


def layer_of(name: str):
    parts = name.split(".")
    if parts[0] != "rwkv_engine" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK else None


def engine_modules():
    return sorted(p for p in ENGINE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    loose = [p.name for p in ENGINE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside core/pipeline/cli: {loose}"


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: str(p.relative_to(ENGINE)))
def test_imports_only_go_down(path):
    own = layer_of(module_name(path))
    if own is None:                                  # rwkv_engine/__init__.py: the core facade
        own = "core"
    bad = []
    for line, target in imports_of(path):
        layer = layer_of(target)
        if layer is not None and RANK[layer] > RANK[own]:
            bad.append(f"{path.relative_to(ENGINE)}:{line} imports {target} ({own} -> {layer})")
        if target.startswith("rwkv_engine.pipeline.completer") and own == "pipeline" \
                and path.name not in ("service.py", "completer.py", "backend.py"):
            bad.append(f"{path.relative_to(ENGINE)}:{line} imports the orchestrator {target}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_upward_imports(tmp_path, monkeypatch):
    """The check itself can fail: a core module importing the pipeline is caught."""
    fake = ENGINE / "core" / "model.py"
    src = "from ..pipeline.config import EngineConfig\ndef f():\n    from ..cli import main\n"
    probe = tmp_path / "probe.py"
    probe.write_text(src)
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: src if self == fake else
                        Path.read_bytes(self).decode())
    found = [t for _, t in imports_of(fake)]
    assert found == ["rwkv_engine.pipeline.config", "rwkv_engine.cli.main"]
    with pytest.raises(AssertionError, match="core -> pipeline"):
        test_imports_only_go_down(fake)


def test_contract_names_stay_importable():
    import importlib
    import subprocess
    import sys
    eng = importlib.import_module("rwkv_engine")
    assert callable(eng.load_model)
    tok = importlib.import_module("rwkv_engine.tokenizer")
    assert tok.decode(tok.encode("def f(x):\n")) == "def f(x):\n"
    assert eng.tokenizer is tok
    out = subprocess.run([sys.executable, "-c", "import rwkv_engine.tokenizer as t, sys; "
                          "print('torch' in sys.modules, t.decode(t.encode('ok')))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "ok"]
    from rwkv_engine.cli import main
    assert callable(main)


def test_a_missing_attribute_is_a_plain_attribute_error(tmp_path):
    """The package's __getattr__ used importlib.util without importing it: in an interpreter
    where nothing else had imported it (python -S), any unknown attribute raised
    "module 'importlib' has no attribute 'util'" instead of naming the attribute."""
    import subprocess
    import sys
    (tmp_path / "rwkv_engine").symlink_to(ENGINE, target_is_directory=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import rwkv_engine\n"
            "try:\n    rwkv_engine.no_such_thing\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.stdout.strip() == "module 'rwkv_engine' has no attribute 'no_such_thing'", out.stdout + out.stderr


# -- the whole tree: engine < bench, tools (developer tooling on top), no cycles ------------
ROOT = ENGINE.parent
TOOLING = {"bench": ROOT / "bench", "tools": ROOT / "tools"}


def tooling_names() -> set:
    """Import names the developer tooling defines (its modules and packages)."""
    names = set()
    for d in TOOLING.values():
        names |= {p.stem for p in d.glob("*.py")} | {p.parent.name for p in d.glob("*/__init__.py")}
    return names


def test_the_engine_never_imports_developer_tooling():
    """Only `rwkv-nvim bench --peer llama.cpp` loads bench/llamacpp_peer, from the checkout."""
    tooling, bad = tooling_names(), []
    for path in engine_modules():
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if top in tooling and not (path.name == "bench.py" and top == "llamacpp_peer"):
                bad.append(f"{path.relative_to(ENGINE)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def _tooling_imports(path: Path, package: str):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            yield f"{package}.{node.module}" if node.module else package
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_no_import_cycles_in_the_engine_or_the_tooling():
    graph = {}
    for path in engine_modules():
        graph[module_name(path)] = {t for _, t in imports_of(path) if t.startswith("rwkv_engine.")}
    for d in TOOLING.values():
        for path in d.rglob("*.py"):
            rel = path.relative_to(d).with_suffix("").parts
            name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            graph[name] = set(_tooling_imports(path, package))
    graph = {k: {t for t in v if t in graph and t != k} for k, v in graph.items()}
    # a package importing its own submodules (a facade) is not a cycle: drop package -> child
    graph = {k: {t for t in v if not t.startswith(k + ".")} for k, v in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_one_module_says_where_the_caches_are():
    """core/cache_paths.py owns the XDG rule (tools/quickstart.py keeps a checked copy)."""
    owners = []
    for path in list(engine_modules()) + list((ROOT / "bench").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if 'environ.get("XDG_CACHE_HOME")' in text:
            owners.append(str(path.relative_to(ROOT)))
    assert owners == ["rwkv_engine/core/cache_paths.py"], owners


# -- the host bridge: thin, on top of the package ---------------------------------------------
BRIDGE = ROOT / "rplugin" / "python3" / "rwkv_nvim"
SUPPORT = ROOT / "tests" / "support"
HEAVY = ("torch", "numpy", "rwkv_engine", "httpx", "huggingface_hub")


def module_scope_imports(path: Path):
    """(line, name) of the imports executed when ``path`` is imported: module level, and
    inside module-level if/try blocks; not inside functions or classes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.lineno, node.module or ""
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []) or [])
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)


@pytest.mark.parametrize("path", sorted(BRIDGE.glob("*.py")), ids=lambda p: p.name)
def test_the_bridge_imports_nothing_heavy_when_loaded(path):
    """All python3 rplugins share one host process and :UpdateRemotePlugins imports every
    one: loading ours must not import torch or the engine (they load on first use)."""
    bad = [f"{path.name}:{line} imports {name}" for line, name in module_scope_imports(path)
           if name.split(".")[0] in HEAVY]
    assert not bad, "\n".join(bad)


def test_the_bridge_checker_sees_a_module_scope_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\ntry:\n    import torch\nexcept ImportError:\n    pass\n"
                     "def later():\n    import rwkv_engine\n")
    assert [n for _, n in module_scope_imports(probe)] == ["os", "torch"]


def _names_defined_in(folder: Path) -> set:
    return {p.stem for p in folder.glob("*.py")} | {p.parent.name for p in folder.glob("*/__init__.py")}


def test_nothing_below_imports_the_bridge_or_the_tests_helpers():
    """The package, the bridge and the tooling never import the tests' helpers, and the
    package and the tooling never import the bridge (the bridge is what Neovim loads)."""
    support, bad = _names_defined_in(SUPPORT), []
    bridge = {"rwkv_nvim"}
    for path in engine_modules():
        for line, target in imports_of(path):
            if target.split(".")[0] in support | bridge:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    # bench/first_ghost.py drives headless Neovim exactly as the editor tests do (the
    # benchmark of the same first session): the one allowed use
    allowed = {("bench", "first_ghost.py")}
    for folder in [BRIDGE, *TOOLING.values()]:
        for path in folder.rglob("*.py"):
            for target in _tooling_imports(path, ""):
                top = target.split(".")[0]
                if top in support and (path.parent.name, path.name) not in allowed:
                    bad.append(f"{path.relative_to(ROOT)} imports {target}")
                if top in bridge and folder is not BRIDGE:
                    bad.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not bad, "\n".join(bad)
