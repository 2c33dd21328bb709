"""Data wait: the fraction of each training step spent blocked on the DataLoader, as swavkit logs it.

    .venv/bin/python benchmarks/bench_data_wait.py [--epochs 2] [--no-variants]

Runs the default CPU recipe exactly as a user would (the quickstart preset, swavkit/presets/quickstart.yaml:
bundled Fashion-MNIST sample, resnet10t, batch 128, 2 workers):

    python -m swavkit pretrain --no-progress --restart train.epochs=2 out_dir=benchmarks/_work/dw

and reads ``data_wait_fraction`` and ``images_per_s`` from its metrics.jsonl (one row per 5 steps).
The first row includes worker start-up; "steady state" = the later rows.
Target (ours; issue 5 asks only that the pipeline keep the model fed and that the number be reported):
steady-state median data_wait_fraction <= 0.10.

Informational run (skipped with --no-variants): the same command with OMP_NUM_THREADS=1 (one compute
thread, so the 2 workers and the model do not oversubscribe the 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (PYTHON, REPO_ROOT, WORK_DIR, Verdicts, environment, invocation, markdown_table,  # noqa: E402
                     report, stats)

TARGET = 0.10


def run_pretrain(out_dir: Path, epochs: int, threads: int | None) -> tuple[list[dict], float, str]:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    overrides = [f"train.epochs={epochs}", f"out_dir={out_dir.relative_to(REPO_ROOT)}"]
    command = [PYTHON, "-m", "swavkit", "pretrain", "--no-progress", "--restart", *overrides]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"{' '.join(command)} failed with exit code {proc.returncode}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "data_wait_fraction" in r or "images_per_s" in r]
    shown = (f"OMP_NUM_THREADS={threads} " if threads else "") + " ".join(["python"] + command[1:])
    return rows, wall, shown


def summarise(rows: list[dict]) -> dict:
    steady = rows[1:] if len(rows) > 1 else rows
    return {"rows": len(rows),
            "data_wait_fraction_all": stats([r["data_wait_fraction"] for r in rows]),
            "data_wait_fraction_steady": stats([r["data_wait_fraction"] for r in steady]),
            "images_per_s_steady": stats([r["images_per_s"] for r in steady], 2),
            "per_row": [{k: r.get(k) for k in ("step", "data_wait_fraction", "images_per_s", "loss")} for r in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-variants", action="store_true", help="only the judged default run")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    env = environment()
    verdicts, results, table_rows = Verdicts(), {}, []
    runs = [("library", None)]
    if not args.no_variants:
        runs += [("library_1_thread", 1)]
    labels = {"library": "swavkit (library), torch default threads",
              "library_1_thread": "swavkit (library), OMP_NUM_THREADS=1 (informational)"}
    commands = {}
    for name, threads in runs:
        print(f"pretrain ({name}) ...", flush=True)
        rows, wall, command = run_pretrain(WORK_DIR / f"dw_{name}" if name != "library" else WORK_DIR / "dw",
                                           args.epochs, threads)
        missing = [r.get("step") for r in rows if "data_wait_fraction" not in r]
        if name == "library":
            verdicts.check("metrics.jsonl has data_wait_fraction in every logging row", not missing and bool(rows),
                           "present", not missing and bool(rows))
        s = summarise(rows)
        s.update(wall_s=round(wall, 1), command=command)
        results[name] = s
        commands[name] = command
        dw, ips = s["data_wait_fraction_steady"], s["images_per_s_steady"]
        table_rows.append([labels[name], f"{dw['median']:.3f} ({dw['min']:.3f}..{dw['max']:.3f})",
                           f"{s['data_wait_fraction_all']['median']:.3f}",
                           f"{ips['median']:.1f} ({ips['min']:.1f}..{ips['max']:.1f})", s["rows"], f"{wall:.0f}"])
        if name == "library":
            verdicts.check("quickstart recipe: steady-state data_wait_fraction (median of logged windows)",
                           dw["median"], f"<= {TARGET} (ours)", dw["median"] <= TARGET)
            verdicts.info("quickstart recipe: steady-state images/s", ips["median"])
        else:
            verdicts.info(f"{labels[name]}: steady-state data_wait_fraction", dw["median"])
            verdicts.info(f"{labels[name]}: steady-state images/s", ips["median"])
    from swavkit.api import quickstart_config_path
    from swavkit.config import load_config

    qs = load_config([quickstart_config_path()])
    crops_txt = " + ".join(f"{c}x{s}" for c, s in zip(qs.crops.counts, qs.crops.sizes_px))
    tables = (f"Quickstart recipe (bundled Fashion-MNIST sample, 2,000 images 28x28; {qs.model.backbone}; batch "
              f"{qs.train.batch_size}; crops {crops_txt}; {qs.data.num_workers} workers; fp32 CPU), {args.epochs} "
              f"epochs, metrics every {qs.train.log_every_steps} steps:\n\n"
              + markdown_table(["pipeline", "data_wait_fraction, steady (median, min..max)", "all rows (median)",
                                "images/s, steady", "logged rows", "wall s"], table_rows)
              + "\n\nCommands: `" + "`; `".join(commands.values()) + "`")
    protocol = ("data_wait_fraction = time blocked in `next(batches)` / wall time of the logging window, as "
                "train.py logs it; on 2 cores the 2 workers and the 2 compute threads share the same cores.")
    return report("data_wait", "Data wait (default CPU recipe)", invocation(__file__),
                  protocol, tables, verdicts, env, {"results": results}, write_readme=not args.no_readme)


if __name__ == "__main__":
    sys.exit(main())
