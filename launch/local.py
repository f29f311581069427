"""Kept for old commands: `python launch/local.py ARGS` is `rsclip launch local ARGS` (docs/scaling.md)."""
import sys
from rsclip_jax.cli import main
sys.exit(main(["launch", "local", *sys.argv[1:]]))
