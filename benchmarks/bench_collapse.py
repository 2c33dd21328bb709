"""Collapse prevention (issue 18): the lightly-sized recipe that sits at ln K, with swavkit's
``swav.prevent_collapse`` on and off (off = the paper's fixed epsilon and queue), with and without the queue.

    python benchmarks/bench_collapse.py                  # cifar10-small, 3 epochs per arm (~3-5 min per arm)
    python benchmarks/bench_collapse.py --readme          # also update benchmarks/README.md

Recipe (what a new user sized like the lightly comparison gets with --auto): resnet18, 2x32 + 6x16 crops,
512 prototypes, global batch 128, 3 epochs; --auto fills the rest (queue 1152 from epoch 1, LR, warm-up,
freezing). Arms run one after another on the same data with the same seed. Each arm reports the final loss
next to ln K and the 20-NN top-1 of its backbone on cifar10-small val (floor: resnet18 random init).

Target: with prevention on, every arm ends below 0.99 ln K (the collapse monitor's 1 % band) and its
k-NN is at least the matching reference arm's; exit code 1 when missed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
from _common import prepare_shared_data, update_readme  # noqa: E402
from run_eval_benchmark import DATASETS, DEFAULT_SHARED_DATA, WORK_DIR  # noqa: E402

RECIPE = ["model.backbone=resnet18", "crops.counts=[2,6]", "crops.sizes_px=[32,16]", "crops.min_scales=[0.14,0.05]",
          "crops.max_scales=[1.0,0.14]", "crops.color_jitter_strength=1.0", "model.n_prototypes=512",
          "train.batch_size=128", "train.epochs=3", "model.zero_init_last=false"]
ARMS = {  # name -> overrides on top of RECIPE
    "reference, queue": ["swav.prevent_collapse=false"],
    "prevent, queue": ["swav.prevent_collapse=true"],
    "reference, no queue": ["swav.prevent_collapse=false", "swav.queue_length=0"],
    "prevent, no queue": ["swav.prevent_collapse=true", "swav.queue_length=0"],
}
COLLAPSE_BAND = 0.99  # the collapse monitor's: within 1 % of ln K


def run_arm(name: str, overrides: list[str], data: Path, progress: bool) -> dict:
    from swavkit.api import build_config
    from swavkit.artifacts.checkpoint import load_training_checkpoint
    from swavkit.evaluation.options import EvalOptions, KnnOptions
    from swavkit.evaluation.features import init_processes
    from swavkit.evaluation.knn import evaluate_knn
    from swavkit.training.trainer import train

    run_dir = WORK_DIR / "runs" / ("collapse-" + name.replace(", ", "-").replace(" ", "-"))
    cfg = build_config([], [f"data.path={data / 'train'}", f"out_dir={run_dir}", *RECIPE, *overrides], auto=True)
    start = time.perf_counter()
    result = train(cfg, restart=True, progress=progress)
    wall_s = time.perf_counter() - start
    options = EvalOptions(device=init_processes("cpu"), batch_size=256, num_workers=2, out_json="", progress=False,
                          floors="off")
    knn = evaluate_knn(str(result.backbone_dir), data / "train", data / "val", options, KnnOptions(k=20))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"arm": name, "overrides": overrides, "final_loss": result.final_loss,
            "ln_k": math.log(cfg.model.n_prototypes), "steps": result.step, "wall_time_s": round(wall_s, 1),
            "knn_top1": knn["metrics"]["top1"], "final_epsilon": rows[-1].get("epsilon"),
            "loss_curve": [(r["step"], r["loss"]) for r in rows if "loss" in r],
            "queue_dropped_at_step": load_training_checkpoint(result.checkpoint)["queue_dropped_at_step"]}


def random_init_floor(data: Path) -> float:
    from swavkit.evaluation.options import EvalOptions, KnnOptions
    from swavkit.evaluation.features import init_processes
    from swavkit.evaluation.knn import evaluate_knn

    options = EvalOptions(device=init_processes("cpu"), batch_size=256, num_workers=2, out_json="", progress=False,
                          floors="off", image_size_px=32)
    return evaluate_knn("timm:resnet18", data / "train", data / "val", options, KnnOptions(k=20))["metrics"]["top1"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10-small", choices=sorted(DATASETS))
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from swavkit.evaluation.report import git_commit, utc_now

    data = prepare_shared_data(args.data, DATASETS, args.shared_data, "bench_collapse")
    results = [run_arm(name, ARMS[name], data, not args.no_progress) for name in args.arms]
    floor = random_init_floor(data)
    lines = ["| arm | final loss | ln K | loss / ln K | final epsilon | 20-NN top-1 % | steps | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['arm']} | {r['final_loss']:.4f} | {r['ln_k']:.4f} | {r['final_loss'] / r['ln_k']:.3f} | "
                     f"{r['final_epsilon']:.3g} | {r['knn_top1']:.2f} | {r['steps']} | {r['wall_time_s']:.0f} |")
    lines.append(f"| resnet18 random init (floor) | - | - | - | - | {floor:.2f} | - | - |")
    missed = []
    by_name = {r["arm"]: r for r in results}
    for r in results:
        if not r["arm"].startswith("prevent"):
            continue
        if r["final_loss"] >= COLLAPSE_BAND * r["ln_k"]:
            missed.append(f"{r['arm']}: final loss {r['final_loss']:.4f} >= {COLLAPSE_BAND} ln K")
        reference = by_name.get(r["arm"].replace("prevent", "reference"))
        if reference and r["knn_top1"] < reference["knn_top1"]:
            missed.append(f"{r['arm']}: k-NN {r['knn_top1']:.2f} % < reference {reference['knn_top1']:.2f} %")
    commit = git_commit()[0]
    command = "python benchmarks/bench_collapse.py " + " ".join(argv if argv is not None else sys.argv[1:])
    verdict = "met" if not missed else "MISSED: " + "; ".join(missed)
    block = (f"### Collapse prevention (issue 18)\n\n`{command}`  \ncommit `{(commit or 'unknown')[:12]}`, "
             f"{utc_now():%Y-%m-%d %H:%M} UTC, data `{args.data}`\n\nRecipe: " + " ".join(RECIPE)
             + " with --auto for the rest.\n\n" + "\n".join(lines) + f"\n\nTarget (prevention arms end below "
             f"{COLLAPSE_BAND} ln K and match or beat the reference arm's k-NN): **{verdict}**.\n")
    print("\n" + block)
    out = BENCH_DIR / "results" / "collapse.json"
    out.write_text(json.dumps({"benchmark": "collapse", "command": command, "git_commit": commit, "data": args.data,
                               "recipe": RECIPE, "arms": results, "random_init_knn_top1": floor,
                               "missed": missed}, indent=2) + "\n")
    if args.readme:
        update_readme("collapse", block, prefix="perf", heading="## Evaluation")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
