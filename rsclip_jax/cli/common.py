"""Pieces shared by the CLI commands: common arguments, model loading, text files."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rsclip_jax.argtypes import positive_int  # noqa: F401 - re-exported: the CLI modules import it from here
from rsclip_jax.checkpoint import load_checkpoint_with_info, load_tokenizer
from rsclip_jax.models import CLIP


class TextFileError(ValueError):
    """A text file is not valid UTF-8; the message names the file and line."""


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one caption or label per line), stripped.

    Raises:
        TextFileError: naming the file, the line number and the offending byte.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark is harmless
    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextFileError(
                f"{path}:{number}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                "re-save the file as UTF-8"
            ) from None
        text = text.strip()
        if text:
            lines.append(text)
    return lines


def check_output_path(path: str, flag: str) -> str:
    """Checks, before any work, that the file `path` (given by `flag`) can be written; returns it.

    The rule of every rsclip command: missing parent folders are created when the file is
    written, so the path is fine when its nearest existing ancestor is a writable folder.

    Raises:
        ValueError: naming `flag` and the path, when it is a folder, or lies under a file or in a
            folder that cannot be written.
    """
    if not path:
        raise ValueError(f"{flag}: give a file name")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {existing} (permission denied); choose another location")
    return path


RASTER_HELP = ("--bands 4,3,2 picks bands of a file (1-based; default its red/green/blue, else 1,2,3); "
               "--bands B04,B03,B02 picks band files of a folder or assets of a STAC item JSON")


def add_raster_args(p: argparse.ArgumentParser) -> None:
    """`--bands`, `--scale`, `--gamma`: how a raster becomes 8-bit RGB (rsclip_jax.raster)."""
    p.add_argument("--bands", default=None, help=RASTER_HELP)
    p.add_argument("--scale", default=None, metavar="MIN,MAX",
                   help="fixed stretch to 8 bits for every band (default: per-band 2-98 percentiles of an overview; "
                        "8-bit bands as they are)")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="display gamma after the stretch (default 1: linear; 1.5 brightens dark scenes)")


CHECKPOINT_HELP = ("OpenCLIP/RemoteCLIP weights (.pt, .pth, .bin, .safetensors), an OpenCLIP hub folder "
                   "(open_clip_config.json + weights), a transformers CLIP folder (config.json + weights) or an "
                   "rsclip training workdir")
MODEL_HELP = ("architecture name (see `rsclip models`); default: the one recorded with the weights, else "
              "inferred from their shapes")


def add_checkpoint_choice_args(p: argparse.ArgumentParser) -> None:
    """`--step N` / `--best`: which checkpoint of a training workdir (default: the latest)."""
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--step", type=int, default=None, help="workdir: load the checkpoint of this step")
    choice.add_argument("--best", action="store_true", help="workdir: load the best checkpoint by the run's best_metric")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    add_checkpoint_choice_args(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--batch-size", type=positive_int, default=64)


def load_model_from_args(args: argparse.Namespace) -> tuple[CLIP, Any]:
    """The model of `--checkpoint` (`--model`, `--step`/`--best`, `--dtype`) and its tokenizer
    (a transformers folder's own, else OpenAI's BPE), announced on stderr."""
    model, info = load_checkpoint_with_info(args.checkpoint, args.model, step=getattr(args, "step", None),
                                            best=getattr(args, "best", False), dtype=args.dtype)
    where = f", step {info['step']}" if "step" in info else ""
    print(f"loaded {args.checkpoint} ({info['model']}{where})", file=sys.stderr)
    tokenizer = load_tokenizer(args.checkpoint, info["format"])
    print(f"tokenizer: {tokenizer.describe()}", file=sys.stderr)
    return model, tokenizer
