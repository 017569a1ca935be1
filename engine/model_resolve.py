"""Turn the `model` option (None, a path, or a short name) into a checkpoint path."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

DEFAULT_MODEL = Path(__file__).with_name("data") / "default-model.pth"
SHORT_NAMES = ("g1-0.1b", "g1-0.4b", "g1-1.5b", "g1-2.9b", "g1-7.2b")


def resolve_model_path(model: Optional[str], download_dir: Optional[str] = None) -> Path:
    """None -> the bundled default model; a short name -> its downloaded file; else a path.

    Raises FileNotFoundError with one clear line when nothing usable is found
    (a path's ``.pth`` suffix is optional; the loader checks the file itself).
    """
    if model in (None, "", "default"):
        if not DEFAULT_MODEL.is_file():
            raise FileNotFoundError(f"the bundled default model is missing: {DEFAULT_MODEL}")
        return DEFAULT_MODEL
    name = str(model)
    if name in SHORT_NAMES:
        from .download import resolve_local
        local = resolve_local(name, local_dir=download_dir) if download_dir else resolve_local(name)
        if local is None:
            raise FileNotFoundError(f"model {name} is not downloaded yet: run `rwkv-nvim download {name}` "
                                    f"or :RwkvDownload {name}")
        return Path(local)
    p = Path(os.path.expanduser(name))
    if not p.exists() and not Path(str(p) + ".pth").exists():
        raise FileNotFoundError(f"model file not found: {p}")
    return p if p.exists() else Path(str(p) + ".pth")
