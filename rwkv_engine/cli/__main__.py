"""`python -m rwkv_engine.cli ...` = the `rwkv-nvim` console script."""
import sys

from . import main

sys.exit(main())
