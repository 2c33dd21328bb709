"""Where the colour half of multi-crop runs: in the DataLoader workers, or on the training device.

    .venv/bin/python benchmarks/bench_colour_offload.py [--workers 2] [--images 1024] [--reps 3]

The GPU check (bench_gpu.py, H100) found `swavkit pretrain` with the paper recipe data-bound: 14 workers
delivered ~260 images/s while the model could take 530-630. `data.colour_on_device=true` leaves the
workers only decoding, cutting and resizing (``MultiCropTransform.collate_pixels``); the training process
applies jitter, grayscale, blur and normalisation batched on its device (``finish``). This CPU benchmark
measures the worker half of that trade, on synthetic ImageNet-sized JPEGs (448x336) with the paper recipe
(2x224 + 6x96, blur p 0.5), batch 64:

  workers_colour  DataLoader with collate (colour in the workers, float views out), the default;
  workers_pixels  DataLoader with collate_pixels (uint8 crops + parameters out).

Both arms: fresh DataLoader per repetition, 1 + workers untimed batches, then >= --seconds timed,
interleaved. Also: what ``finish`` costs per batch on THIS CPU at 1 thread (what a CPU-only run would pay
in the training process; on a GPU it is device work, not measured here), and that the two routes give
identical views. The GPU side is measured by bench_gpu.py --parts e2e (both settings).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from _common import (WORK_DIR, Verdicts, environment, fmt_spread, interleaved, markdown_table,  # noqa: E402
                     parse_with_threads, ratio_stats, report, stats, synthetic_jpegs, time_loader)

from swavkit.config import CropsConfig  # noqa: E402
from swavkit.data import EpochSampler, UnlabeledImageFolder, find_images, sample_seed  # noqa: E402
from swavkit.data.multicrop import MultiCropTransform  # noqa: E402

PAPER_RECIPE = asdict(CropsConfig())  # the library's default crops are the paper's
TARGET = 1.0  # (ours) the offloaded workers must deliver more images/s, or the option has no point


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--no-readme", action="store_true")
    args = parse_with_threads(parser)
    env = environment()
    root = synthetic_jpegs(WORK_DIR / "synthetic_448x336", args.images)
    paths = find_images(root)[:args.images]
    transform = MultiCropTransform(**PAPER_RECIPE)
    dataset = UnlabeledImageFolder(root, transform, paths=paths)
    B, W = args.batch, args.workers

    def arm(collate):
        epoch = [0]

        def run():
            sampler = EpochSampler(len(paths), 0, 1, seed=0)
            sampler.set_epoch(epoch[0])
            epoch[0] += 1
            loader = DataLoader(dataset, batch_size=B, sampler=sampler, drop_last=True, num_workers=W,
                                collate_fn=collate, prefetch_factor=2 if W else None)
            return time_loader(loader, B, 1 + W, 2, args.seconds)[0]
        return run

    times = interleaved({"workers_colour": arm(transform.collate), "workers_pixels": arm(transform.collate_pixels)},
                        args.reps, warmup=0, progress="colour offload")
    ips = {k: stats([1 / t for t in v], 1) for k, v in times.items()}
    speedup = ratio_stats(times["workers_colour"], times["workers_pixels"])

    # the training-process half on this CPU, and the equality of the two routes
    items = [dataset[(i, sample_seed(0, 0, i))] for i in range(B)]
    groups = transform.collate_pixels(items)[0]
    finish_s = []
    for _ in range(3):
        start = time.perf_counter()
        finished = transform.finish(groups)
        finish_s.append(time.perf_counter() - start)
    views = transform.collate(items)[0]
    identical = all(torch.equal(a, b) for a, b in zip(finished, views))
    bytes_float = sum(v.numel() * v.element_size() for v in views)
    bytes_uint8 = sum(g[0].numel() * g[0].element_size() + g[1].numel() * g[1].element_size() for g in groups)

    verdicts = Verdicts()
    verdicts.check("workers deliver images/s: colour deferred (collate_pixels) / colour in workers (collate)",
                   speedup["median"], f"> {TARGET} (ours)", speedup["median"] > TARGET)
    verdicts.check("the two routes give identical views on the CPU", identical, "True", identical)
    verdicts.info("finish() on this CPU, s per batch of 64 (1 thread)", round(min(finish_s), 3))
    table = (f"**Colour in the workers vs on the device** - {len(paths)} synthetic 448x336 JPEGs, paper recipe "
             f"(2x224 + 6x96, jitter p 0.8, grayscale 0.2, blur p 0.5), batch {B}, {W} workers, fresh DataLoader "
             f"per rep, >= {args.seconds} s timed, {args.reps} interleaved reps:\n\n" + markdown_table(
                 ["arm", "images/s delivered by the workers", "bytes per batch to the training process"],
                 [["colour in the workers (`collate`, default)", fmt_spread(ips["workers_colour"]),
                   f"{bytes_float / 2**20:.0f} MiB float32"],
                  ["colour deferred (`collate_pixels`, `data.colour_on_device=true`)", fmt_spread(ips["workers_pixels"]),
                   f"{bytes_uint8 / 2**20:.0f} MiB uint8 + parameters"]])
             + f"\n\nWorkers' speed-up: **{fmt_spread(speedup)}**. The deferred half (`finish`) costs "
             f"{min(finish_s):.2f} s per batch of {B} on this CPU at {torch.get_num_threads()} thread(s), so on a "
             "CPU-only run the option only moves work into the training process; it is meant for a GPU, where "
             "that half is a few batched kernels (not measured yet: `bench_gpu.py --parts e2e` runs both settings).")
    payload = {"config": dict(PAPER_RECIPE, batch=B, workers=W, images=len(paths)), "images_per_s": ips,
               "speedup_workers_pixels_over_colour": speedup, "finish_seconds_per_batch": [round(x, 4) for x in finish_s],
               "bytes_per_batch": {"float_views": bytes_float, "uint8_groups": bytes_uint8}, "identical_views": identical}
    return report("colour_offload", "Colour ops: workers vs training device (CPU side)",
                  f"python benchmarks/bench_colour_offload.py --workers {W} --images {len(paths)}", "", table,
                  verdicts, env, payload, write_readme=not args.no_readme)


if __name__ == "__main__":
    sys.exit(main())
