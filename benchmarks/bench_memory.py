"""Host memory: peak RSS of a ResNet-50 paper-crop step loop, and RSS over ~500 real training steps.

    .venv/bin/python benchmarks/bench_memory.py [--peak-steps 2] [--leak-epochs 9] [--skip-peak]

1. Peak RSS (fresh subprocess per arm, so each peak is its own): resnet50, crops 2x224 + 6x96, batch 32,
   K 3000, fp32 CPU, --peak-steps steps of the library's step (swavkit.training.step.train_step), and the same for the
   bare backbone (grouped forward, trivial loss, LARS). Target (ours; issue 5 names none): the SwAV
   step needs at most 10% more than the backbone alone.
2. No growth: ``swavkit.training.trainer`` itself (resnet10t, crops 2x32 + 2x16, batch 32, the bundled sample,
   2 workers, queue on from epoch 1, checkpoint every epoch, metrics every 10 steps) for ~560 steps in a
   subprocess; the main process's RSS is read at every step (a counting wrapper around the loss
   function, installed by this script; the library is not modified) and the workers' RSS alongside.
   Slope = least-squares fit over the steps after the first 100 (allocator warm-up, queue filling).
   Target (ours): growth <= 4 MiB per 100 steps in the main process (a leak of one crop batch per step
   would be ~100 MiB per 100 steps).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (PYTHON, WORK_DIR, Verdicts, add_threads_argument, apply_threads, environment,  # noqa: E402
                     invocation, markdown_table, peak_rss_mb, report, rss_mb)

PEAK_TARGET = 1.10
SLOPE_TARGET_MIB_PER_100 = 4.0
PEAK_CFG = dict(backbone="resnet50", batch=32, counts=[2, 6], sizes=[224, 96], K=3000)


# ----------------------------------------------------------------------------------------------------
# children (run in a fresh interpreter)

def child_peak(arm: str, steps: int) -> dict:
    import torch

    from _arms import BareBackboneStep, SwavkitStep, make_crops

    c = PEAK_CFG
    base = rss_mb()
    step = SwavkitStep(c["backbone"], c["K"]) if arm == "swavkit" else BareBackboneStep(c["backbone"])
    crops = make_crops(c["batch"], c["counts"], c["sizes"])
    after_build = rss_mb()
    per_step = []
    for _ in range(steps):
        start = time.perf_counter()
        step(crops)
        per_step.append({"seconds": round(time.perf_counter() - start, 2), "rss_mib": round(rss_mb(), 1),
                         "peak_rss_mib": round(peak_rss_mb(), 1)})
    return {"arm": arm, "torch_threads": torch.get_num_threads(), "rss_at_start_mib": round(base, 1),
            "rss_after_model_and_crops_mib": round(after_build, 1), "steps": per_step,
            "peak_rss_mib": round(peak_rss_mb(), 1)}


def _children_rss_mib() -> float:
    total = 0.0
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as handle:
                for pid in handle.read().split():
                    try:
                        total += rss_mb(pid)
                    except OSError:
                        pass
    except OSError:
        return float("nan")
    return total


def child_leak(epochs: int, out_dir: str) -> dict:
    step_module = importlib.import_module("swavkit.training.step")
    train_module = importlib.import_module("swavkit.training.trainer")  # the module (swavkit.train is the function)
    from swavkit.config import load_config

    records = []
    original = step_module.swapped_prediction_loss
    start = time.perf_counter()

    def counting_loss(*args, **kwargs):  # one call per training step
        records.append((len(records), round(rss_mb(), 2), round(_children_rss_mib(), 2),
                        round(time.perf_counter() - start, 3)))
        return original(*args, **kwargs)

    step_module.swapped_prediction_loss = counting_loss
    cfg = load_config([str(Path(__file__).resolve().parent / "memory_leak_config.yaml")],
                      [f"train.epochs={epochs}", f"out_dir={out_dir}"])
    result = train_module.train(cfg, restart=True, progress=False)
    return {"steps": result.step, "final_loss": result.final_loss, "records": records,
            "peak_rss_mib": round(peak_rss_mb(), 1)}


def run_child(args: list[str], threads: int, timeout: float) -> dict:
    proc = subprocess.run([PYTHON, __file__, "--threads", str(threads), "--child", *args], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"child {args} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")


# ----------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-steps", type=int, default=2, help="steps per peak-RSS arm (2: the second has "
                        "momentum buffers allocated during backward, the steady-state peak)")
    parser.add_argument("--leak-epochs", type=int, default=9, help="epochs of 62 steps on the bundled sample")
    parser.add_argument("--skip-peak", action="store_true")
    parser.add_argument("--no-readme", action="store_true")
    add_threads_argument(parser)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    apply_threads(args.threads)
    if args.child:
        kind = args.child[0]
        out = child_peak(args.child[1], int(args.child[2])) if kind == "peak" else child_leak(int(args.child[1]), args.child[2])
        print(json.dumps(out))
        return 0

    env = environment()
    verdicts, results, tables = Verdicts(), {}, []
    if not args.skip_peak:
        peaks = {}
        for arm in ("bare", "swavkit"):
            print(f"peak RSS: {arm} ({args.peak_steps} steps of resnet50 batch 32 paper crops) ...", flush=True)
            peaks[arm] = run_child(["peak", arm, str(args.peak_steps)], args.threads, timeout=1800)
            print(f"  {peaks[arm]['peak_rss_mib']} MiB peak, steps {peaks[arm]['steps']}", flush=True)
        ratio = peaks["swavkit"]["peak_rss_mib"] / peaks["bare"]["peak_rss_mib"]
        results["peak"] = {"config": PEAK_CFG, "arms": peaks, "ratio_swavkit_over_bare": round(ratio, 3)}
        c = PEAK_CFG
        rows = [[arm, p["rss_after_model_and_crops_mib"], p["peak_rss_mib"],
                 " / ".join(str(s["seconds"]) for s in p["steps"])] for arm, p in peaks.items()]
        tables.append(f"**Peak RSS** - {c['backbone']}, batch {c['batch']}, crops 2x224 + 6x96, K {c['K']}, fp32 CPU, "
                      f"{args.peak_steps} steps, each arm in a fresh process (ru_maxrss):\n\n"
                      + markdown_table(["arm", "RSS after model + crops (MiB)", "peak RSS (MiB)", "seconds per step"], rows)
                      + f"\n\nswavkit peak / bare-backbone peak = **{ratio:.3f}**.")
        verdicts.check("peak RSS, resnet50 batch 32 paper crops: swavkit step / bare backbone step", round(ratio, 3),
                       f"<= {PEAK_TARGET} (ours)", ratio <= PEAK_TARGET)
        verdicts.info("peak RSS of the swavkit step, MiB", peaks["swavkit"]["peak_rss_mib"])

    print(f"RSS over training steps: swavkit.training.trainer, {args.leak_epochs} epochs ...", flush=True)
    started = time.perf_counter()
    leak = run_child(["leak", str(args.leak_epochs), str(WORK_DIR / "memory_leak_run")], args.threads, timeout=1800)
    wall = time.perf_counter() - started
    records = leak["records"]
    steps = [r[0] for r in records]
    main_rss = [r[1] for r in records]
    child_rss = [r[2] for r in records]
    tail = [i for i, s in enumerate(steps) if s >= 100]
    slope_main = 100 * fit_slope([steps[i] for i in tail], [main_rss[i] for i in tail])
    slope_children = 100 * fit_slope([steps[i] for i in tail], [child_rss[i] for i in tail])
    checkpoints = [0, 100, 200, 300, 400, len(steps) - 1]
    rows = [[steps[i], main_rss[i], child_rss[i]] for i in checkpoints if i < len(steps)]
    results["leak"] = {"steps": leak["steps"], "wall_s": round(wall, 1), "final_loss": leak["final_loss"],
                       "slope_main_mib_per_100_steps": round(slope_main, 3),
                       "slope_workers_mib_per_100_steps": round(slope_children, 3),
                       "rss_main_mib": {"step_100": main_rss[min(100, len(main_rss) - 1)], "last": main_rss[-1],
                                        "max": max(main_rss), "min_after_100": min(main_rss[i] for i in tail)},
                       "peak_rss_main_mib": leak["peak_rss_mib"],
                       "per_step": {"step": steps, "rss_main_mib": main_rss, "rss_workers_mib": child_rss}}
    tables.append(f"**RSS over {leak['steps']} training steps** - `swavkit.training.trainer` with "
                  "`benchmarks/memory_leak_config.yaml` (resnet10t, crops 2x32 + 2x16, batch 32, bundled sample, "
                  f"2 workers, queue from epoch 1, checkpoint each epoch), {wall:.0f} s; RSS read at every step:\n\n"
                  + markdown_table(["step", "main process RSS (MiB)", "workers RSS, sum (MiB)"], rows)
                  + f"\n\nLeast-squares slope over steps >= 100: main process **{slope_main:+.2f} MiB per 100 "
                    f"steps**, workers {slope_children:+.2f} MiB per 100 steps.")
    verdicts.check("RSS slope of the training process over steps >= 100 (MiB per 100 steps)", round(slope_main, 3),
                   f"<= {SLOPE_TARGET_MIB_PER_100} (ours)", slope_main <= SLOPE_TARGET_MIB_PER_100)
    verdicts.info("RSS slope of the data workers (MiB per 100 steps)", round(slope_children, 3))
    protocol = ("RSS = resident set size from /proc (MiB); peak = getrusage ru_maxrss of a fresh process. Memory "
                "numbers do not depend on the machine's load, unlike the timings.")
    return report("memory", "Host memory", invocation(__file__),
                  protocol, "\n\n".join(tables), verdicts, env, {"results": results}, write_readme=not args.no_readme)


if __name__ == "__main__":
    sys.exit(main())
