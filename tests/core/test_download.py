"""Model download (`rwkv-nvim download NAME`) against a loopback fake Hub.

huggingface_hub reads HF_ENDPOINT / HF_HOME once, at import, so every network test runs
the command in a fresh subprocess with its own endpoint and an empty HF_HOME. Each
subprocess has a hard timeout; the fake hub (tests/support/fake_hf_server.py) runs in a daemon
thread of the test process and only listens on 127.0.0.1.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hf_server import FakeHub
from rwkv_engine.core import download as dl

REPO = "BlinkDL/rwkv7-g1"
OLD_01B = "rwkv7-g1-0.1b-20250307-ctx4096.pth"
NEW_01B = "rwkv7-g1a-0.1b-20250728-ctx4096.pth"       # newest 0.1b
LETTER_01B = "rwkv7-g1b-0.1b-20250601-ctx4096.pth"    # later letter, older date
NEW_15B = "rwkv7-g1c-1.5b-20260110-ctx8192.pth"       # newest 1.5b
LETTER_15B = "rwkv7-g1d-1.5b-20251201-ctx8192.pth"
LISTING = [OLD_01B, NEW_01B, LETTER_01B, NEW_15B, LETTER_15B, "README.md", "rwkv7-g1-2.9b-20250519-ctx4096.pth"]

SUBPROCESS_TIMEOUT = 90  # seconds; the unreachable-endpoint case needs ~25 (hub retries)


# -- helpers ------------------------------------------------------------------------------
def _console_script() -> list[str]:
    """`rwkv-nvim download`: the installed console script next to this interpreter (or on
    PATH); without one, the same entry point run as `python -m rwkv_engine.cli`."""
    script = Path(sys.executable).with_name("rwkv-nvim")
    found = str(script) if script.exists() else shutil.which("rwkv-nvim")
    return [found, "download"] if found else [sys.executable, "-m", "rwkv_engine.cli", "download"]


def _env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra)
    return env


def _run(args: list[str], endpoint: str, hf_home: Path, cmd: list[str] | None = None, **extra: str):
    return subprocess.run(
        (cmd or [sys.executable, "-m", "rwkv_engine.cli.download"]) + args,
        env=_env(endpoint, hf_home, **extra), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _dead_endpoint() -> str:
    """An http URL on loopback with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def payloads() -> dict[str, bytes]:
    # distinct random bytes per file, so a wrong pick cannot pass a content check
    return {name: os.urandom(200_000 + 1000 * i) for i, name in enumerate(LISTING) if name.endswith(".pth")}


@pytest.fixture
def hub(payloads):
    with FakeHub(payloads | {"README.md": b"# RWKV-7 G1\n"}) as fake:
        yield fake


# -- name resolution (pure) ---------------------------------------------------------------
def test_short_names_pick_newest_date_not_latest_letter():
    assert dl.resolve_name("g1-0.1b", LISTING) == NEW_01B
    assert dl.resolve_name("g1-1.5b", LISTING) == NEW_15B
    assert dl.resolve_name("G1-1.5B", LISTING) == NEW_15B
    assert dl.resolve_name("g1-2.9b", LISTING) == "rwkv7-g1-2.9b-20250519-ctx4096.pth"


def test_exact_file_names_are_accepted_with_or_without_suffix():
    assert dl.resolve_name(LETTER_01B, LISTING) == LETTER_01B
    assert dl.resolve_name(LETTER_01B[:-4], LISTING) == LETTER_01B


@pytest.mark.parametrize("name", ["g1-7.2b", "g1-9b", "gpt-4", "README.md", "rwkv7-g1z-0.1b-20990101-ctx4096.pth"])
def test_unknown_names_give_one_line_listing_short_names(name):
    with pytest.raises(dl.DownloadError) as info:
        dl.resolve_name(name, LISTING)
    message = str(info.value)
    assert "\n" not in message and repr(name) in message
    for short in dl.KNOWN_SHORT_NAMES:
        assert short in message


def test_resolve_local_finds_newest_in_download_dir_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", _dead_endpoint())
    for name in (OLD_01B, NEW_01B, NEW_15B):
        (tmp_path / name).write_bytes(b"weights")
    (tmp_path / "rwkv7-g1a-0.4b-20250905-ctx4096.pth").mkdir()  # not a file: ignored
    assert dl.resolve_local("g1-0.1b", local_dir=tmp_path) == tmp_path / NEW_01B
    assert dl.resolve_local(OLD_01B, local_dir=tmp_path) == tmp_path / OLD_01B
    assert dl.resolve_local("g1-0.4b", local_dir=tmp_path) is None
    assert dl.resolve_local("g1-0.1b") is None  # nothing in the (empty) HF cache


# -- against the fake hub -----------------------------------------------------------------
def test_list_shows_pth_files_and_their_short_names(hub, tmp_path):
    result = _run(["--list"], hub.url, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    rows = dict(line.split("\t") if "\t" in line else (line, "") for line in _lines(result.stdout))
    assert set(rows) == {n for n in LISTING if n.endswith(".pth")}  # README.md is not a model
    assert rows[NEW_01B] == "g1-0.1b" and rows[NEW_15B] == "g1-1.5b"
    assert rows[OLD_01B] == "" and rows[LETTER_15B] == ""


def test_download_short_name_into_hf_cache(hub, payloads, tmp_path):
    hf_home = tmp_path / "hf"
    result = _run(["g1-0.1b"], hub.url, hf_home)
    assert result.returncode == 0, result.stderr
    path = Path(_lines(result.stdout)[-1])
    assert path.name == NEW_01B
    assert path.read_bytes() == payloads[NEW_01B]
    assert (hf_home / "hub") in path.parents
    assert "Traceback" not in result.stderr

    # now resolvable without any network: endpoint dead and offline mode on
    probe = "from rwkv_engine.core.download import resolve_local; print(resolve_local('g1-0.1b'))"
    offline = subprocess.run([sys.executable, "-c", probe], env=_env(_dead_endpoint(), hf_home, HF_HUB_OFFLINE="1"),
                             capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.strip()) == path

    # and `download` in offline mode returns the copy already on disk
    again = _run(["g1-0.1b", "--quiet"], hub.url, hf_home, HF_HUB_OFFLINE="1")
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()) == path


@pytest.mark.parametrize("size", [300_000, 22 * 1024 * 1024], ids=["small", "past-one-chunk"])
def test_dropped_transfer_is_resumed_with_correct_content(hub, tmp_path, size):
    data = os.urandom(size)
    hub.files[NEW_15B] = data
    hub.drop_first_get.add(NEW_15B)
    result = _run(["g1-1.5b", "--quiet"], hub.url, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == data
    gets = hub.gets(NEW_15B)
    assert len(gets) == 2  # the dropped one, then the retry
    if size > 10 * 1024 * 1024:
        # huggingface_hub writes 10 MiB chunks: past the first chunk it resumes with a Range
        assert gets[1].get("range", "").startswith("bytes=") and gets[1]["range"] != "bytes=0-"


def test_http_error_is_one_line_and_a_retry_completes(hub, payloads, tmp_path):
    hub.fail_status = 403
    failed = _run(["g1-0.1b", "--quiet"], hub.url, tmp_path / "hf")
    assert failed.returncode == 1
    assert _lines(failed.stderr) == [f"rwkv-nvim download: cannot download {NEW_01B}: HTTP 403 from "
                                     f"{hub.url}/{REPO}/resolve/main/{NEW_01B}"]
    hub.fail_status = None
    retried = _run(["g1-0.1b", "--quiet"], hub.url, tmp_path / "hf")
    assert retried.returncode == 0, retried.stderr
    assert Path(retried.stdout.strip()).read_bytes() == payloads[NEW_01B]


@pytest.mark.slow  # huggingface_hub retries a refused connection for ~23 s before giving up
def test_unreachable_endpoint_gives_one_clear_line(tmp_path):
    endpoint = _dead_endpoint()
    result = _run(["g1-0.1b"], endpoint, tmp_path / "hf")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = _lines(result.stderr)[-1]
    assert last.startswith(f"rwkv-nvim download: cannot reach Hugging Face ({endpoint}): ")
    assert last.endswith("; check your network or set HF_ENDPOINT")
    assert result.stdout == ""


def test_unknown_name_gives_one_line_and_nonzero_exit(hub, tmp_path):
    for name in ("g1-99b", "gpt-4"):
        result = _run([name, "--quiet"], hub.url, tmp_path / "hf")
        assert result.returncode == 1
        (line,) = _lines(result.stderr)
        assert line.startswith(f"rwkv-nvim download: unknown model {name!r}; known short names: g1-0.1b, ")
        assert result.stdout == ""


def test_dir_option_stores_the_file_there(hub, payloads, tmp_path):
    hf_home, target = tmp_path / "hf", tmp_path / "models"
    result = _run(["g1-1.5b", "--dir", str(target), "--quiet"], hub.url, hf_home)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == target / NEW_15B
    assert (target / NEW_15B).read_bytes() == payloads[NEW_15B]
    assert not (hf_home / "hub" / "models--BlinkDL--rwkv7-g1").exists()


@pytest.mark.skipif(os.name != "posix", reason="needs a pseudo-terminal")
def test_progress_bar_on_a_terminal_and_quiet_hides_it(hub, tmp_path):
    """huggingface_hub's own tqdm bar is drawn on a terminal; --quiet turns it off."""
    import fcntl
    import pty
    import struct
    import termios

    def stderr_on_a_terminal(args: list[str], hf_home: Path) -> str:
        controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm needs a width
        try:
            proc = subprocess.run([sys.executable, "-m", "rwkv_engine.cli.download", *args], stdout=subprocess.PIPE,
                                  stderr=terminal, env=_env(hub.url, hf_home), timeout=SUBPROCESS_TIMEOUT)
        finally:
            os.close(terminal)
        assert proc.returncode == 0
        out = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            out += chunk
        os.close(controller)
        return out.decode("utf-8", "replace")

    shown = stderr_on_a_terminal(["g1-0.1b"], tmp_path / "a")
    assert "100%" in shown and NEW_01B in shown
    hidden = stderr_on_a_terminal(["g1-0.1b", "--quiet"], tmp_path / "b")
    assert "%" not in hidden and hidden.strip() == ""


def test_console_script_end_to_end(hub, payloads, tmp_path):
    """`rwkv-nvim download NAME` prints the path of the downloaded file."""
    cmd = _console_script()
    result = _run([NEW_01B[:-4]], hub.url, tmp_path / "hf", cmd=cmd)
    assert result.returncode == 0, f"{cmd}: {result.stderr}"
    path = Path(_lines(result.stdout)[-1])
    assert path.name == NEW_01B and path.read_bytes() == payloads[NEW_01B]

    unknown = _run(["g1-99b", "--quiet"], hub.url, tmp_path / "hf", cmd=cmd)
    assert unknown.returncode == 1 and len(_lines(unknown.stderr)) == 1
    assert "Traceback" not in unknown.stderr
