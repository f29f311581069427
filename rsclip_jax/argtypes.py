"""The one set of argparse types for numbers given on a command line (`--batch-size`, `--k`,
`--min-valid`, `--port`, timeouts, sizes): a bad value is reported by argparse as
`argument --FLAG: ...` and the command exits before any work.

It sits in the core layer so that the train layer's multi-process flags and the CLI use the same
rules.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable


def number_in(kind: type, low: float | None = None, high: float | None = None, what: str = "a number",
              above_low: bool = False) -> Callable[[str], float | int]:
    """An argparse type: `kind` (int or float) in [low, high] (or (low, high] with `above_low`).

    `what` names the expected value in messages, e.g. "a fraction from 0 to 1".
    """
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        too_low = low is not None and (value <= low if above_low else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what.replace(" ", "_")  # argparse names the type in some messages
    return parse


positive_int = number_in(int, 1, what="a positive integer (1 or more)")
fraction = number_in(float, 0.0, 1.0, what="a fraction from 0 to 1")
seconds = number_in(float, 0.0, what="0 or more seconds")
port_number = number_in(int, 0, 65535, what="a port number 0..65535 (0: any free port)")
positive_megabytes = number_in(float, 0.0, what="a size in MB above 0", above_low=True)

_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def byte_size(text: str) -> int:
    """An argparse type: a memory size above 0 such as `16GiB`, `80GB`, `1.5TiB` or `17179869184` (bytes).

    GB/G are powers of 1000 and GiB powers of 1024, as device vendors print them.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _BYTE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size above 0 such as 16GiB, 80GB or 17179869184 (bytes), "
                                         f"got {text!r}")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])
