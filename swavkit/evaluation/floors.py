"""The floors beside every evaluation number: the same architecture at random init and raw pixels, at
the same image size, with the same protocol. A number alone misleads: a short run on the bundled sample
scored 71.8 % k-NN on its val split, below raw pixels (79.8 %), and nothing said so.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

from swavkit.data.constants import is_rgb8


# Stdlib only at import: the CLI registers --floors from here (torch loads inside add_floors).

FLOOR_CHOICES = ("auto", "on", "off")
# "auto": floors when the train split (fine-tuning: the labelled part of it) is at most this large
# (CIFAR-10 / Fashion-MNIST scale), where two more feature extractions, or one more fine-tune, cost
# minutes on a CPU; on ImageNet-sized splits they would cost hours, so they are left to --floors on.
AUTO_MAX_TRAIN_IMAGES = 60_000
FLOOR_NAMES = {"random_init": "random init", "raw_pixels": "raw pixels"}


def floor_sources(result: dict) -> dict[str, str]:
    """{floor name: backbone source} for a result; none when the result is itself a floor."""
    source = str(result["backbone"]["source"])
    if source == "pixels" or source.startswith("timm:"):
        return {}
    return {"random_init": f"timm:{result['backbone']['architecture']}", "raw_pixels": "pixels"}


def floors_wanted(setting: str | bool, n_train: int) -> bool:
    """Whether to measure the floors for a train split (fine-tuning: labelled set) of ``n_train`` images.

    ``setting`` is auto | on | off; True / False (the library's former fine-tune switch) mean on / off.
    """
    if isinstance(setting, bool):
        setting = "on" if setting else "off"
    if setting not in FLOOR_CHOICES:
        raise ValueError(f"floors: one of {', '.join(FLOOR_CHOICES)}, got {setting!r}")
    return setting == "on" or (setting == "auto" and n_train <= AUTO_MAX_TRAIN_IMAGES)


def add_floors_argument(parser: argparse.ArgumentParser, floors: str, default: str = "auto",
                        counted: str = "the train split") -> None:
    """``--floors auto|on|off`` (bare ``--floors``: on; ``--no-floors``: off) for ``knn``, ``linear`` and
    ``finetune``; ``floors`` says what they are and ``counted`` what auto counts for that command. Sets
    ``args.floors``."""
    parser.add_argument("--floors", nargs="?", const="on", default=default, choices=FLOOR_CHOICES,
                        help=f"also evaluate {floors}, printed and recorded beside the result; auto = when "
                             f"{counted} has at most {AUTO_MAX_TRAIN_IMAGES:,} images, --floors alone = on "
                             f"(default {default})")
    parser.add_argument("--no-floors", dest="floors", action="store_const", const="off", help=argparse.SUPPRESS)


def evaluate_beside(result: dict, evaluate: Callable[..., dict], sources: dict[str, str], train_dir, val_dir,
                    options, method_options) -> dict[str, dict]:
    """Evaluate each of ``sources`` ({name: backbone source}) with ``evaluate`` (evaluate_knn or evaluate_linear,
    collective under torchrun) at the result's image size and with its protocol: the one wrapper behind the
    floors and the baselines (swavkit.evaluation.baselines). Returns {name: {"source", "image_size_px",
    "top1"[, "top5"]}}; nothing is written, and a source gets no floors or baselines of its own."""
    size_px = result["preprocessing"]["image_size_px"]
    quiet = dataclasses.replace(options, image_size_px=size_px, out_json="", floors="off", baselines=())
    measured = {}
    for name, source in sources.items():
        other = evaluate(source, train_dir, val_dir, quiet, method_options)
        measured[name] = {"source": source, "image_size_px": other["preprocessing"]["image_size_px"],
                          **{k: other["metrics"][k] for k in ("top1", "top5") if k in other["metrics"]}}
    return measured


def add_floors(result: dict, evaluate: Callable[..., dict], train_dir, val_dir, options, method_options) -> dict:
    """Evaluate each floor of ``result`` with ``evaluate`` (:func:`evaluate_beside`) and record them as
    ``result["floors"]`` = {name: {"source", "image_size_px", "top1"[, "top5"]}} in the returned copy (the caller
    rewrites its result file: :func:`swavkit.evaluation.report.rewrite_result`)."""
    from swavkit.runtime import distributed  # torch: this module is imported by `swavkit --help` (stdlib only)

    sources = floor_sources(result)
    if not sources:
        return result
    channels, bit_depth = result["preprocessing"].get("channels", 3), result["preprocessing"].get("bit_depth", 8)
    if not is_rgb8(channels, bit_depth):  # not yet: floors are built for 8-bit RGB inputs (swavkit/data/channels.py)
        note = (f"floors skipped: they are built for 8-bit RGB inputs and this backbone takes {channels} channel(s) "
                f"at {bit_depth} bits")
        if distributed.is_main_process():
            print(note)
        return {**result, "floors_skipped": note}
    return {**result, "floors": evaluate_beside(result, evaluate, sources, train_dir, val_dir, options,
                                                method_options)}


def below_floors(result: dict) -> list[str]:
    """The floors a result does not beat on top-1, as "raw pixels 79.80 %"."""
    top1 = result["metrics"]["top1"]
    return [f"{FLOOR_NAMES.get(name, name)} {floor['top1']:.2f} %" for name, floor in result.get("floors", {}).items()
            if top1 <= floor["top1"]]
