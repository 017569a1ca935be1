"""`rwkv-nvim download NAME`: the command-line half of ``core.download``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from ..core.download import (DEFAULT_REPO, KNOWN_SHORT_NAMES, DownloadError, _endpoint, _plausible_name,
                             _unknown, download, list_models, log, short_names_of)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help=f"short name ({', '.join(KNOWN_SHORT_NAMES)}) or an exact .pth file name")
    parser.add_argument("--dir", metavar="DIR", default=None,
                        help="store the file in DIR instead of the Hugging Face cache")
    parser.add_argument("--list", action="store_true",
                        help=f"list the models available in {DEFAULT_REPO} and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or notes")


def _quiet_hub_logging() -> None:
    # huggingface_hub logs retry/resume warnings; the user gets our one line instead
    from huggingface_hub.utils import logging as hf_logging
    hf_logging.set_verbosity_error()


def run(args: argparse.Namespace) -> int:
    """`rwkv-nvim download`: print the local path (or the list) on stdout; 0 on success.
    On failure print one line to stderr and return 1."""
    quiet = getattr(args, "quiet", False)
    try:
        _quiet_hub_logging()
        if quiet:
            log.setLevel(logging.ERROR)
        if getattr(args, "list", False):
            files = list_models()
            aliases = {f: s for s, f in short_names_of(files).items()}
            for f in files:
                print(f"{f}\t{aliases[f]}" if f in aliases else f)
            return 0
        if not args.name:
            raise DownloadError(f"give a model NAME ({', '.join(KNOWN_SHORT_NAMES)}) or --list")
        if not _plausible_name(args.name):
            raise _unknown(args.name, ())
        if not quiet:
            print(f"rwkv-nvim: fetching {args.name} from {_endpoint()} ...", file=sys.stderr, flush=True)
        path = download(args.name, local_dir=args.dir, progress=not quiet)
        print(path)
        return 0
    except DownloadError as exc:
        print(f"rwkv-nvim download: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwkv-nvim download: interrupted", file=sys.stderr)
        return 130


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m rwkv_engine.cli.download NAME` (same as `rwkv-nvim download NAME`)."""
    parser = argparse.ArgumentParser(prog="rwkv-nvim download",
                                     description="Download an RWKV-7 G1 model from Hugging Face.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
