"""Private on-disk places (state cache, kernel builds): directories 0700, files 0600."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def make_private_dir(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0700; tighten only what we created
    (plus ``path`` itself), never a pre-existing directory chosen by the user."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


def make_tree_private(root: Path) -> None:
    """Every directory under ``root`` 0700 and every file 0600 (e.g. compiler outputs
    written with the process umask)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o700)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


def write_private_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path``: 0600 in a 0700 directory, atomically (a temp file
    beside it, then rename: a reader never sees half a file). OSError when the place is
    not writable."""
    path = Path(path)
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
