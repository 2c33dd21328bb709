"""Argument helpers every sub-command shares: value types with one-line errors, --workers, and
``add_command`` (help text ending in examples), so every command is registered the same way."""

from __future__ import annotations

import argparse
import math

from swavkit.runtime.cores import default_num_workers

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

def duration(text: str) -> float:
    try:
        return parse_duration_minutes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None

def add_workers(p, default: int | None, what: str) -> None:
    """``--workers`` (alias ``--num-workers``), the same flag in every sub-command."""
    p.add_argument("--workers", "--num-workers", dest="workers", type=non_negative_int, default=default,
                   metavar="N", help=f"DataLoader decoding processes; 0 decodes in this process ({what})")

def add_command(subparsers, name: str, *, help: str, examples: list[str], func,
                description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command whose help ends with ``examples`` (one command line each, shown as written) and that
    runs ``func(args)``."""
    heading = "example" if len(examples) == 1 else "examples"
    p = subparsers.add_parser(name, help=help, description=description,
                              epilog=f"{heading}:\n" + "\n".join(f"  {line}" for line in examples),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


# --precision of every command; the same words swavkit.runtime.device.resolve_precision takes (not
# imported from there: that module loads torch, and `swavkit --help` must not)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WORKERS_DEFAULT_HELP = "default min(4, usable CPU cores - 1)"  # swavkit.runtime.cores.default_num_workers

SOURCE_HELP = ("a run folder (out_dir), an exported backbone folder, a checkpoint .pt, or a released SwAV/VISSL "
               "checkpoint")


def workers_default() -> int:
    """The --workers default of every command (the library's rule, swavkit/runtime/cores.py)."""
    return default_num_workers()
