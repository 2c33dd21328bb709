"""swavkit vs lightly (the most used SwAV library), side by side in one process, interleaved A/B.

    pip install -e ".[bench]"        # lightly is a benchmark-only extra, never a runtime dependency
    .venv/bin/python benchmarks/bench_vs_lightly.py [--parts step,sinkhorn,data] [--reps N]

(a) step      training-step images/s, same timm backbone, crops, prototypes, batch, optimiser (LARS):
              lightly as its SwaV example composes it (SwaVProjectionHead, L2 norm, SwaVPrototypes, one
              backbone call per crop, SwaVLoss) vs swavkit's step (swavkit.training.step.train_step). Target >= 1.2x.
(b) sinkhorn  codes alone, K = 3000, 3 iterations, fp32, B = 1024 and 4096: swavkit.core.sinkhorn vs
              lightly.loss.swav_loss.sinkhorn. Target >= 2x; plus finiteness where exp(scores/epsilon)
              overflows fp32 (epsilon 0.01 on trained-like cosines; unnormalised scores x10).
(c) data      images/s delivered by a DataLoader over the CIFAR-10 train JPEGs (unpacked from
              ../shared/data into benchmarks/_work/cifar10), 0/1/2 workers: swavkit's
              UnlabeledImageFolder + MultiCropTransform (swavkit/multicrop.py, colour ops batched in the
              collate function) + EpochSampler vs lightly's LightlyDataset + SwaVTransform, same crop
              recipe (configs/cifar10_resnet18.yaml). Target >= 2x.
Exit code 1 when a target is missed, 2 when lightly or the data are missing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import (LAST_CPU_SECONDS, TORCH_DEFAULT_THREADS, Verdicts, environment, fmt_spread,  # noqa: E402
                     interleaved, invocation, markdown_table, parse_with_threads, ratio_stats, report,
                     require_cifar10, stats, time_loader)
from _arms import OPTIM, SwavkitStep, group_by_size, make_crops  # noqa: E402

try:
    import lightly
    from lightly.loss import SwaVLoss
    from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
except ImportError as err:  # an optional extra: say how to get it, do not pretend to measure
    print(f"ERROR: lightly is not installed ({err}); pip install -e '.[bench]' (or: pip install lightly)",
          file=sys.stderr)
    sys.exit(2)

from swavkit.core.model import create_backbone  # noqa: E402
from swavkit.core.optim import build_optimizer  # noqa: E402
from swavkit.core.sinkhorn import sinkhorn as swavkit_sinkhorn  # noqa: E402

STEP_CFG = dict(backbone="resnet18", batch=128, counts=[2, 4], sizes=[32, 16], K=3000, hidden=2048, out=128)
# configs/cifar10_resnet18.yaml crop recipe
DATA_RECIPE = dict(counts=[2, 4], sizes_px=[32, 16], min_scales=[0.25, 0.08], max_scales=[1.0, 0.25],
                   color_jitter_strength=1.0, color_jitter_probability=0.8, grayscale_probability=0.2,
                   blur_probability=0.0, mean=[0.491, 0.482, 0.447], std=[0.247, 0.243, 0.262])
TARGETS = {"step": 1.2, "sinkhorn": 2.0, "data": 2.0}


# ----------------------------------------------------------------------------------------------------
# (a) training step

class LightlySwaV(nn.Module):
    """lightly's SwaV example model (examples/pytorch/swav.py) on the same timm backbone."""

    def __init__(self, backbone: str, hidden: int, out: int, K: int):
        super().__init__()
        self.backbone = create_backbone(backbone)
        self.projection_head = SwaVProjectionHead(self.backbone.num_features, hidden, out)
        self.prototypes = SwaVPrototypes(out, n_prototypes=K)

    def forward(self, x):
        x = self.backbone(x).flatten(start_dim=1)
        x = self.projection_head(x)
        x = F.normalize(x, dim=1, p=2)
        return self.prototypes(x)


class LightlyStep:
    """lightly's documented training step; ``grouped=True`` batches equal-size crops through the
    backbone (an attribution arm: how much of the difference is the grouped forward)."""

    def __init__(self, cfg: dict, grouped: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = False):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = LightlySwaV(cfg["backbone"], cfg["hidden"], cfg["out"], cfg["K"]).to(self.device).train()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.autocast_dtype = autocast_dtype
        self.criterion = SwaVLoss()  # temperature 0.1, 3 Sinkhorn iterations, epsilon 0.05: swavkit's defaults
        self.optimizer = build_optimizer(self.model, "lars", **OPTIM)
        self.grouped = grouped
        self.n_high = cfg["counts"][0]

    def __call__(self, views):
        self.model.prototypes.normalize()
        # lightly's example has no autocast; on a GPU it gets the same bf16 autocast as swavkit
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if self.grouped:
                outputs = []
                for group in group_by_size(views):
                    outputs += list(self.model(torch.cat(group)).split(group[0].shape[0]))
            else:
                outputs = [self.model(view) for view in views]
        outputs = [o.float() for o in outputs]
        loss = self.criterion(outputs[:self.n_high], outputs[self.n_high:])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def part_step(reps: int, verdicts: Verdicts) -> tuple[dict, str]:
    cfg = STEP_CFG
    crops = make_crops(cfg["batch"], cfg["counts"], cfg["sizes"])
    steps = {"swavkit": SwavkitStep(cfg["backbone"], cfg["K"], cfg["hidden"], cfg["out"]),
             "lightly": LightlyStep(cfg),
             "lightly_grouped_forward": LightlyStep(cfg, grouped=True)}
    times = interleaved({name: (lambda s=s: (s(crops), None)[1]) for name, s in steps.items()}, reps, warmup=1,
                        progress="step")
    cpu = {k: list(v) for k, v in LAST_CPU_SECONDS.items()}
    B = cfg["batch"]
    ips = {k: stats([B / t for t in v], 2) for k, v in times.items()}
    speedup = ratio_stats(times["lightly"], times["swavkit"])
    speedup_cpu = ratio_stats(cpu["lightly"], cpu["swavkit"])
    speedup_grouped = ratio_stats(times["lightly_grouped_forward"], times["swavkit"])
    verdicts.check("(a) training step: swavkit images/s / lightly images/s", speedup["median"],
                   f">= {TARGETS['step']}", speedup["median"] >= TARGETS["step"])
    verdicts.info("(a) same, from process CPU time (cross-check)", speedup_cpu["median"])
    crops_txt = " + ".join(f"{c}x{s}" for c, s in zip(cfg["counts"], cfg["sizes"]))
    table = (f"**(a) Training step** - {cfg['backbone']} (timm), batch {B}, crops {crops_txt}, head "
             f"{cfg['hidden']}->{cfg['out']}, K {cfg['K']}, LARS for both, fp32 CPU, {reps} interleaved reps "
             "x 1 step:\n\n" + markdown_table(
                 ["arm", "images/s", "s/step", "swavkit speed-up over it"],
                 [["swavkit (train.py step)", fmt_spread(ips["swavkit"]), fmt_spread(stats(times["swavkit"]), " s"), "1"],
                  ["lightly (its SwaV example: one backbone call per crop)", fmt_spread(ips["lightly"]),
                   fmt_spread(stats(times["lightly"]), " s"), f"**{fmt_spread(speedup)}** (CPU-time: {fmt_spread(speedup_cpu)})"],
                  ["lightly modules + swavkit's grouped forward (attribution only)",
                   fmt_spread(ips["lightly_grouped_forward"]), fmt_spread(stats(times["lightly_grouped_forward"]), " s"),
                   fmt_spread(speedup_grouped)]]))
    return {"config": cfg, "seconds_per_step": {k: stats(v) for k, v in times.items()}, "images_per_s": ips,
            "speedup_swavkit_over_lightly": speedup, "speedup_cpu_time": speedup_cpu,
            "speedup_over_lightly_grouped": speedup_grouped}, table


# ----------------------------------------------------------------------------------------------------
# (b) Sinkhorn alone

def cosine_scores(B: int, K: int, dim: int = 128, trained: bool = False, seed: int = 0) -> torch.Tensor:
    """[B, K] cosines. trained=False: random unit vectors (|cos| ~ 0.1-0.4, the start of training);
    trained=True: each sample near one prototype (max cosine ~0.95), as late in training."""
    g = torch.Generator().manual_seed(seed)
    C = F.normalize(torch.randn(K, dim, generator=g), dim=1)
    if trained:
        z = C[torch.randint(K, (B,), generator=g)] + 0.2 * torch.randn(B, dim, generator=g) / math.sqrt(dim)
    else:
        z = torch.randn(B, dim, generator=g)
    return F.normalize(z, dim=1) @ C.T


def codes_quality(Q: torch.Tensor) -> dict:
    finite = bool(torch.isfinite(Q).all())
    out = {"finite": finite}
    if finite:
        B, K = Q.shape
        out["max_row_sum_error"] = float((Q.sum(1) - 1).abs().max())  # every sample's code sums to 1
        out["max_prototype_mass_rel_error"] = float((Q.sum(0) / (B / K) - 1).abs().max())
    return out


def part_sinkhorn(reps: int, verdicts: Verdicts) -> tuple[dict, str]:
    K, iters, eps = 3000, 3, 0.05
    result, rows = {"K": K, "iterations": iters, "epsilon": eps, "timing": {}, "finiteness": {}}, []
    used_threads = torch.get_num_threads()
    for threads in dict.fromkeys((used_threads, TORCH_DEFAULT_THREADS)):
        torch.set_num_threads(threads)
        for B, calls in ((1024, 10), (4096, 3)):
            S = cosine_scores(B, K)
            buffer = torch.empty_like(S)
            ref, ours = lightly_sinkhorn(S, iterations=iters, epsilon=eps), swavkit_sinkhorn(S, eps, iters)
            agreement = float(((ours - ref).abs().max() / ref.abs().max()))

            def arm(fn):
                def run():
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    return (time.perf_counter() - start) / calls
                return run
            # "swavkit" is called as the training loop calls it: Q written into a buffer kept across steps.
            times = interleaved({"swavkit": arm(lambda: swavkit_sinkhorn(S, eps, iters, out=buffer)),
                                 "lightly": arm(lambda: lightly_sinkhorn(S, iterations=iters, epsilon=eps)),
                                 "swavkit_alloc": arm(lambda: swavkit_sinkhorn(S, eps, iters))},
                                reps, warmup=1, progress=f"sinkhorn B={B} threads={threads}")
            speedup = ratio_stats(times["lightly"], times["swavkit"])
            p1 = ratio_stats(times["lightly"], times["swavkit_alloc"])
            ms = {k: stats([1e3 * t for t in v]) for k, v in times.items()}
            result["timing"][f"B{B}_threads{threads}"] = {
                "B": B, "torch_threads": threads, "ms_per_call": ms, "speedup_swavkit_over_lightly": speedup,
                "speedup_swavkit_without_out_buffer_over_lightly": p1,
                "max_rel_difference_of_codes_vs_lightly": agreement}
            rows.append([B, threads, fmt_spread(ms["swavkit"], " ms"), fmt_spread(ms["lightly"], " ms"),
                         f"**{fmt_spread(speedup)}**", f"{agreement:.1e}", fmt_spread(ms["swavkit_alloc"], " ms"),
                         fmt_spread(p1)])
            name = f"(b) Sinkhorn B={B}, K={K}, {threads} thread(s): lightly time / swavkit time"
            if threads == used_threads:
                verdicts.check(name, speedup["median"], f">= {TARGETS['sinkhorn']}",
                               speedup["median"] >= TARGETS["sinkhorn"])
                verdicts.check(f"(b) Sinkhorn B={B}: same codes as lightly at epsilon 0.05 (max rel. difference)",
                               float(f"{agreement:.2e}"), "<= 1e-4", agreement <= 1e-4)
            else:
                verdicts.info(name, speedup["median"], f"informational (judged at {used_threads} thread(s))")
    torch.set_num_threads(used_threads)
    table = (f"**(b) Sinkhorn alone** - K {K}, {iters} iterations, epsilon {eps}, fp32, random unit-vector "
             f"cosines, {reps} interleaved reps; torch threads {used_threads} (judged) and {TORCH_DEFAULT_THREADS} "
             "(torch's default, shown):\n\n" + markdown_table(
                 ["B", "threads", "swavkit ms/call", "lightly ms/call", "swavkit speed-up", "max rel. diff. of codes",
                  "swavkit without out= ms/call", "its speed-up"], rows))
    table += ("\n\n*swavkit* is timed as the training loop calls it, writing Q into a buffer kept across steps "
              "(`out=`); *without out=* allocates a fresh B x K result per call (informational).")
    cases = [("epsilon 0.05, random cosines", cosine_scores(1024, K), 0.05),
             ("epsilon 0.01, trained-like cosines (max ~0.95)", cosine_scores(1024, K, trained=True), 0.01),
             ("epsilon 0.05, scores x10 (unnormalised)", 10 * cosine_scores(1024, K, trained=True), 0.05),
             ("epsilon 0.05, fp16-range scores x100", 100 * cosine_scores(1024, K, trained=True), 0.05)]
    frows = []
    for label, S, e in cases:
        q_ours = codes_quality(swavkit_sinkhorn(S, e, iters))
        q_ref = codes_quality(lightly_sinkhorn(S, iterations=iters, epsilon=e))
        result["finiteness"][label] = {"swavkit": q_ours, "lightly": q_ref}

        def show(q):
            return ("finite, row-sum err %.1e" % q["max_row_sum_error"]) if q["finite"] else "**NaN/inf**"
        frows.append([label, f"{S.max().item():.2f}", show(q_ours), show(q_ref)])
        verdicts.check(f"(b) swavkit codes finite: {label}", q_ours["finite"], "finite, rows sum to 1",
                       q_ours["finite"] and q_ours["max_row_sum_error"] < 1e-3)
    table += ("\n\nFiniteness (B 1024, K 3000, 3 iterations, fp32):\n\n"
              + markdown_table(["case", "max score", "swavkit", "lightly"], frows))
    return result, table


# ----------------------------------------------------------------------------------------------------
# (c) data pipeline

def _finished_on(loader, transform, device: torch.device):
    """Batches of ``collate_pixels`` -> the trainer's views on ``device`` (colour half there), each batch
    synchronised so that the time covers the device work."""
    for groups, indices, skipped in loader:
        views = transform.finish(groups, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield views, indices, skipped


def seeding_cost_us() -> dict:
    """Per-sample seeding as UnlabeledImageFolder does it (torch.manual_seed, which in a CUDA build also
    queues lazy CUDA seeding and formats a stack trace) vs seeding only the CPU generator."""
    out = {}
    for name, fn in (("torch.manual_seed", lambda: torch.manual_seed(12345)),
                     ("torch.default_generator.manual_seed", lambda: torch.default_generator.manual_seed(12345))):
        fn()
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(200):
                fn()
            runs.append((time.perf_counter() - start) / 200 * 1e6)
        out[name] = stats(runs, 2)
    torch.manual_seed(0)
    return out


def part_data(reps: int, verdicts: Verdicts, workers_list=(0, 1, 2), batch: int = 128,
              min_seconds: float = 2.5, min_batches: int = 2, root: Path | None = None,
              recipe: dict = DATA_RECIPE, device: torch.device | None = None) -> tuple[dict, str]:
    """``root``: a folder of images (default: the CIFAR-10 train JPEGs); ``recipe``: MultiCropTransform's
    arguments, given to both libraries. With a CUDA ``device``, a third arm times what the trainer does
    with data.colour_on_device=true: workers collate uint8 pixels (pinned), the colour half runs on the
    device, synchronised per batch."""
    from lightly.data import LightlyDataset
    from lightly.transforms import SwaVTransform
    from torch.utils.data import DataLoader

    from swavkit.data import EpochSampler, UnlabeledImageFolder, find_images
    from swavkit.data.multicrop import MultiCropTransform

    root = root or require_cifar10() / "train"
    r = recipe
    paths = find_images(root)
    transform = MultiCropTransform(**r)
    swav_ds = UnlabeledImageFolder(root, transform, paths=paths)
    used_threads = torch.get_num_threads()
    s = r["color_jitter_strength"]
    lightly_tf = SwaVTransform(crop_sizes=tuple(r["sizes_px"]), crop_counts=tuple(r["counts"]),
                               crop_min_scales=tuple(r["min_scales"]), crop_max_scales=tuple(r["max_scales"]),
                               hf_prob=0.5, cj_prob=r["color_jitter_probability"], cj_strength=s,
                               random_gray_scale=r["grayscale_probability"], gaussian_blur=r["blur_probability"],
                               normalize={"mean": r["mean"], "std": r["std"]})
    lightly_ds = LightlyDataset(str(root), transform=lightly_tf)
    assert len(lightly_ds) == len(paths), (len(lightly_ds), len(paths))

    def make_arm(kind: str, workers: int):
        epoch = [0]

        def run():
            common = dict(batch_size=batch, drop_last=True, num_workers=workers,
                          prefetch_factor=2 if workers else None, persistent_workers=False)
            if kind == "lightly":
                loader = DataLoader(lightly_ds, shuffle=True, **common)
            else:
                sampler = EpochSampler(len(paths), 0, 1, seed=0)
                sampler.set_epoch(epoch[0])
                on_device = kind == "swavkit_colour_on_device"
                loader = DataLoader(swav_ds, sampler=sampler, pin_memory=on_device and device.type == "cuda",
                                    collate_fn=transform.collate_pixels if on_device else transform.collate, **common)
                if on_device:
                    loader = _finished_on(loader, transform, device)
            epoch[0] += 1
            # worker start-up and the first batch are not timed
            seconds, (views, _, _) = time_loader(loader, batch, 1 + workers, min_batches, min_seconds)
            assert len(views) == sum(r["counts"]) and views[0].shape == (batch, 3, r["sizes_px"][0], r["sizes_px"][0])
            return seconds
        return run

    result, rows = {"recipe": r, "batch": batch, "workers": {}, "seeding_us_per_call": seeding_cost_us()}, []
    kinds = ("swavkit", "lightly") + (("swavkit_colour_on_device",) if device is not None else ())
    for workers in workers_list:
        times = interleaved({kind: make_arm(kind, workers) for kind in kinds}, reps, warmup=0,
                            progress=f"data workers={workers}")
        ips = {k: stats([1 / t for t in v], 1) for k, v in times.items()}
        speedup = ratio_stats(times["lightly"], times["swavkit"])
        result["workers"][workers] = {"images_per_s": ips, "speedup_swavkit_over_lightly": speedup}
        rows.append([workers, fmt_spread(ips["swavkit"]), fmt_spread(ips["lightly"]), f"**{fmt_spread(speedup)}**"])
        verdicts.check(f"(c) data pipeline, {workers} worker(s): swavkit images/s / lightly images/s",
                       speedup["median"], f">= {TARGETS['data']}", speedup["median"] >= TARGETS["data"])
        if device is not None:
            on_device = result["workers"][workers]["speedup_colour_on_device_over_lightly"] = ratio_stats(
                times["lightly"], times["swavkit_colour_on_device"])
            rows[-1] += [fmt_spread(ips["swavkit_colour_on_device"]), f"**{fmt_spread(on_device)}**"]
            verdicts.check(f"(c) data pipeline, {workers} worker(s), colour on the device: swavkit images/s / "
                           "lightly images/s", on_device["median"], f">= {TARGETS['data']}",
                           on_device["median"] >= TARGETS["data"])
    crops_txt = " + ".join(f"{c}x{s}" for c, s in zip(r["counts"], r["sizes_px"]))
    table = (f"**(c) Multi-crop data pipeline** - CIFAR-10 train JPEGs (32x32), crops {crops_txt} at scales "
             f"{r['min_scales']}..{r['max_scales']}, jitter 0.8/0.8/0.8/0.2 p 0.8, grayscale 0.2, no blur "
             f"(configs/cifar10_resnet18.yaml), batch {batch}; per rep a fresh DataLoader (prefetch 2, not "
             f"persistent, so idle arms cannot prefetch while another is timed), 1 + workers untimed batches, then "
             f">= {min_batches} batches and >= {min_seconds} s timed; {reps} interleaved reps. images/s = images "
             "delivered to the training loop:\n\n" + markdown_table(
                 ["workers", "swavkit images/s", "lightly images/s", "swavkit / lightly"], rows))
    seed = result["seeding_us_per_call"]
    table += ("\n\nswavkit = `swavkit/multicrop.py` as the trainer uses it: geometric crop per image with PIL, "
              "every random number drawn per image (one RNG call) from the per-sample seed, colour jitter / "
              "grayscale / blur / normalisation vectorised over the batch in the collate function (inside the "
              f"workers, or in the training process at its {used_threads} thread(s) with 0 workers). "
              "Per-sample seeding: `torch.manual_seed` "
              f"{fmt_spread(seed['torch.manual_seed'], ' us')} per call (a CUDA build also queues lazy CUDA "
              f"seeding with a formatted stack trace) vs `torch.default_generator.manual_seed` "
              f"{fmt_spread(seed['torch.default_generator.manual_seed'], ' us')}, which the library uses.")
    return result, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="step,sinkhorn,data")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-readme", action="store_true")
    args = parse_with_threads(parser)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"step", "sinkhorn", "data"}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}")
    if "data" in parts:
        require_cifar10()  # fail early (exit 2) before spending minutes on the other parts
    env = environment()
    env["lightly"] = lightly.__version__
    verdicts, results, tables = Verdicts(), {}, []
    if "sinkhorn" in parts:
        results["sinkhorn"], t = part_sinkhorn(max(args.reps, 7), verdicts)
        tables.append(t)
    if "step" in parts:
        results["step"], t = part_step(args.reps, verdicts)
        tables.insert(0, t)
    if "data" in parts:
        results["data"], t = part_data(max(3, args.reps - 2), verdicts)
        tables.append(t)
    protocol = (f"lightly {lightly.__version__} installed as the `bench` extra (`pip install lightly --no-deps "
                "lightning-utilities`: same torch). Both libraries run in the same process; arms interleave "
                "(order alternates every repetition). Speed-up = lightly time / swavkit time per repetition, median.")
    return report("vs_lightly", "swavkit vs lightly", invocation(__file__),
                  protocol, "\n\n".join(tables), verdicts, env, {"results": results}, write_readme=not args.no_readme)


if __name__ == "__main__":
    sys.exit(main())
