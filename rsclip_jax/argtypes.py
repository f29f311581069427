"""The one set of argparse types for numbers given on a command line (`--batch-size`, `--k`,
`--min-valid`, `--port`, timeouts, sizes): a bad value is reported by argparse as
`argument --FLAG: ...` and the command exits before any work.

It sits in the core layer so that the train layer's multi-process flags and the CLI use the same
rules.
"""

from __future__ import annotations

import argparse
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
