"""SwAV vs DeepCluster-v2 at an equal CPU wall-clock budget: the same backbone, crops, batch, optimiser and
data, only ``method`` differs; 20-NN and linear top-1 of each export beside the two floors (random init, raw
pixels) on the same split.

    python benchmarks/bench_deepcluster_vs_swav.py --data cifar10-small --budget 4

Arms (run in turn, ``--repeats`` times, alternating the order: ABBA, so a busy phase of the shared machine
hits both): configs/cifar10_cpu_budget.yaml (SwAV) and configs/deepclusterv2_cifar10_cpu.yaml (the same recipe
with method=deepclusterv2), each with train.budget_minutes=BUDGET (start-up, every step, DeepCluster-v2's bank
pass and k-means, and the export all count). Evaluation as benchmarks/run_eval_benchmark.py (shared code).

Target (exit 1 when missed): each method's export beats both floors on 20-NN and on linear top-1. Which
method wins is reported, not targeted. Missing data: one line on stderr, exit 2.
Writes benchmarks/results/deepcluster-vs-swav-<data>-<budget>min.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))
from _common import environment, markdown_table, write_result  # noqa: E402
from run_eval_benchmark import DEFAULT_SHARED_DATA, WORK_DIR, evaluate, floor, prepare_data, pretrain  # noqa: E402

ARMS = {"swav": "configs/cifar10_cpu_budget.yaml", "deepclusterv2": "configs/deepclusterv2_cifar10_cpu.yaml"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10-small", choices=["cifar10-tiny", "cifar10-small"])
    parser.add_argument("--shared-data", type=Path, default=Path(os.environ.get("SWAVKIT_SHARED_DATA",
                                                                                 DEFAULT_SHARED_DATA)))
    parser.add_argument("--budget", type=float, default=4.0, metavar="MINUTES", help="train.budget_minutes per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm (ABBA order)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    data = prepare_data(args.data, args.shared_data)
    repo = BENCH_DIR.parent
    order = [arm for r in range(args.repeats) for arm in (list(ARMS) if r % 2 == 0 else list(ARMS)[::-1])]
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for i, arm in enumerate(order):
        run_dir = WORK_DIR / "runs" / f"dc-vs-swav-{args.data}-{arm}-{i}"
        start = time.perf_counter()
        pre = pretrain([str(repo / ARMS[arm])], [f"seed={i // 2}"], data, run_dir, None, None,
                       not args.no_progress, budget=args.budget)
        row = evaluate(f"{arm} run {i}", str(run_dir / "backbone"), data, pre["image_size_px"], args)
        runs[arm].append({"pretraining": pre, "knn_top1": row["knn"]["metrics"]["top1"],
                          "linear_top1": row["linear"]["metrics"]["top1"],
                          "wall_time_s": round(time.perf_counter() - start, 1)})
    size = runs["swav"][0]["pretraining"]["image_size_px"]
    floors = {"random init": floor("resnet10t random init", "timm:resnet10t", args.data, data, size, args),
              "raw pixels": floor("raw pixels", "pixels", args.data, data, size, args)}
    floor_top1 = {name: {kind: f[kind]["metrics"]["top1"] for kind in ("knn", "linear")} for name, f in floors.items()}

    table, missed = [], []
    for arm, arm_runs in runs.items():
        knn = [r["knn_top1"] for r in arm_runs]
        linear = [r["linear_top1"] for r in arm_runs]
        table.append([arm, _spread(knn), _spread(linear),
                      ", ".join(str(r["pretraining"]["steps"]) for r in arm_runs),
                      ", ".join(str(r["pretraining"]["epochs"]) for r in arm_runs),
                      ", ".join(f"{r['pretraining']['wall_time_s'] / 60:.1f}" for r in arm_runs)])
        for name, f in floor_top1.items():
            for kind, values in (("knn", knn), ("linear", linear)):
                if statistics.median(values) <= f[kind]:
                    missed.append(f"{arm} {kind} {statistics.median(values):.2f} % <= {name} {f[kind]:.2f} %")
    for name, f in floor_top1.items():
        table.append([f"{name} (floor)", f"{f['knn']:.2f}", f"{f['linear']:.2f}", "-", "-", "-"])
    markdown = markdown_table(["arm", "20-NN top-1 % (median, min..max)", "linear top-1 % (median, min..max)",
                               "steps", "epochs", "pretraining min"], table)
    winner = {kind: max(ARMS, key=lambda a: statistics.median(r[f"{kind}_top1"] for r in runs[a]))
              for kind in ("knn", "linear")}
    print("\n" + markdown + f"\n\nhigher 20-NN: {winner['knn']}; higher linear: {winner['linear']}")
    write_result(f"deepcluster-vs-swav-{args.data}-{args.budget:g}min", {
        "command": "python benchmarks/bench_deepcluster_vs_swav.py " + " ".join(sys.argv[1:]),
        "environment": environment(), "budget_minutes": args.budget, "runs": runs, "floors": floor_top1,
        "winner": winner, "markdown": markdown, "missed": missed})
    if missed:
        print("TARGET MISSED: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


if __name__ == "__main__":
    sys.exit(main())
