"""The ceilings beside the floors: did the pretraining beat weights the user could have downloaded?

``--baselines NAME[,NAME...]`` (``baselines=`` in the Python calls) names other backbones to evaluate on the
same split, at the same image size and with the same protocol as the user's backbone (the wrapper the floors
use, :func:`swavkit.evaluation.floors.evaluate_beside`):

* a timm pretrained name (``resnet50.a1_in1k``) whose weights are already in the local timm / Hugging Face
  cache - never downloaded: a name that is not cached is refused in one line that says how to fetch it;
* a released SwAV / SEER file, another swavkit run folder, checkpoint or export (the loaders of ``model.init``
  and ``load_backbone``).

The result records them as ``result["baselines"]`` and ends with one plain sentence (``result["verdict"]``):
which backbone is best, by how many points, and whether the user's backbone beats each baseline. A baseline
trained at another resolution (timm's pretrained cfg ``input_size``, an export's ``input_size``, a run's large
crop) is evaluated at the user's size, and the sentence says so.

Stdlib only at import (swavkit.errors, swavkit.evaluation.floors): the CLI registers ``--baselines`` from here.
"""

from __future__ import annotations

import argparse
from typing import Callable

from swavkit.data.constants import RAW_PIXELS_SOURCE
from swavkit.errors import ConfigError
from swavkit.evaluation.floors import evaluate_beside

BASELINE_KINDS = {"timm": "timm pretrained (cached)", "export": "swavkit export", "file": "checkpoint file"}


def parse_baselines(value) -> tuple[str, ...]:
    """``"a,b"`` / ``["a", "b,c"]`` / None -> ("a", "b", "c"): names in order, blanks and repeats dropped."""
    if not value:
        return ()
    parts = [value] if isinstance(value, str) else list(value)
    names = [name.strip() for part in parts for name in str(part).split(",")]
    return tuple(dict.fromkeys(name for name in names if name))


def add_baselines_argument(parser: argparse.ArgumentParser, same: str) -> None:
    """``--baselines NAME[,NAME...]`` for ``knn``, ``linear`` and ``finetune``; ``same`` says what each baseline
    shares with the backbone. Sets ``args.baselines`` (a tuple, empty by default)."""
    parser.add_argument("--baselines", type=parse_baselines, default=(), metavar="NAME[,NAME...]",
                        help=f"also evaluate these backbones with {same}: timm pretrained names whose weights are already cached (e.g. resnet50.a1_in1k; "
                             "never downloaded), released SwAV/SEER files, other run folders or exports; the "
                             "report ends with which is best and whether your backbone beats each")


def check_baselines(names) -> dict[str, str]:
    """{name: kind ("timm", "export" or "file")} for each baseline, checked without loading it and without
    network access, before any evaluation starts.

    Raises:
        LoadError: one line per problem: a timm name whose weights are not cached (with how to fetch them),
            a missing file, a folder that holds no backbone.
        ConfigError: ``timm:<name>`` or ``pixels``, which are the floors (``--floors``), not baselines.
    """
    from swavkit.artifacts.pretrained import locate_initial_source  # timm registry: only when asked

    kinds = {}
    for name in parse_baselines(names):
        if name == RAW_PIXELS_SOURCE or name.startswith("timm:"):
            raise ConfigError(f"--baselines {name}: random init and raw pixels are the floors (--floors on), not "
                              "baselines; name pretrained weights (e.g. resnet50.a1_in1k) or a run folder / export")
        kinds[name] = locate_initial_source(name, what=f"--baselines {name}").kind
    return kinds


def trained_size(name: str) -> tuple[int, str]:
    """(side in px the baseline's weights were trained / meant to be evaluated at, where that came from):
    timm's pretrained cfg ``input_size``, an export's ``input_size``, a run's large crop, else 224 (assumed)."""
    from swavkit.artifacts.preprocessing import resolve_preprocessing  # torch: only when measuring

    native = resolve_preprocessing(name)
    return native.image_size_px, native.size_from


def display_names(kinds: dict[str, str]) -> dict[str, str]:
    """{name: how the sentence, the table and the model card call it}: a timm name as given, a run folder or
    export by its run's (or folder's) name, so a shared card shows no home folders; the path as given where
    two would share a name."""
    from swavkit.evaluation.report import source_name  # torch: only when measuring

    shown = {name: name if kind == "timm" else source_name(name) for name, kind in kinds.items()}
    taken = list(shown.values())
    return {name: value if taken.count(value) == 1 else name for name, value in shown.items()}


def add_baselines(result: dict, evaluate: Callable[..., dict], train_dir, val_dir, options, method_options) -> dict:
    """Evaluate each of ``options.baselines`` beside ``result`` (same split, size, protocol) and record them as
    ``result["baselines"]`` = {name: {"source", "kind", "image_size_px", "trained_size_px", "trained_size_from",
    "top1"[, "top5"]}} and ``result["verdict"]`` (:func:`verdict`) in the returned copy."""

    kinds = check_baselines(options.baselines)
    if not kinds:
        return result
    measured = evaluate_beside(result, evaluate, {name: name for name in kinds}, train_dir, val_dir, options,
                               method_options)
    shown = display_names(kinds)
    for name, record in measured.items():
        size, origin = trained_size(name)
        record.update(name=shown[name], kind=BASELINE_KINDS[kinds[name]], trained_size_px=size,
                      trained_size_from=origin)
    result = {**result, "baselines": measured}
    return {**result, "verdict": verdict(result)}


def _points(value: float) -> str:
    return f"{value:.2f} point{'' if round(value, 2) == 1 else 's'}"


def verdict_sentence(own_name: str, own_top1: float, baselines: dict[str, float], size_px: int,
                     trained_px: dict[str, int] | None = None, metric: str = "top-1") -> str:
    """One plain sentence: which of the user's backbone and the ``baselines`` ({name: top-1 %}) is best and by
    how many points over the runner-up it is compared with, and whether the user's backbone beats each one;
    a baseline whose ``trained_px`` differs from ``size_px`` is said to be evaluated at ``size_px``.

    Values are compared as printed (two decimals): equal ones tie.
    """
    own = round(float(own_top1), 2)
    scores = {name: round(float(value), 2) for name, value in baselines.items()}
    best_name = max(scores, key=lambda name: scores[name])  # first of equals: the order given
    best = scores[best_name]
    own_text = f"your backbone ({own_name}, {own:.2f} %)"
    if best > own:
        opening = (f"The best is {best_name} at {best:.2f} % {metric}, {_points(best - own)} above {own_text}")
    elif own > best:
        opening = (f"Your backbone ({own_name}) is best at {own:.2f} % {metric}, {_points(own - best)} above the "
                   f"best baseline {best_name} ({best:.2f} %)")
    else:
        opening = f"Your backbone ({own_name}) ties with the best baseline {best_name} at {own:.2f} % {metric}"
    groups = {"beats": [], "ties with": [], "does not beat": []}
    for name, value in scores.items():
        groups["beats" if own > value else "ties with" if own == value else "does not beat"].append(
            f"{name} ({value:.2f} %)")
    clauses = [f"{word} {' or '.join(names) if word == 'does not beat' else ' and '.join(names)}"
               for word, names in groups.items() if names]
    sentence = f"{opening}; your backbone {', '.join(clauses)}"
    other_sizes = [f"{name} ({px} px)" for name, px in (trained_px or {}).items() if px != size_px]
    if other_sizes:
        sentence += (f"; trained at another resolution and evaluated here at {size_px} px: "
                     + ", ".join(other_sizes))
    return sentence + "."


def verdict(result: dict) -> str:
    """:func:`verdict_sentence` of a result record with ``baselines``."""
    from swavkit.evaluation.report import source_name  # torch: only for records with baselines

    baselines = {record.get("name", name): record for name, record in result["baselines"].items()}
    return verdict_sentence(source_name(result["backbone"]["source"]), result["metrics"]["top1"],
                            {name: record["top1"] for name, record in baselines.items()},
                            result["preprocessing"]["image_size_px"],
                            {name: record["trained_size_px"] for name, record in baselines.items()})


__all__ = ["parse_baselines", "add_baselines_argument", "check_baselines", "trained_size", "add_baselines",
           "verdict_sentence", "verdict", "display_names", "BASELINE_KINDS"]
