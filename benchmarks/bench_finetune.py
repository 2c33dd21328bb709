"""Fine-tuning with few labels (the SwAV paper's semi-supervised protocol) on CIFAR-10: a swavkit backbone
pretrained on the cifar10-small train images vs the same architecture from random init, at 1 % and 10 %
of the labels of those train images.

    python benchmarks/bench_finetune.py --shared-data ../shared/data --readme
    python benchmarks/bench_finetune.py --backbone runs/a --readme      # an existing backbone, no pretraining

Steps: (1) unpack cifar10-small (5,000 train / 1,000 val) and the full 10,000-image val split into
``benchmarks/_work/data`` (git-ignored); (2) pretrain ``configs/cifar10_cpu_budget.yaml`` on the train
images for ``--pretrain-epochs`` (labels never read; an earlier run in the same folder is resumed, a
finished one reused); (3) ``swavkit.evaluation.finetune.finetune`` at each label budget with its floor (the same
fine-tune from random init, on the same labelled files); val = ``--val`` (default the full 10k split).
Writes ``benchmarks/results/finetune-<data>-<budget>.json`` (+ ``.labels.txt``) and
``benchmarks/results/finetune-<data>.json`` (summary); ``--readme`` replaces this run's block under
"## Fine-tuning" in benchmarks/README.md.
Target: the swavkit backbone beats its random init at every label budget; exit code 1 when it does not.
Missing data: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "_work"
RESULTS_DIR = BENCH_DIR / "results"
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
from _common import prepare_shared_data, update_readme  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

# unpacked name -> (dataset, train images per class, val images per class; 0 = all)
DATASETS = {"cifar10-small": ("cifar10", 500, 100), "cifar10-val10k": ("cifar10", 1, 0)}
BUDGETS = ("1%", "10%")
HEADING = "## Fine-tuning"


def fail(message: str) -> None:
    print(f"bench_finetune: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def prepare_data(name: str, shared_data: Path) -> Path:
    return prepare_shared_data(name, DATASETS, shared_data, "bench_finetune").relative_to(REPO_ROOT)


def pretrain(config_file: str, train_dir: Path, epochs: int, progress: bool) -> dict:
    """SwAV on ``train_dir`` (resumed or reused when the run folder already holds this run)."""
    from swavkit.config import load_config
    from swavkit.runtime.fileio import read_jsonl
    from swavkit.training.trainer import train

    run_dir = WORK_DIR.relative_to(REPO_ROOT) / "finetune" / f"pretrain-{train_dir.parent.name}"
    overrides = [f"data.path={train_dir}", f"out_dir={run_dir}", f"train.epochs={epochs}"]
    cfg = load_config([config_file], overrides)
    start = time.perf_counter()
    result = train(cfg, restart=False, progress=progress)
    if not result.completed:
        fail(f"pretraining stopped early at step {result.step}; run the same command again to resume {run_dir}")
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    images_per_s = sorted(row["images_per_s"] for row in rows if "images_per_s" in row)
    return {"command": f"swavkit pretrain --config {config_file} " + " ".join(overrides), "epochs": epochs,
            "steps": result.step, "run_dir": str(run_dir),
            "final_loss": result.final_loss if result.final_loss is not None else (rows[-1]["loss"] if rows else None),
            "median_images_per_s": images_per_s[len(images_per_s) // 2] if images_per_s else None,
            "wall_time_s_this_call": round(time.perf_counter() - start, 1), "backbone": cfg.model.backbone,
            "image_size_px": cfg.crops.sizes_px[0]}


def finetune_budget(backbone: str, train_dir: Path, val_dir: Path, budget: str, data_name: str, args) -> dict:
    from swavkit.evaluation.finetune import FinetuneOptions, finetune

    slug = budget.replace("%", "pct").replace("/", "-per-")
    options = FinetuneOptions(label_fraction=budget, seed=args.seed, min_steps=args.min_steps,
                              num_workers=args.workers, device="cpu",
                              out_dir=str(WORK_DIR / "finetune" / f"ft-{data_name}-{slug}"),
                              out_json=str(RESULTS_DIR / f"finetune-{data_name}-{slug}.json"), floors="on",
                              progress=not args.no_progress)
    return finetune(backbone, train_dir, val_dir, options)


def markdown(summary: dict) -> str:
    p = summary["pretraining"]
    lines = [f"### finetune-{summary['data']}", "",
             f"`{summary['command']}`  ",
             f"commit `{(summary['git_commit'] or 'unknown')[:12]}`, {summary['finished_at']}, "
             f"{summary['machine']}, total wall time {summary['wall_time_s'] / 60:.1f} min", ""]
    if p:
        lines.append(f"Backbone: {p['backbone']} pretrained by `{p['command']}` ({p['epochs']} epochs = "
                     f"{p['steps']} steps, last logged loss {p['final_loss']:.3f}"
                     + (f", median {p['median_images_per_s']:.0f} images/s" if p.get("median_images_per_s") else "")
                     + ").")
    first = summary["runs"][0]["protocol"]
    lines += [f"Labels: a stratified, seeded subset of `{summary['train_dir']}` (5,000 images); val: "
              f"`{summary['val_dir']}` ({summary['runs'][0]['data']['n_val']} images, evaluated once after the last "
              "epoch). Protocol: whole backbone + linear head, SGD momentum 0.9, no weight decay, trunk/head LRs of "
              "the reference eval_semisup.py's 10 % recipe (0.01 / 0.2 at batch 256, for both budgets) "
              "scaled by batch/256, "
              f"x{first['decay_gamma']} at 60 % and 80 % of the epochs, RandomResizedCrop(0.08-1) + flip, "
              f"{summary['runs'][0]['preprocessing']['image_size_px']} px. Floor: the same fine-tune from random "
              "init (timm), same labelled files, same recipe.", "",
              "| labels | labelled images | epochs x batch | trunk / head LR | swavkit top-1 % | random init top-1 % "
              "| gain | swavkit top-5 % | random init top-5 % | target |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for run in summary["runs"]:
        pr, floor = run["protocol"], run["floors"]["random_init"]
        met = run["metrics"]["top1"] > floor["top1"]
        lines.append(f"| {pr['label_fraction']} | {pr['n_labelled']} | {pr['epochs']} x {pr['global_batch_size']} | "
                     f"{pr['trunk_lr']:.4g} / {pr['head_lr']:.4g} | {run['metrics']['top1']:.2f} | "
                     f"{floor['top1']:.2f} | {run['metrics']['top1'] - floor['top1']:+.2f} | "
                     f"{run['metrics'].get('top5', float('nan')):.2f} | {floor.get('top5', float('nan')):.2f} | "
                     f"{'met' if met else '**MISSED**'} |")
    lines += ["", "Target: swavkit backbone top-1 > random-init top-1 at every label budget: "
              + ("**met**." if summary["target_met"] else "**MISSED**."),
              f"(raw records: `benchmarks/results/finetune-{summary['data']}*.json`; the labelled files: "
              "`*.labels.txt` beside them)"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared-data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--config", default="configs/cifar10_cpu_budget.yaml")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--backbone", default=None, help="skip pretraining: fine-tune this source")
    parser.add_argument("--val", choices=("val10k", "small"), default="val10k",
                        help="val10k: the full 10,000-image val split (default); small: cifar10-small's 1,000")
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-steps", type=int, default=500, help="swavkit finetune --min-steps (default 500)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    os.chdir(REPO_ROOT)  # the run folders and data paths are recorded relative to the repository
    start = time.perf_counter()
    data = prepare_data("cifar10-small", args.shared_data)
    val_dir = (prepare_data("cifar10-val10k", args.shared_data) if args.val == "val10k" else data) / "val"
    pretraining = None
    backbone = args.backbone
    if backbone is None:
        pretraining = pretrain(args.config, data / "train", args.pretrain_epochs, not args.no_progress)
        backbone = pretraining["run_dir"]
    runs = [finetune_budget(backbone, data / "train", val_dir, budget, "cifar10-small", args)
            for budget in args.budgets]
    target_met = all(run["metrics"]["top1"] > run["floors"]["random_init"]["top1"] for run in runs)
    from swavkit.evaluation.report import git_commit

    commit, _ = git_commit()
    summary = {"data": "cifar10-small", "train_dir": str(data / "train"), "val_dir": str(val_dir),
               "command": "python benchmarks/bench_finetune.py " + " ".join(sys.argv[1:]), "git_commit": commit,
               "machine": f"cpu ({platform.machine()}, {os.cpu_count()} cores shared, "
                          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
               "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "wall_time_s": round(time.perf_counter() - start, 1), "pretraining": pretraining,
               "target": "swavkit top-1 > random-init top-1 at every label budget", "target_met": target_met,
               "runs": [{k: run[k] for k in ("metrics", "protocol", "floors", "data", "preprocessing", "result_path",
                                             "labels_path", "wall_time_s")} for run in runs]}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "finetune-cifar10-small.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    print(text)
    if args.readme:
        update_readme("finetune-cifar10-small", text, prefix="finetune", heading=HEADING)
    return 0 if target_met else 1


if __name__ == "__main__":
    sys.exit(main())
