"""Model download from Hugging Face: `rwkv-nvim download NAME` and `:RwkvDownload NAME`.

Everything on the wire is done by huggingface_hub (listing, HEAD/GET, retries, resume
of a dropped transfer inside one call, the cache layout, progress bars); this module
only maps friendly names to files and turns failures into one clear line.

Names:
    short name   g1-0.1b | g1-0.4b | g1-1.5b | g1-2.9b | g1-7.2b  -> the NEWEST matching
                 `.pth` of any G1 letter variant (rwkv7-g1-..., rwkv7-g1a-..., rwkv7-g1c-...),
                 newest by the date in the file name (YYYYMMDD), not by the letter
    file name    an exact `.pth` file of the repository (`.pth` may be left off)

Where files go: the Hugging Face cache ($HF_HOME/hub, shared with other tools) or, when
`local_dir` / `--dir` / config `download_dir` is given, `local_dir/<file name>`.
Endpoint: $HF_ENDPOINT (default https://huggingface.co), read by huggingface_hub at import.

No torch here: importing this module is cheap enough for the CLI and the plugin.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .errors import one_line

DEFAULT_REPO = "BlinkDL/rwkv7-g1"
KNOWN_SHORT_NAMES = ("g1-0.1b", "g1-0.4b", "g1-1.5b", "g1-2.9b", "g1-7.2b")

# rwkv7-g1c-1.5b-20260110-ctx8192.pth -> variant "c", size "1.5b", date "20260110", ctx 8192
_G1_FILE = re.compile(
    r"^rwkv7-g1(?P<variant>[a-z0-9]*)-(?P<size>\d+(?:\.\d+)?b)-(?P<date>\d{8})"
    r"(?:-ctx(?P<ctx>\d+))?\.pth$"
)
_SHORT_NAME = re.compile(r"^g1-(?P<size>\d+(?:\.\d+)?b)$")
log = logging.getLogger(__name__)


class DownloadError(Exception):
    """A download or name-resolution failure; str(error) is one line meant for the user."""


class HubUnreachableError(DownloadError):
    """The endpoint could not be reached (no network, refused, timed out, offline mode)."""


# -- names ------------------------------------------------------------------------------
def is_short_name(name: str) -> bool:
    """True for names of the form g1-<size> (e.g. g1-1.5b), known or not."""
    return _SHORT_NAME.match(name.strip().lower()) is not None


def _known_short_names(files: Iterable[str] = ()) -> list[str]:
    """The fixed short names plus every g1 size that appears in `files`."""
    sizes = {n.split("-", 1)[1] for n in KNOWN_SHORT_NAMES}
    for f in files:
        m = _G1_FILE.match(f)
        if m:
            sizes.add(m.group("size"))
    return [f"g1-{s}" for s in sorted(sizes, key=lambda s: float(s[:-1]))]


def _newness(match: re.Match) -> tuple:
    # date first (the only thing that says "newer"); then letter variant and context as tie-breaks
    return (match.group("date"), match.group("variant"), int(match.group("ctx") or 0))


def _unknown(name: str, files: Iterable[str]) -> DownloadError:
    known = ", ".join(_known_short_names(files))
    return DownloadError(
        f"unknown model {name!r}; known short names: {known} "
        "(or an exact .pth file name from `rwkv-nvim download --list`)"
    )


def short_names_of(files: Iterable[str]) -> dict[str, str]:
    """{short name: newest file} for every g1 size present in `files`."""
    newest: dict[str, re.Match] = {}
    for f in files:
        m = _G1_FILE.match(f)
        if m:
            key = f"g1-{m.group('size')}"
            if key not in newest or _newness(m) > _newness(newest[key]):
                newest[key] = m
    return {key: m.string for key, m in newest.items()}


def resolve_name(name: str, files: Iterable[str]) -> str:
    """Map a short name or exact file name to a file in `files`; DownloadError if none fits."""
    files = list(files)
    wanted = name.strip()
    short = _SHORT_NAME.match(wanted.lower())
    if short:
        resolved = short_names_of(files).get(wanted.lower())
        if resolved is None:
            raise _unknown(name, files)
        return resolved
    for candidate in (wanted, wanted + ".pth"):
        if candidate in files and candidate.endswith(".pth"):
            return candidate
    raise _unknown(name, files)


def _plausible_name(name: str) -> bool:
    """Cheap offline check: could `name` possibly resolve (short name or a .pth file name)?"""
    n = name.strip()
    return bool(n) and "/" not in n and (is_short_name(n) or n.endswith(".pth") or n.startswith("rwkv"))


# -- error translation ------------------------------------------------------------------
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception types of whichever HTTP stack huggingface_hub uses."""
    found: list[type[BaseException]] = []
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(found) + (ConnectionError, TimeoutError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def _translate(exc: Exception, what: str) -> DownloadError:
    """Turn any huggingface_hub / transport failure into one line ("cannot <what>: ...")."""
    from huggingface_hub import errors as hf

    chain = list(_chain(exc))
    endpoint = _endpoint()
    if any(isinstance(e, hf.OfflineModeIsEnabled) for e in chain):
        return HubUnreachableError(f"cannot {what}: Hugging Face offline mode is on (unset HF_HUB_OFFLINE)")
    transport = _transport_errors()
    for e in chain:
        if isinstance(e, transport) and not isinstance(e, hf.HfHubHTTPError):
            reason = one_line(str(e)) or type(e).__name__
            return HubUnreachableError(
                f"cannot reach Hugging Face ({endpoint}): {reason}; check your network or set HF_ENDPOINT"
            )
    for e in chain:
        if isinstance(e, (hf.RepositoryNotFoundError, hf.GatedRepoError)):
            return DownloadError(f"cannot {what}: repository not found or not accessible on {endpoint}")
        if isinstance(e, hf.RevisionNotFoundError):
            return DownloadError(f"cannot {what}: revision not found on {endpoint}")
        if isinstance(e, hf.EntryNotFoundError) and isinstance(e, hf.HfHubHTTPError):
            return DownloadError(f"cannot {what}: file not found on {endpoint}")
        if isinstance(e, hf.HfHubHTTPError):
            response = getattr(e, "response", None)
            status = getattr(response, "status_code", "?")
            url = getattr(getattr(response, "request", None), "url", endpoint)
            return DownloadError(f"cannot {what}: HTTP {status} from {url}")
    return DownloadError(f"cannot {what}: {one_line(str(exc)) or type(exc).__name__}")


@contextlib.contextmanager
def _hub_errors(what: str) -> Iterator[None]:
    try:
        yield
    except DownloadError:
        raise
    except Exception as exc:  # every hub failure becomes one line; KeyboardInterrupt passes
        raise _translate(exc, what) from exc


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own tqdm bars on or off for the duration of a download."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS=0 wins and only warns
        warnings.simplefilter("ignore")
        was_disabled = are_progress_bars_disabled()
        disable_progress_bars()
        try:
            yield
        finally:
            if not was_disabled:
                enable_progress_bars()


# -- listing, download, local lookup ------------------------------------------------------
def list_models(repo: str = DEFAULT_REPO) -> list[str]:
    """The `.pth` files of `repo` on the Hub (sorted). Network; raises DownloadError."""
    from huggingface_hub import HfApi

    with _hub_errors(f"list {repo}"):
        files = HfApi().list_repo_files(repo)
    return sorted(f for f in files if f.endswith(".pth"))


def download(name: str, local_dir: Optional[str | Path] = None, progress: bool = True,
             repo: str = DEFAULT_REPO) -> Path:
    """Download `name` (short or file name) and return its local path.

    Into the HF cache, or into `local_dir/<file>` when given. A transfer dropped midway is
    resumed by huggingface_hub (Range request) within the call; a file already present is
    not fetched again. When the Hub cannot be reached but the model is already on disk,
    the local copy is returned. Raises DownloadError (one line) on any failure.
    """
    if not _plausible_name(name):
        raise _unknown(name, ())
    try:
        files = list_models(repo)
    except HubUnreachableError as unreachable:
        local = resolve_local(name, local_dir=local_dir, repo=repo)
        if local is not None:
            log.warning("%s -- using the copy already on disk", unreachable)
            return local
        raise
    filename = resolve_name(name, files)

    from huggingface_hub import hf_hub_download

    with _hub_errors(f"download {filename}"), _progress_bars(progress):
        path = hf_hub_download(
            repo_id=repo,
            filename=filename,
            local_dir=str(Path(local_dir).expanduser()) if local_dir is not None else None,
        )
    return Path(path)


def _cached_files(repo: str) -> dict[str, Path]:
    """{file name: path} of complete `.pth` files of `repo` in the HF cache (no network)."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)  # $HF_HUB_CACHE or $HF_HOME/hub
    except (CacheNotFound, OSError):
        return {}
    found: dict[str, Path] = {}
    for cached_repo in info.repos:
        if cached_repo.repo_id != repo or cached_repo.repo_type != "model":
            continue
        for revision in cached_repo.revisions:
            for f in revision.files:
                if f.file_name.endswith(".pth") and f.file_path.is_file():
                    found.setdefault(f.file_name, f.file_path)
    return found


def resolve_local(name: str, local_dir: Optional[str | Path] = None,
                  repo: str = DEFAULT_REPO) -> Optional[Path]:
    """The already-downloaded file for `name` (newest match), or None. Never uses the network.

    Looks in `local_dir` (the config's download_dir; files land there as `<dir>/<file>`) and
    in the Hugging Face cache. A copy in `local_dir` wins over the cache for the same file.
    """
    found = _cached_files(repo)
    if local_dir is not None:
        directory = Path(local_dir).expanduser()
        if directory.is_dir():
            # huggingface_hub moves a file into place only once complete (partial
            # transfers live under <dir>/.cache/huggingface/download/)
            found.update({p.name: p for p in directory.glob("*.pth") if p.is_file()})
    try:
        filename = resolve_name(name, found)
    except DownloadError:
        return None
    return found[filename]
