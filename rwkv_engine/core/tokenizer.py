"""RWKV World tokenizer: greedy longest match over UTF-8 bytes with a trie.

Vocabulary file (``data/rwkv_vocab_v20230424.txt``): one line per token,
``id <python literal str or bytes> <byte length>``. Ids 1..256 are the single
bytes 0x00..0xFF; id 0 (no line) is end-of-text.

A tokenizer may be *trimmed* to a subset of World ids (small models shipped with
the plugin): model-local index ``i`` <-> World id ``world_ids[i]``; encoding is
then greedy longest match restricted to that subset and every id it returns is a
model-local index. A trimmed vocabulary must keep id 0 and all 256 byte tokens,
so any byte string still encodes.

No torch import here: the tokenizer is used by the editor-side process too.
"""
from __future__ import annotations

import ast
import codecs
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

VOCAB_FILE = Path(__file__).resolve().parent.parent / "data" / "rwkv_vocab_v20230424.txt"
END_OF_TEXT = 0
WORLD_VOCAB_SIZE = 65536  # output size of World-vocabulary models
_ID_KEY = 256  # trie node key holding the token id (child keys are bytes 0..255)


class TokenizerError(ValueError):
    """Bad vocabulary file or a trimmed vocabulary that cannot encode all bytes."""


def _token_literal(text: str):
    """The token of one vocabulary line's Python literal (``'abc'``, ``"it's"``,
    ``b'\\xff'``). A plain string without a backslash is its inside (its delimiter cannot
    occur in it unescaped): several times faster than ``ast.literal_eval``, used for the rest."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and "\\" not in text:
        return text[1:-1]
    return ast.literal_eval(text)


@lru_cache(maxsize=1)
def _read_world_vocab(path: str = str(VOCAB_FILE)) -> dict:
    """World id -> token bytes, parsed once per process (~65k lines, ~0.1 s)."""
    table: dict = {}
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            first, last = line.index(" "), line.rindex(" ")
            tid = int(line[:first])
            tok = _token_literal(line[first + 1:last])
            if isinstance(tok, str):
                tok = tok.encode("utf-8")
            if len(tok) != int(line[last:]):
                raise TokenizerError(f"{path}:{lineno}: token length does not match its declared length")
            table[tid] = tok
    return table


class StreamDecoder:
    """Incremental decoder: feed ids one by one, get text that is safe to show.

    A UTF-8 character split across tokens is held back until complete; bytes that
    can never become valid UTF-8 are shown as U+FFFD only once they are known bad.
    """

    def __init__(self, tokenizer: "WorldTokenizer"):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token_id))

    def feed_bytes(self, raw: bytes) -> str:
        """Like ``feed`` for raw bytes (the part of a token after a healed prefix)."""
        return self._dec.decode(raw)

    def flush(self) -> str:
        """Text still held back at the end of a stream (an incomplete character)."""
        return self._dec.decode(b"", final=True)


class WorldTokenizer:
    """Greedy longest-match tokenizer over (a subset of) the RWKV World vocabulary."""

    def __init__(self, id_to_bytes: dict, world_ids: Optional[Sequence[int]] = None):
        # id_to_bytes: local id -> bytes (local id == World id for the full vocabulary)
        self.world_ids = list(world_ids) if world_ids is not None else None
        self._id_to_bytes = id_to_bytes
        # the World vocabulary has 65529 tokens but models have 65536 outputs: ids without a
        # token decode to b"" (never an IndexError while streaming a sampled id)
        self.vocab_size = (len(self.world_ids) if self.world_ids is not None
                           else max(max(id_to_bytes) + 1, WORLD_VOCAB_SIZE))
        self._bytes_list = [b""] * self.vocab_size
        for tid, tok in id_to_bytes.items():
            self._bytes_list[tid] = tok
        root: dict = {}
        for tid, tok in id_to_bytes.items():
            node = root
            for byte in tok:
                nxt = node.get(byte)
                if nxt is None:
                    nxt = node[byte] = {}
                node = nxt
            node[_ID_KEY] = tid
        for byte in range(256):
            if byte not in root or _ID_KEY not in root[byte]:
                raise TokenizerError(f"vocabulary has no token for byte 0x{byte:02x}; "
                                     "a trimmed vocabulary must keep all 256 byte tokens")
        self._root = root

    # -- construction -------------------------------------------------------
    @classmethod
    def default(cls) -> "WorldTokenizer":
        """The full 65536-id RWKV World vocabulary (shared instance)."""
        return _default_tokenizer()

    @classmethod
    def from_world_ids(cls, world_ids: Iterable[int]) -> "WorldTokenizer":
        """A trimmed vocabulary: local index i <-> World id world_ids[i]."""
        ids = [int(i) for i in world_ids]
        if not ids or ids[0] != END_OF_TEXT:
            raise TokenizerError("a trimmed vocabulary must start with id 0 (end-of-text)")
        if len(set(ids)) != len(ids):
            raise TokenizerError("a trimmed vocabulary lists a World id twice")
        world = _read_world_vocab()
        table = {}
        for local, wid in enumerate(ids):
            if wid == END_OF_TEXT:
                continue
            if wid not in world:
                raise TokenizerError(f"trimmed vocabulary names World id {wid}, which does not exist")
            table[local] = world[wid]
        return cls(table, world_ids=ids)

    # -- encoding -----------------------------------------------------------
    def encode(self, text: Union[str, bytes]) -> list:
        """Token ids of ``text`` (str is UTF-8 encoded first)."""
        src = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        root, out, i, n = self._root, [], 0, len(src)
        append = out.append
        while i < n:
            node = root
            j = i
            best_id = best_end = -1
            while j < n:
                node = node.get(src[j])
                if node is None:
                    break
                j += 1
                tid = node.get(_ID_KEY)
                if tid is not None:
                    best_id, best_end = tid, j
            append(best_id)
            i = best_end
        return out

    # -- decoding -----------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes_list[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        bl = self._bytes_list
        return b"".join(bl[int(i)] for i in ids)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def to_world_ids(self, ids: Iterable[int]) -> list:
        if self.world_ids is None:
            return [int(i) for i in ids]
        return [self.world_ids[int(i)] for i in ids]


@lru_cache(maxsize=1)
def _default_tokenizer() -> WorldTokenizer:
    return WorldTokenizer(_read_world_vocab())


def encode(text: Union[str, bytes]) -> list:
    """World ids of ``text`` with the full RWKV World vocabulary."""
    return _default_tokenizer().encode(text)


def decode(ids: Iterable[int], errors: str = "replace") -> str:
    """Text of World ids (invalid UTF-8 becomes U+FFFD); see ``decode_bytes``."""
    return _default_tokenizer().decode(ids, errors=errors)


def decode_bytes(ids: Iterable[int]) -> bytes:
    """Exact bytes of World ids: ``decode_bytes(encode(b)) == b`` for any bytes."""
    return _default_tokenizer().decode_bytes(ids)
