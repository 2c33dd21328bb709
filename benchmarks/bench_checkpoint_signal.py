"""Does the label-free checkpoint signal (RankMe, train.signal_images) order a run's checkpoints as k-NN does?

    python benchmarks/bench_checkpoint_signal.py [--data cifar10-2k fashion-mnist-2k] [--epochs 8]

For each data set (2,000 train / 1,000 val images by default, class-balanced, materialised once from
../shared/data; the -small sets have 5,000 / 1,000): one short pretraining
run on the CPU recipe configs/cifar10_cpu_budget.yaml (resnet10t, two 32 px crops, batch 128; Fashion-MNIST with
crops.mean/std computed from its images) for --epochs epochs, one checkpoint at the end of every epoch (nothing
in between). At each save the run measures RankMe on 512 fixed training images (what users get); right after,
the online monitor measures 20-NN top-1 (cosine, T 0.07) on the val split with the same weights. Reported per
data set: both series, Spearman's rank correlation between them over the checkpoints, and the k-NN of the
checkpoint RankMe would pick (best-rankme.pt) against the last checkpoint's and the best one's.

Target: Spearman rho >= 0.7 on every data set, the level at which making train.export_checkpoint=rankme the
default would be justified. Exit code 1 when missed (the default then stays ``last``); the numbers are the
result either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
import numpy as np  # noqa: E402

from _common import environment, prepare_shared_data, write_result  # noqa: E402
from run_eval_benchmark import DEFAULT_SHARED_DATA, WORK_DIR  # noqa: E402

# name -> (shared data set, train images per class, val images per class): small, so that a run of >= 8 epochs
# stays a few CPU-minutes on a shared machine (materialize.py's deterministic class-balanced subsets)
DATASETS = {"cifar10-2k": ("cifar10", 200, 100), "fashion-mnist-2k": ("fashion-mnist", 200, 100),
            "cifar10-small": ("cifar10", 500, 100), "fashion-mnist-small": ("fashion-mnist", 500, 100)}

TARGET_RHO = 0.7
RECIPE_FILE = REPO_ROOT / "configs" / "cifar10_cpu_budget.yaml"


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties get their average rank)."""
    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):  # average rank for ties
            r[values == v] = r[values == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def run(name: str, data: Path, epochs: int, progress: bool) -> dict:
    from swavkit.config import load_config
    from swavkit.runtime.fileio import read_jsonl
    from swavkit.training.trainer import train

    out = WORK_DIR / "runs" / f"signal-{name}"
    overrides = [f"data.path={data / 'train'}", f"out_dir={out}", f"train.epochs={epochs}",
                 "train.checkpoint_every_minutes=100000", "train.signal_images=512", "train.loggers=[jsonl]",
                 f"monitor.knn_data={data}", "monitor.k=20", "monitor.floors=false", "monitor.max_images=5000",
                 "data.num_workers=1"]
    if name.startswith("fashion"):
        overrides += ["crops.mean=[]", "crops.std=[]"]  # computed from its (grey) images
    start = time.perf_counter()
    train(load_config([RECIPE_FILE], overrides), restart=True, progress=progress)
    wall_s = time.perf_counter() - start
    rows = read_jsonl(out / "metrics.jsonl")
    rankme = {r["step"]: r for r in rows if "rankme" in r}
    knn = {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}
    steps = sorted(set(rankme) & set(knn))
    series = [{"step": s, "rankme": rankme[s]["rankme"], "rankme_embedding": rankme[s]["rankme_embedding"],
               "signal_code_entropy": rankme[s]["signal_code_entropy"], "knn_top1": knn[s]} for s in steps]
    picked = max(series, key=lambda p: p["rankme"])
    return {"data": name, "epochs": epochs, "wall_s": round(wall_s, 1), "checkpoints": series,
            "spearman_rankme_knn": round(spearman([p["rankme"] for p in series], [p["knn_top1"] for p in series]), 3),
            "spearman_embedding_rankme_knn": round(spearman([p["rankme_embedding"] for p in series],
                                                            [p["knn_top1"] for p in series]), 3),
            "knn_of_rankme_pick": picked["knn_top1"], "rankme_pick_step": picked["step"],
            "knn_of_last": series[-1]["knn_top1"], "knn_best": max(p["knn_top1"] for p in series)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["cifar10-2k", "fashion-mnist-2k"], choices=list(DATASETS))
    parser.add_argument("--epochs", type=int, default=8, help="one checkpoint per epoch (>= 8 for the issue)")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    results = []
    for name in args.data:
        data = prepare_shared_data(name, DATASETS, args.shared_data, "bench_checkpoint_signal")
        result = run(name, data, args.epochs, not args.no_progress)
        results.append(result)
        print(f"\n{name}: {len(result['checkpoints'])} checkpoints, {result['wall_s']:.0f} s")
        print("  step  RankMe  RankMe(z)  20-NN top-1 %")
        for p in result["checkpoints"]:
            print(f"  {p['step']:4d}  {p['rankme']:6.1f}  {p['rankme_embedding']:9.1f}  {p['knn_top1']:6.2f}")
        print(f"  Spearman rho(RankMe, k-NN) = {result['spearman_rankme_knn']}; RankMe picks step "
              f"{result['rankme_pick_step']} (k-NN {result['knn_of_rankme_pick']:.2f} %), last {result['knn_of_last']:.2f} %, "
              f"best {result['knn_best']:.2f} %", flush=True)
    met = all(r["spearman_rankme_knn"] >= TARGET_RHO for r in results)
    print(f"\n{'PASS' if met else 'FAIL'}: Spearman rho >= {TARGET_RHO} on every data set "
          f"({', '.join(str(r['spearman_rankme_knn']) for r in results)})")
    for result in results:  # one file per data set: the data sets may run as separate processes
        write_result(f"checkpoint_signal_{result['data']}", {
            "environment": environment(), "command": "python benchmarks/bench_checkpoint_signal.py " + " ".join(sys.argv[1:]),
            "target_rho": TARGET_RHO, "met": result["spearman_rankme_knn"] >= TARGET_RHO, "result": result})
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
