"""Issue 29 (point 4): does ``--auto --budget`` print the run it then plans?

Runs ``swavkit pretrain --auto --budget <budget> data.path=<folder>`` as a user would (one process, CPU), reads
what --auto printed (``train.epochs = N``: the passes the budget affords at the measured speed, and the warm-up
it derived) and what the run then planned (the ``budget ... -> S steps = E epochs; warm-up W steps`` line) and
did (``budget: S steps`` at the end).

Target: the printed epochs within 25 % of the planned ones (exit 1 when missed). ``--code DIR`` runs another
checkout (e.g. main, unpacked with ``git archive``) for the before/after comparison.

    python benchmarks/bench_auto_budget_plan.py --folder DIR --budget 240s [--code /tmp/main-checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from swavkit.cli.args import parse_duration_minutes  # the --budget syntax, read as swavkit reads it

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_FRACTION = 0.25


def write_folder(root: Path, n: int, size_px: int) -> Path:
    """``n`` random RGB PNGs of ``size_px`` (two colour groups), when ``root`` holds none yet."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"img{i:04d}.png"
        if not path.exists():
            base = np.zeros((size_px, size_px, 3), dtype=np.float32)
            base[..., i % 2] = 200
            Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)).save(path)
    return root


def run(code: Path, folder: Path, budget: str, out_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-c", "import sys; from swavkit.cli.main import main; sys.exit(main())", "pretrain",
           "--auto", "--budget", budget, f"data.path={folder}", f"out_dir={out_dir}", "--no-progress",
           "train.signal_images=0", "train.log_every_steps=5"]
    done_run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code)
    text = done_run.stdout
    if done_run.returncode != 0:
        raise SystemExit(f"the run exited {done_run.returncode}:\n{(text + done_run.stderr)[-3000:]}")
    printed = re.search(r"train\.epochs = (\d+)", text)
    warmup = re.search(r"optim\.warmup_epochs = ([\d.]+)", text)
    plan = re.search(r"budget [\d.]+ min: .* -> (\d+) steps = ([\d.]+) epochs; warm-up (\d+) steps", text)
    per_epoch = re.search(r"(\d+) steps/epoch", text)
    done = re.search(r"budget: (\d+) steps, ([\d.]+) of", text)
    if not (printed and plan and per_epoch and done):
        raise SystemExit(f"could not read the run's output:\n{text[-3000:]}")
    steps_per_epoch = int(per_epoch.group(1))
    result = {"printed_epochs": int(printed.group(1)), "planned_epochs": float(plan.group(2)),
              "planned_steps": int(plan.group(1)), "done_steps": int(done.group(1)),
              "done_epochs": round(int(done.group(1)) / steps_per_epoch, 2), "minutes_used": float(done.group(2)),
              "printed_warmup_epochs": float(warmup.group(1)) if warmup else None,
              "planned_warmup_epochs": round(int(plan.group(3)) / steps_per_epoch, 2)}
    result["printed_over_planned"] = round(result["printed_epochs"] / result["planned_epochs"], 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="images to pretrain on (default: 400 random 96 px PNGs)")
    parser.add_argument("--budget", default="240s")
    parser.add_argument("--code", type=Path, default=REPO_ROOT, help="the checkout to run (default: this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-auto-plan-") as tmp:
        folder = args.folder or write_folder(Path(tmp) / "images", 400, 96)
        result = run(args.code.resolve(), folder.resolve(), args.budget, Path(tmp) / "run")
    # and the run kept to its budget (5 % over at most: the final checkpoint and the export)
    met = (abs(result["printed_epochs"] - result["planned_epochs"]) <= TARGET_FRACTION * result["planned_epochs"]
           and result["minutes_used"] <= 1.05 * parse_duration_minutes(args.budget))
    print(json.dumps({"code": str(args.code), "budget": args.budget, **result,
                      "target": "printed epochs within 25 % of the planned ones, budget kept (+5 %)",
                      "met": met}, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
