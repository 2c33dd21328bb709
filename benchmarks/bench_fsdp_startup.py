"""Start-up memory under dist.strategy=fsdp: no process may hold the whole model (issue 30, point 3).

    .venv/bin/python benchmarks/bench_fsdp_startup.py [--backbone regnety_640] [--reps 3]

Two arms, each in fresh processes (ru_maxrss is a per-process high-water mark), alternated whole, fsdp, whole,
fsdp ...: "whole" builds the SwAV model in one plain process (dist.strategy=ddp: what every process did before
this change, FSDP included); "fsdp" runs 2 gloo processes on this CPU through the same trainer function
(swavkit.training.trainer._build_model: meta build, fully_shard, to_empty, timm's initialisation replayed into
each process's shards). Measured per process: the peak RSS (ru_maxrss) at the end of the model build, and the
RSS after the imports, before any model exists.
Target: peak RSS per fsdp process <= 0.6x the whole build's peak RSS (medians over repetitions).
Why regnety_640 (281 M parameters, 1.1 GB fp32) and not regnety_2560 (5 GB a copy): the machine is shared by 8
engineers in 24 GB and each process should stay under ~3 GB; the whole arm of regnety_640 peaks near 1.8 GB.
The RSS of the imports (swavkit's trainer with torch and timm: ~0.7 GB, the same in both arms) weighs more here
than at SEER's size, so the ratio above the imports is printed beside the target's (absolute) one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_RATIO = 0.6


def _worker(arm: str, backbone: str) -> None:
    """One process of an arm: build the model as the trainer does, print {rss_imports_mb, peak_rss_mb}."""
    import torch

    from _common import peak_rss_mb, rss_mb
    from swavkit.config import load_config
    from swavkit.runtime import distributed
    from swavkit.training.processes import Processes
    from swavkit.training.trainer import _build_model

    torch.set_num_threads(1)
    imports_mb = rss_mb()
    cfg = load_config([], [f"model.backbone={backbone}", f"dist.strategy={'fsdp' if arm == 'fsdp' else 'ddp'}",
                           "train.device=cpu", "train.precision=fp32"])
    device = torch.device("cpu")
    if arm == "fsdp":
        distributed.init("cpu")
    procs = Processes(device, distributed.world_size(), distributed.rank(), distributed.is_main_process(),
                      distributed.world_size(), "fp32", False, False, sharded=arm == "fsdp")
    core, _, _ = _build_model(cfg, procs, fresh=True)
    n_params = sum(p.numel() for p in core.parameters())
    print(json.dumps({"rss_imports_mb": imports_mb, "peak_rss_mb": peak_rss_mb(), "parameters": n_params}),
          flush=True)
    if arm == "fsdp":
        distributed.shutdown()


def _run_arm(arm: str, backbone: str, port: int) -> list[dict]:
    script = str(Path(__file__).resolve())
    world = 2 if arm == "fsdp" else 1
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if arm == "fsdp":
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                       LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, script, "--worker", arm, "--backbone", backbone],
                                      env=env, stdout=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{arm} process exited with {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="regnety_640")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", choices=("whole", "fsdp"))
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.backbone)
        sys.exit(0)
    from _common import Verdicts, environment, fmt_spread, invocation, markdown_table, report, stats
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    env = environment()
    runs: dict[str, list[dict]] = {"whole": [], "fsdp": []}
    for rep in range(args.reps):
        for arm in ("whole", "fsdp"):
            runs[arm] += _run_arm(arm, args.backbone, free_port())
            print(f"rep {rep + 1}/{args.reps} {arm}: " + ", ".join(f"peak {r['peak_rss_mb']:.0f} MiB (imports "
                                                                    f"{r['rss_imports_mb']:.0f})" for r in runs[arm][-2 if arm == 'fsdp' else -1:]),
                  flush=True)
    peak = {arm: [r["peak_rss_mb"] for r in rows] for arm, rows in runs.items()}
    above = {arm: [r["peak_rss_mb"] - r["rss_imports_mb"] for r in rows] for arm, rows in runs.items()}
    ratio = statistics.median(peak["fsdp"]) / statistics.median(peak["whole"])
    ratio_above = statistics.median(above["fsdp"]) / statistics.median(above["whole"])
    verdicts = Verdicts()
    verdicts.check("peak RSS per fsdp process / whole build's peak RSS", round(ratio, 3), f"<= {TARGET_RATIO}",
                   ratio <= TARGET_RATIO)
    imports_mb = statistics.median(r["rss_imports_mb"] for rows in runs.values() for r in rows)
    verdicts.info("the same above the imports' RSS", round(ratio_above, 3),
                  f"informational: the imports ({imports_mb:.0f} MiB, the same in both arms) weigh less at SEER's "
                  "size; with N processes the model part falls towards 1/N")
    n_params = runs["whole"][0]["parameters"]
    rows = [[arm, len(peak[arm]), fmt_spread(stats(peak[arm]), " MiB", 4), fmt_spread(stats(above[arm]), " MiB", 4)]
            for arm in ("whole", "fsdp")]
    tables = markdown_table(["arm", "processes measured", "peak RSS", "peak RSS above the imports"], rows)
    protocol = (f"`{args.backbone}` ({n_params / 1e6:.0f} M parameters with the default SwAV head, "
                f"{n_params * 4 / 2**30:.2f} GiB fp32), model build only (swavkit.training.trainer._build_model, "
                f"fp32, CPU). whole: one plain process (dist.strategy=ddp); fsdp: 2 gloo processes "
                f"(meta build -> fully_shard -> to_empty -> timm's init replayed into the shards). {args.reps} "
                "repetitions, arms alternated, fresh processes each; medians, spread (min..max).")
    sys.exit(report("fsdp_startup", "FSDP start-up memory: no process holds the whole model (issue 30)",
                    invocation(__file__),
                    protocol, tables, verdicts, env, {"runs": runs}, write_readme=not args.no_readme,
                    heading="## FSDP start-up memory (issue 30)"))
