"""Pieces shared by the CLI commands: common arguments, model loading, text files."""

from __future__ import annotations

import argparse
import os
import sys

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


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (--batch-size, --k, --top-k): an integer of 1 or more.

    argparse reports a bad value as `argument --FLAG: ...` and exits before any work.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


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


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="OpenCLIP/RemoteCLIP weights: .pt, .pth, .bin or .safetensors")
    p.add_argument("--model", default=None, help="architecture name (see `rsclip models`); default: inferred from the weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--batch-size", type=positive_int, default=64)


def load_model_from_args(args: argparse.Namespace) -> CLIP:
    from rsclip_jax.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint, model=args.model, dtype=args.dtype)
    print(f"loaded {args.checkpoint} ({_describe(model)})", file=sys.stderr)
    return model


def _describe(model: CLIP) -> str:
    from rsclip_jax.models.config import config_name

    return config_name(model.config) or "custom architecture"
