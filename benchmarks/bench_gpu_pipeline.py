"""GPU data pipeline (issue 16, "SEER scale"): does `swavkit pretrain` feed one GPU as fast as the bare
backbone can train?

    python benchmarks/bench_gpu_pipeline.py                 # a CUDA GPU; ~5-8 min on an H200 with 16 cores
    python benchmarks/bench_gpu_pipeline.py --dry-run       # CPU, tiny sizes: checks the script end to end (<2 min)

1. Makes --images ImageNet-like JPEGs (500 x 375 px, ~110 KB: smooth random colour fields, noise and
   rectangle edges, Pillow quality 90) in --work-dir, and tar shards of them with swavkit's own
   `swavkit shard` code (swavkit.data.shard_writer.write_shards).
2. The bare step: the same timm resnet50 alone (benchmarks/_arms.py BareBackboneStep: grouped forward
   of the paper crops 2x224 + 6x96, trivial loss, backward, LARS) at the same per-GPU batch, bf16 autocast,
   channels_last, CUDA-synchronised timing on random crops already on the GPU - no data at all. Also the
   full swavkit step on the same crops (SwavkitStep, what train.py runs per batch), to tell the step's
   own cost from the data pipeline's.
3. End to end: `swavkit pretrain --config configs/imagenet_resnet50.yaml` (bf16, one process, no launcher)
   for --warmup-steps + --steps steps on each source, images/s from metrics.jsonl (median over the logging
   windows after the warm-up steps):
     folder, PIL decode in the workers      data.decode_on_device=false (colour ops on the GPU: auto)
     folder, JPEG decode on the GPU          data.decode_on_device=true (nvJPEG, crops cut on the GPU)
     shards, PIL decode in the workers      data.path=shards/shard-*.tar
     shards, JPEG decode on the GPU          both
Target: the best end-to-end arm >= 95 % of the bare step's images/s (the pipeline, Sinkhorn and the head
together cost at most 5 %). Writes benchmarks/results/gpu_pipeline_<gpu>.json; exit 1 when the target is
missed, 2 without a GPU (unless --dry-run).

--dry-run runs the same stages on the CPU with tiny sizes (resnet10t, 2x32 + 2x16 crops, 48 small JPEGs,
batch 8, a few steps): it checks that the script works, it measures nothing; its JSON goes to the work
folder, not to results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _arms import BareBackboneStep, SwavkitStep, make_crops  # noqa: E402
from _common import PYTHON, REPO_ROOT, Verdicts, environment, markdown_table, report  # noqa: E402

TARGET = 0.95  # end-to-end images/s over the bare step's
ARMS = {  # name -> (source, data.decode_on_device)
    "folder_pil_workers": ("folder", "false"),
    "folder_decode_on_gpu": ("folder", "true"),
    "shards_pil_workers": ("shards", "false"),
    "shards_decode_on_gpu": ("shards", "true"),
}
PAPER = dict(backbone="resnet50", counts=[2, 6], sizes=[224, 96], K=3000, hidden=2048, out=128)
TINY = dict(backbone="resnet10t", counts=[2, 2], sizes=[32, 16], K=10, hidden=32, out=16)
TINY_OVERRIDES = ["model.backbone=resnet10t", "model.hidden_dim=32", "model.output_dim=16", "model.n_prototypes=10",
                  "crops.counts=[2,2]", "crops.sizes_px=[32,16]", "crops.min_scales=[0.5,0.2]",
                  "crops.max_scales=[1.0,0.5]", "train.device=cpu", "train.precision=fp32"]


# ----------------------------------------------------------------------------------------------------
# data

def _one_jpeg(job) -> int:
    """One ImageNet-like JPEG; returns its size in bytes."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, seed, width, height = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-36, 37, (height, width, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # sharp edges, as objects have
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.rectangle([x, y, x + int(rng.integers(10, 150)), y + int(rng.integers(10, 150))],
                       outline=tuple(int(v) for v in rng.integers(0, 256, 3)), width=3)
    image.save(path, quality=90)
    return os.path.getsize(path)


def make_data(work: Path, n: int, width: int, height: int, workers: int) -> tuple[Path, Path, dict]:
    """-> (JPEG folder, shard folder, what was made). Reuses a complete earlier folder."""
    from swavkit.data.shard_writer import write_shards

    folder, shards = work / f"jpegs_{n}_{width}x{height}", work / f"shards_{n}_{width}x{height}"
    start = time.perf_counter()
    jobs = [(folder / f"part{i % 8}" / f"{i:06d}.jpg", i, width, height) for i in range(n)]
    if len(list(folder.rglob("*.jpg"))) != n:
        for i in range(8):
            (folder / f"part{i}").mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(_one_jpeg, jobs, chunksize=32))
    sizes = [os.path.getsize(job[0]) for job in jobs]
    made_s = time.perf_counter() - start
    start = time.perf_counter()
    # 4 shards per data worker, so every worker has shards of its own and they end together
    per_shard = max(1, n // (4 * max(1, workers)))
    if not (shards / "shards.json").is_file():
        write_shards(str(folder), shards, per_shard, progress=False)
    info = {"images": n, "width_px": width, "height_px": height, "mean_kb": round(statistics.mean(sizes) / 1e3, 1),
            "jpegs_s": round(made_s, 1), "shards_s": round(time.perf_counter() - start, 1),
            "images_per_shard": per_shard, "shards": len(list(shards.glob("shard-*.tar")))}
    print(f"data: {info}", flush=True)
    return folder, shards, info


# ----------------------------------------------------------------------------------------------------
# the bare step (no data)

def time_steps(step, crops, n: int, device: torch.device) -> float:
    """Seconds per call of ``step(crops)`` over ``n`` calls, synchronised on a GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step(crops)
    sync()
    return (time.perf_counter() - start) / n


def bare_steps(args, cfg: dict, device: torch.device) -> dict:
    """images/s of the bare backbone step and of the swavkit step, interleaved repetitions, medians."""
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else None
    crops = make_crops(args.batch, cfg["counts"], cfg["sizes"], device=device,
                       memory_format=torch.channels_last if on_gpu else torch.contiguous_format)
    arms = {"bare": BareBackboneStep(cfg["backbone"], dtype, channels_last=on_gpu, device=device),
            "swavkit_step": SwavkitStep(cfg["backbone"], cfg["K"], cfg["hidden"], cfg["out"], dtype,
                                        channels_last=on_gpu, device=device)}
    for step in arms.values():
        time_steps(step, crops, args.bare_warmup, device)
    seconds = {name: [] for name in arms}
    for rep in range(args.bare_reps):
        for name in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            seconds[name].append(time_steps(arms[name], crops, args.bare_steps, device))
    result = {f"{name}_images_per_s": round(args.batch / statistics.median(s), 1) for name, s in seconds.items()}
    result["seconds_per_step"] = {name: [round(x, 5) for x in s] for name, s in seconds.items()}
    print(f"bare: {result}", flush=True)
    del arms, crops
    if on_gpu:
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------
# end to end

def pretrain_run(args, source: Path, out_dir: Path, decode: str, steps_per_epoch: int, extra: list[str]) -> dict:
    """One `swavkit pretrain` -> exit code, banner, images/s and data-wait medians after the warm-up steps."""
    epochs = -(-(args.warmup_steps + args.steps) // steps_per_epoch)
    overrides = [f"data.path={source}", f"out_dir={out_dir}", f"train.batch_size={args.batch}",
                 f"train.epochs={epochs}", f"data.num_workers={args.workers}", f"train.log_every_steps={args.log_every}",
                 "optim.warmup_epochs=0", "model.sync_batchnorm=none", f"data.decode_on_device={decode}", *extra]
    command = [PYTHON, "-m", "swavkit", "pretrain", "--config", "configs/imagenet_resnet50.yaml", "--restart",
               "--no-progress", *overrides]
    print("  " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.run_timeout)
    except subprocess.TimeoutExpired as expired:  # keep what it logged; the other arms still get their turn
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        err = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        proc = subprocess.CompletedProcess(command, 124, out, err)
    run = {"command": " ".join(command[1:]), "returncode": proc.returncode,
           "wall_s": round(time.perf_counter() - start, 1),
           "banner": next((line for line in proc.stdout.splitlines() if line.startswith("data:")), ""),
           "stderr_tail": proc.stderr.strip().splitlines()[-3:] if proc.returncode else []}
    metrics = out_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steady = [r for r in rows if "images_per_s" in r and r["step"] > args.warmup_steps]
    run["windows"] = [{k: r.get(k) for k in ("step", "images_per_s", "data_wait_fraction")} for r in rows]
    if steady:
        run["images_per_s_median"] = round(statistics.median(r["images_per_s"] for r in steady), 1)
        run["data_wait_fraction_median"] = round(statistics.median(r["data_wait_fraction"] for r in steady), 3)
    print(f"  -> exit {proc.returncode}, {run.get('images_per_s_median')} images/s, data wait "
          f"{run.get('data_wait_fraction_median')}, {run['wall_s']} s" + (f"\n{proc.stderr[-1500:]}" if proc.returncode else ""),
          flush=True)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # ours, and ~300 MB per resnet50 run
    return run


def gpu_tag() -> str:
    """'NVIDIA H200' -> 'h200' (one result file per GPU kind)."""
    name = torch.cuda.get_device_name(0)
    found = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", name)
    return (found.group(1) if found else re.sub(r"\W+", "_", name)).lower()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script, measure nothing")
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=64, help="per-GPU batch (the paper: 4096 over 64 GPUs)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--steps", type=int, default=80, help="timed steps per end-to-end run, after the warm-up")
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--bare-steps", type=int, default=20, help="steps per timed repetition of the bare step")
    parser.add_argument("--bare-reps", type=int, default=5)
    parser.add_argument("--bare-warmup", type=int, default=15)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--run-timeout", type=float, default=100, help="seconds allowed to each pretrain run")
    parser.add_argument("--work-dir", default="/tmp/swavkit_gpu_pipeline")
    args = parser.parse_args()
    if args.dry_run:
        args.images, args.batch, args.workers = 48, 8, min(args.workers, 2)
        args.steps, args.warmup_steps, args.log_every = 4, 2, 2
        args.bare_steps, args.bare_reps, args.bare_warmup, args.run_timeout = 2, 2, 1, 100
        device, cfg, size, extra = torch.device("cpu"), TINY, (96, 72), TINY_OVERRIDES
    else:
        if not torch.cuda.is_available():
            print("ERROR: bench_gpu_pipeline.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
            return 2
        device, cfg, size, extra = torch.device("cuda"), PAPER, (500, 375), []
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env, verdicts = environment(), Verdicts()
    folder, shards, data_info = make_data(work, args.images, *size, args.workers)
    bare = bare_steps(args, cfg, device)
    runs = {}
    for name in args.arms.split(","):
        source, decode = ARMS[name]
        runs[name] = pretrain_run(args, folder if source == "folder" else shards / "shard-*.tar",
                                  work / "runs" / name, decode, args.images // args.batch, extra)
        verdicts.check(f"{name}: swavkit pretrain exit code", runs[name]["returncode"], "0", runs[name]["returncode"] == 0)
    bare_ips = bare["bare_images_per_s"]
    rows = [["bare backbone step (no data)", bare_ips, "1.000", "-"],
            ["swavkit step (no data)", bare["swavkit_step_images_per_s"],
             f"{bare['swavkit_step_images_per_s'] / bare_ips:.3f}", "-"]]
    for name, run in runs.items():
        ips = run.get("images_per_s_median")
        run["fraction_of_bare"] = round(ips / bare_ips, 3) if ips else None
        rows.append([name, ips or "-", run["fraction_of_bare"] or "-", run.get("data_wait_fraction_median", "-")])
    measured = [r["fraction_of_bare"] for r in runs.values() if r["fraction_of_bare"]]
    best = max(measured) if measured else 0.0
    if args.dry_run:
        verdicts.info("best end-to-end / bare step (dry run on a CPU: not judged)", best)
    else:
        verdicts.check("best end-to-end images/s / bare step images/s", best, f">= {TARGET}", best >= TARGET)
    table = markdown_table(["arm", "images/s", "/ bare step", "data-wait fraction"], rows)
    payload = {"args": vars(args), "data": data_info, "bare": bare, "runs": runs}
    if args.dry_run:
        out = work / "gpu_pipeline_dryrun.json"
        out.write_text(json.dumps({"environment": env, "targets": verdicts.items, **payload}, indent=2, default=str))
        print(f"\n{table}\n\ndry run: wrote {out} (not a measurement)")
        return 0 if verdicts.exit_code == 0 else 1
    protocol = (f"resnet50, crops 2x224 + 6x96, per-GPU batch {args.batch}, bf16, channels_last, one process; "
                f"{args.images} synthetic {size[0]}x{size[1]} JPEGs (mean {data_info['mean_kb']} KB), "
                f"{args.workers} data workers; end-to-end images/s = median of metrics.jsonl windows after step "
                f"{args.warmup_steps}; bare step = benchmarks/_arms.py BareBackboneStep on crops already on the GPU.")
    return report(f"gpu_pipeline_{gpu_tag()}", "GPU data pipeline: end to end vs the bare step",
                  "python benchmarks/bench_gpu_pipeline.py", protocol, table, verdicts, env, payload,
                  write_readme=False)


if __name__ == "__main__":
    sys.exit(main())
