"""Representation quality benchmark: pretrain (optionally), then k-NN and fast linear probe of
(a) the pretrained backbone, (b) the same architecture randomly initialised, (c) raw pixels,
all on the same real labelled data, at the same image size, with the same protocol.

    python benchmarks/run_eval_benchmark.py --data cifar10-small --config configs/cifar10_resnet18.yaml \
        --pretrain-minutes 30
    python benchmarks/run_eval_benchmark.py --data cifar10-tiny --config configs/tiny_cpu_debug.yaml \
        --pretrain-epochs 1            # smoke test: seconds to minutes on a CPU
    python benchmarks/run_eval_benchmark.py --data cifar10-small --backbone runs/a/backbone   # no pretraining

Data come from the team's shared folder (``../shared/data`` next to the repository, or
``--shared-data``), unpacked once into ``benchmarks/_work/data/<name>`` (git-ignored). Pretraining reads
only ``<name>/train`` and never its labels. Writes ``benchmarks/results/eval-<name>.json`` and prints a
markdown table; ``--readme`` also replaces this run's block in benchmarks/README.md ("## Evaluation").
Target: the backbone beats its random init on both k-NN and linear top-1; exit code 1 when it does not.
Missing data: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "_work"
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
from _common import prepare_shared_data, update_readme  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

# name -> (dataset in the shared folder, train images per class, val images per class; 0 = all)
DATASETS = {
    "cifar10-tiny": ("cifar10", 20, 10),  # 200 / 100 images: a smoke test, not a result
    "cifar10-small": ("cifar10", 500, 100),  # 5,000 / 1,000: the quick CPU benchmark
    "cifar10": ("cifar10", 0, 0),
    "fashion-mnist-small": ("fashion-mnist", 500, 100),
    "fashion-mnist": ("fashion-mnist", 0, 0),
}


def fail(message: str) -> None:
    print(f"run_eval_benchmark: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def prepare_data(name: str, shared_data: Path) -> Path:
    return prepare_shared_data(name, DATASETS, shared_data, "run_eval_benchmark")


# ----------------------------------------------------------------------------------------------------
# pretraining

def pretrain(config_files: list[str], overrides: list[str], data: Path, run_dir: Path, epochs: int | None,
             minutes: float | None, progress: bool, auto: bool = False, budget: float | None = None) -> dict:
    """SwAV on ``data/train`` (labels ignored); returns what was run and how long it took.

    ``budget`` (minutes): swavkit's own time budget (train.budget_minutes), which fits the schedule to the
    measured speed. ``minutes`` (the older way): an epoch count from a one-epoch calibration run, so the LR
    schedule of the real run still ends where the recipe says. ``auto``: ``--auto`` derives every key not set.
    """
    from swavkit.api import build_config
    from swavkit.training.trainer import train

    base = [f"data.path={data / 'train'}", *overrides] + ([f"train.budget_minutes={budget}"] if budget else [])
    calibration_s = None
    if minutes is not None:
        cfg = build_config(config_files, base + [f"out_dir={run_dir}-calibration", "train.epochs=1"], auto=auto)
        start = time.perf_counter()
        train(cfg, restart=True, progress=progress)
        calibration_s = time.perf_counter() - start
        epochs = max(1, int((minutes * 60 - calibration_s) // calibration_s))
        print(f"calibration: one epoch took {calibration_s:.0f} s -> {epochs} epoch(s) fit the remaining "
              f"{minutes * 60 - calibration_s:.0f} s", flush=True)
    start = time.perf_counter()  # --auto's own timing counts: it is part of what the user waits for
    cfg = build_config(config_files, base + [f"out_dir={run_dir}"] + ([f"train.epochs={epochs}"] if epochs else []),
                       auto=auto)
    result = train(cfg, restart=True, progress=progress)
    wall_s = time.perf_counter() - start
    if not result.completed:
        fail(f"pretraining stopped early at step {result.step}; see {run_dir}")
    steps_per_epoch = _steps_per_epoch(run_dir)
    return {"config_files": [str(f) for f in config_files], "overrides": base, "auto": auto,
            "epochs": round(result.step / steps_per_epoch, 1) if steps_per_epoch else cfg.train.epochs,
            "steps": result.step, "final_loss": result.final_loss, "ln_k": math.log(cfg.model.n_prototypes),
            "wall_time_s": round(wall_s, 1),
            "calibration_epoch_s": round(calibration_s, 1) if calibration_s else None, "run_dir": str(run_dir),
            "backbone": cfg.model.backbone, "image_size_px": cfg.crops.sizes_px[0],
            "budget_minutes": budget or minutes, "resolved_config": str(run_dir / "config.yaml")}


def _steps_per_epoch(run_dir: Path) -> float | None:
    """From the run's last metrics row (step / epoch)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("epoch")]
    return rows[-1]["step"] / rows[-1]["epoch"] if rows else None


# ----------------------------------------------------------------------------------------------------
# evaluation of one backbone

def evaluate(label: str, source: str, data: Path, image_size_px: int, args) -> dict:
    """k-NN and fast linear probe of one backbone, sharing one feature extraction."""
    from swavkit.evaluation.options import EvalOptions, KnnOptions, LinearOptions
    from swavkit.evaluation.features import extract_split_features, init_processes, load_eval_backbone
    from swavkit.evaluation.knn import evaluate_knn
    from swavkit.evaluation.linear_probe import evaluate_linear
    from swavkit.artifacts.preprocessing import resolve_preprocessing

    options = EvalOptions(device=init_processes(args.device), batch_size=args.batch_size, num_workers=args.workers,
                          out_json="", progress=not args.no_progress)
    preprocessing = resolve_preprocessing(source, image_size_px)
    start = time.perf_counter()
    split = extract_split_features(load_eval_backbone(source), data / "train", data / "val", preprocessing, options)
    knn = evaluate_knn(source, data / "train", data / "val", options, KnnOptions(k=20, temperature=0.07),
                       features=split)
    linear = evaluate_linear(source, data / "train", data / "val", options, LinearOptions(recipe="fast"),
                             features=split)
    wall_s = time.perf_counter() - start
    print(f"{label}: k-NN top-1 {knn['metrics']['top1']:.2f} %, linear top-1 {linear['metrics']['top1']:.2f} % "
          f"({wall_s:.0f} s)", flush=True)
    return {"label": label, "source": source, "knn": knn, "linear": linear, "wall_time_s": round(wall_s, 1)}


def markdown(rows: list[dict]) -> str:
    def cell(record: dict, key: str) -> str:
        value = record["metrics"].get(key)
        return f"{value:.2f}" if value is not None else "-"

    lines = ["| backbone | k-NN top-1 % | k-NN top-5 % | linear top-1 % | linear top-5 % | feature dim | "
             "linear weight decay | eval time s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        knn, linear = row["knn"], row["linear"]
        lines.append(f"| {row['label']} | {cell(knn, 'top1')} | {cell(knn, 'top5')} | {cell(linear, 'top1')} | "
                     f"{cell(linear, 'top5')} | {knn['backbone']['feature_dim']} | "
                     f"{linear['protocol']['selected_weight_decay']:g} | {row['wall_time_s']:.0f} |")
    return "\n".join(lines)


def protocol_text(rows: list[dict], data_name: str, pretraining: dict | None) -> str:
    first = rows[0]["knn"]
    data, pre = first["data"], first["preprocessing"]
    lines = [f"Data: `{data_name}` ({data['n_train']} train / {data['n_val']} val images, {data['n_classes']} "
             f"classes; pretraining used the train images without labels). Images {pre['image_size_px']} px, "
             f"crop fraction {pre['crop_fraction']}.",
             "k-NN: 20 neighbours, cosine similarity on L2-normalised frozen features, votes weighted "
             "exp(sim/0.07), faiss exact search. Linear: fast recipe (standardised frozen features, softmax "
             "regression by L-BFGS; weight decay chosen on a stratified 20 % of train, refitted on all train, "
             "val evaluated once). Floors: same architecture randomly initialised (timm, eval-mode BN) and raw "
             "pixels in [0, 1] with each image's mean removed."]
    if pretraining:
        lines.append(f"Pretraining: {pretraining['backbone']}, {pretraining['epochs']} epoch(s) = "
                     f"{pretraining['steps']} steps in {pretraining['wall_time_s'] / 60:.1f} min "
                     f"(final loss {pretraining['final_loss']:.3f}, ln K {pretraining.get('ln_k', float('nan')):.3f}); "
                     f"config {', '.join(pretraining['config_files']) or 'defaults'}"
                     + (" with --auto" if pretraining.get("auto") else "")
                     + (f", budget {pretraining['budget_minutes']:g} min" if pretraining.get("budget_minutes") else "")
                     + f"; the resolved recipe is the run's config.yaml ({pretraining.get('resolved_config', '-')}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATASETS), default="cifar10-small")
    parser.add_argument("--shared-data", type=Path, default=Path(os.environ.get("SWAVKIT_SHARED_DATA",
                                                                                 DEFAULT_SHARED_DATA)),
                        help=f"the team's data folder (default {DEFAULT_SHARED_DATA} or $SWAVKIT_SHARED_DATA)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="pretraining recipe (repeatable); default configs/cifar10_resnet18.yaml")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--pretrain-epochs", type=int, default=None, help="pretraining epochs (default: the config's)")
    budget.add_argument("--pretrain-minutes", type=float, default=None,
                        help="pretraining wall-time budget; converted to epochs by a one-epoch calibration run")
    budget.add_argument("--backbone", default=None, metavar="SRC",
                        help="evaluate this backbone (export/run folder/checkpoint) instead of pretraining; its "
                             "architecture floor needs --architecture")
    parser.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                        help="pretrain with swavkit's time budget (train.budget_minutes): start-up, steps and export "
                             "fit in MINUTES")
    parser.add_argument("--auto", action="store_true", help="pretrain with --auto (keys not set are derived)")
    parser.add_argument("--min-knn", type=float, default=None, metavar="PCT",
                        help="also a target: k-NN top-1 of the pretrained backbone >= PCT (exit 1 when missed)")
    parser.add_argument("--no-pixels", action="store_true",
                        help="skip the raw-pixel floor (minutes on 50k+ images); random init is always evaluated")
    parser.add_argument("--architecture", default=None, help="timm name for the random-init floor (default: the "
                                                             "config's model.backbone)")
    parser.add_argument("--image-size", type=int, default=None, help="eval side length (default: the config's "
                                                                     "large crop size)")
    parser.add_argument("--name", default=None, help="result name (default eval-<data>)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--readme", action="store_true", help="also update this run's block in benchmarks/README.md")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    data = prepare_data(args.data, args.shared_data)
    from swavkit.config import load_config
    from swavkit.evaluation.report import environment, git_commit, utc_now

    config_files = args.config or ([] if args.auto else [str(REPO_ROOT / "configs" / "cifar10_resnet18.yaml")])
    name = args.name or f"eval-{args.data}"
    command = "python benchmarks/run_eval_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])

    pretraining = None
    if args.backbone:
        source = args.backbone
        cfg = load_config(config_files, args.overrides)
    else:
        pretraining = pretrain(config_files, args.overrides, data, WORK_DIR / "runs" / name, args.pretrain_epochs,
                               args.pretrain_minutes, not args.no_progress, auto=args.auto, budget=args.budget)
        source = str(Path(pretraining["run_dir"]) / "backbone")
        cfg = load_config([pretraining["resolved_config"]])  # what --auto chose, as the run saved it
    architecture = args.architecture or cfg.model.backbone
    image_size_px = args.image_size or cfg.crops.sizes_px[0]

    label = (f"SwAV {architecture}, {pretraining['epochs']} ep ({pretraining['wall_time_s'] / 60:.1f} min)"
             if pretraining else f"{source}")
    rows = [evaluate(label, source, data, image_size_px, args),
            floor(f"{architecture} random init", f"timm:{architecture}", args.data, data, image_size_px, args)]
    if not args.no_pixels:
        rows.append(floor("raw pixels", "pixels", args.data, data, image_size_px, args))

    table = markdown(rows)
    protocol = protocol_text(rows, args.data, pretraining)
    total_s = time.perf_counter() - started
    commit = git_commit()[0]
    block = (f"### {name}\n\n`{command}`  \ncommit `{(commit or 'unknown')[:12]}`, {utc_now():%Y-%m-%d %H:%M} UTC, "
             f"{rows[0]['knn']['environment']['device']}, total wall time {total_s / 60:.1f} min\n\n"
             f"{protocol}\n\n{table}\n\n(raw records: `benchmarks/results/{name}.json`)\n")
    print("\n" + block)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "command": command, "data": args.data, "git_commit": commit,
               "environment": environment(rows[0]["knn"]["environment"]["device"].split(" ")[0]),
               "pretraining": pretraining, "image_size_px": image_size_px, "total_wall_time_s": round(total_s, 1),
               "rows": rows, "markdown": table}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO_ROOT)}")
    if args.readme:
        update_readme(name, block, prefix="eval", heading="## Evaluation")
    return verdict(rows, pretraining, args.min_knn)


FLOOR_CACHE = WORK_DIR / "floors"  # floors depend on (data, source, image size) only: computed once


def floor(label: str, source: str, data_name: str, data: Path, image_size_px: int, args) -> dict:
    """A floor row (random init or raw pixels), from the cache when this data, source and size were done."""
    path = FLOOR_CACHE / f"{data_name}-{source.replace(':', '-')}-{image_size_px}px.json"
    if path.is_file():
        row = json.loads(path.read_text())
        print(f"{label}: from {path.relative_to(REPO_ROOT)}", flush=True)
        return {**row, "label": label, "cached": True}
    row = evaluate(label, source, data, image_size_px, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row) + "\n")
    return row


# a run whose final loss is above this share of ln K has not clearly left the collapse plateau
LN_K_SHARE = 0.97


def verdict(rows: list[dict], pretraining: dict | None = None, min_knn: float | None = None) -> int:
    """The targets: the evaluated backbone beats its random-init floor on k-NN and on the linear probe; a
    pretraining run ended clearly below ln K; k-NN top-1 >= ``min_knn`` when given. Prints what missed and
    returns 1 then (0 when met)."""
    ours, floor_row = rows[0], rows[1]
    missed = [f"{kind}: {ours[kind]['metrics']['top1']:.2f} % <= random init {floor_row[kind]['metrics']['top1']:.2f} %"
              for kind in ("knn", "linear") if ours[kind]["metrics"]["top1"] <= floor_row[kind]["metrics"]["top1"]]
    if pretraining and pretraining.get("ln_k") and not pretraining["final_loss"] < LN_K_SHARE * pretraining["ln_k"]:
        missed.append(f"final loss {pretraining['final_loss']:.3f} is not below {LN_K_SHARE} ln K = "
                      f"{LN_K_SHARE * pretraining['ln_k']:.3f}")
    if min_knn is not None and ours["knn"]["metrics"]["top1"] < min_knn:
        missed.append(f"k-NN top-1 {ours['knn']['metrics']['top1']:.2f} % < target {min_knn:g} %")
    if missed:
        print("TARGET MISSED: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
