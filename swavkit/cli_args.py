"""Argument types of the command line (``type=`` of argparse), shared by every sub-command wherever it is
registered. Standard library only, so that ``swavkit --help`` stays instant and any module may import it
without importing :mod:`swavkit.cli`."""

from __future__ import annotations

import argparse
import math


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def parse_duration_minutes(text: str) -> float:
    """'20m', '1300s', '1.5h' or a bare number of minutes -> minutes (> 0); ValueError otherwise."""
    units = {"s": 1 / 60, "m": 1.0, "min": 1.0, "h": 60.0}
    text = text.strip().lower()
    number, unit = text, "m"
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number, unit = text[: -len(suffix)], suffix
            break
    try:
        minutes = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"expected a duration like 20m, 1300s or 1.5h, got {text!r}") from None
    if not (minutes > 0 and math.isfinite(minutes)):
        raise ValueError(f"expected a positive duration like 20m, 1300s or 1.5h, got {text!r}")
    return minutes


__all__ = ["non_negative_int", "positive_int", "positive_float", "parse_duration_minutes"]
