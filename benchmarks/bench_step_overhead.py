"""Step overhead: a full swavkit training step vs the bare timm backbone on the SAME crop tensors.

    .venv/bin/python benchmarks/bench_step_overhead.py [--reps 9] [--reps50 4] [--skip-resnet50] [--no-levers] [--with-compile]

Arms (one process, interleaved A/B/C, alternating order, medians over repetitions, torch threads 1 unless
--threads says otherwise):
  bare    timm backbone: grouped forward (one call per resolution, as SwAVModel.embed), trivial loss
          (mean of the pooled features), backward, LARS step over the backbone's parameters;
  model   SwAVModel (backbone + projection head + L2 norm + prototypes), trivial loss (mean score),
          backward, LARS step: isolates what the head and prototypes cost;
  swavkit the library's training step, swavkit.training.step.train_step (what train.py runs per batch): prototype
          normalisation, forward, fp32 Sinkhorn on the 2 assignment crops, swapped-prediction loss, backward,
          finiteness check, LARS;
  A/A     a second identical bare backbone: the noise floor of a ratio on this machine.
Target (issue 5): swavkit / bare <= 1.05. Also reported: the FLOP ratio (torch.utils.flop_counter), i.e.
the part of the overhead that is SwAV's own arithmetic (projection head, prototypes).

Levers (informational, resnet18 config): the swavkit step with bf16 autocast on CPU, with channels_last,
and at torch's default thread count, each against the fp32 step in the same interleaved run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (LAST_CPU_SECONDS, TORCH_DEFAULT_THREADS, Verdicts, environment, fmt_spread,  # noqa: E402
                     interleaved, invocation, markdown_table, parse_with_threads, ratio_stats, report, stats)
from _arms import BareBackboneStep, ModelOnlyStep, SwavkitStep, make_crops  # noqa: E402

TARGET = 1.05
CONFIGS = {
    "resnet18": dict(backbone="resnet18", batch=128, counts=[2, 4], sizes=[32, 16], K=3000, steps=1),
    "resnet50": dict(backbone="resnet50", batch=8, counts=[2, 6], sizes=[224, 96], K=3000, steps=1),
}


def timed(step, crops, n, threads: int | None = None):
    def run():
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            start = time.perf_counter()
            for _ in range(n):
                step(crops)
            return (time.perf_counter() - start) / n
        finally:
            torch.set_num_threads(previous)
    return run


def count_flops(step, crops) -> float:
    """Matmul/conv FLOPs of one training step (torch.utils.flop_counter), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(crops)
    return counter.get_total_flops() / 1e9


def run_config(name: str, cfg: dict, reps: int, with_model_arm: bool) -> dict:
    crops = make_crops(cfg["batch"], cfg["counts"], cfg["sizes"])
    bare_step, swav_step = BareBackboneStep(cfg["backbone"]), SwavkitStep(cfg["backbone"], cfg["K"])
    flops = {"bare": count_flops(bare_step, crops), "swavkit": count_flops(swav_step, crops)}
    # A/A control: a second, identical bare backbone; its ratio to the first is the noise floor of a ratio
    arms = {"bare": timed(bare_step, crops, cfg["steps"]),
            "bare_again": timed(BareBackboneStep(cfg["backbone"]), crops, cfg["steps"])}
    if with_model_arm:
        arms["model"] = timed(ModelOnlyStep(cfg["backbone"], cfg["K"]), crops, cfg["steps"])
    arms["swavkit"] = timed(swav_step, crops, cfg["steps"])
    times = interleaved(arms, reps, warmup=1, progress=name)
    cpu = {k: list(v) for k, v in LAST_CPU_SECONDS.items()}
    images = cfg["batch"]
    out = {"config": cfg, "gflop_per_step": {k: round(v, 2) for k, v in flops.items()},
           "flop_ratio_swavkit_over_bare": round(flops["swavkit"] / flops["bare"], 4),
           "seconds_per_step": {k: stats(v) for k, v in times.items()},
           "images_per_s": {k: stats([images / t for t in v], 2) for k, v in times.items()},
           "ratio_swavkit_over_bare": ratio_stats(times["swavkit"], times["bare"]),
           "ratio_aa_control": ratio_stats(times["bare_again"], times["bare"]),
           "ratio_swavkit_over_bare_cpu_time": ratio_stats(cpu["swavkit"], cpu["bare"])}
    if with_model_arm:
        out["ratio_model_over_bare"] = ratio_stats(times["model"], times["bare"])
        out["ratio_swavkit_over_model"] = ratio_stats(times["swavkit"], times["model"])
    return out


def run_levers(cfg: dict, reps: int, with_compile: bool = False) -> dict:
    crops = make_crops(cfg["batch"], cfg["counts"], cfg["sizes"])
    crops_cl = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    base = SwavkitStep(cfg["backbone"], cfg["K"])
    # CPU bf16 returns corrupt weight gradients for the 1x1 maps of 16 px crops (torch 2.14.1): the step
    # refuses them as train.py does; count how often instead of stopping
    bf16 = SwavkitStep(cfg["backbone"], cfg["K"], autocast_dtype=torch.bfloat16)
    bf16.skip_nonfinite = True
    arms = {"fp32": timed(base, crops, cfg["steps"]),
            "bf16_autocast": timed(bf16, crops, cfg["steps"]),
            "channels_last": timed(SwavkitStep(cfg["backbone"], cfg["K"], channels_last=True), crops_cl, cfg["steps"])}
    compile_s = None
    if with_compile:  # as train.py with model.compile=true; compiled (and timed) before the interleaving
        compiled = SwavkitStep(cfg["backbone"], cfg["K"])
        compiled.core.backbone.compile(dynamic=False)
        start = time.perf_counter()
        for _ in range(2):
            compiled(crops)
        compile_s = time.perf_counter() - start
        arms["compile"] = timed(compiled, crops, cfg["steps"])
    threads = torch.get_num_threads()
    if TORCH_DEFAULT_THREADS != threads:
        arms[f"threads_{TORCH_DEFAULT_THREADS}"] = timed(base, crops, cfg["steps"], threads=TORCH_DEFAULT_THREADS)
    times = interleaved(arms, reps, warmup=1, progress="levers")
    out = {"seconds_per_step": {k: stats(v) for k, v in times.items()}, "threads": threads,
           "speedup_bf16_autocast": ratio_stats(times["fp32"], times["bf16_autocast"]),
           "speedup_channels_last": ratio_stats(times["fp32"], times["channels_last"]),
           "bf16_refused_steps": bf16.nonfinite_steps, "bf16_steps": (reps + 1) * cfg["steps"]}
    if with_compile:
        out["speedup_compile"] = ratio_stats(times["fp32"], times["compile"])
        out["compile_first_two_steps_s"] = round(compile_s, 1)
    if TORCH_DEFAULT_THREADS != threads:
        out["speedup_default_threads"] = ratio_stats(times["fp32"], times[f"threads_{TORCH_DEFAULT_THREADS}"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9, help="interleaved repetitions, resnet18 (1 step each)")
    parser.add_argument("--reps50", type=int, default=4, help="interleaved repetitions, resnet50 (1 step each)")
    parser.add_argument("--skip-resnet50", action="store_true", help="resnet50 paper crops take most of the time")
    parser.add_argument("--no-levers", action="store_true", help="skip the bf16 / channels_last measurements")
    parser.add_argument("--with-compile", action="store_true",
                        help="also measure torch.compile of the backbone (model.compile=true); ~1 min to compile")
    parser.add_argument("--no-readme", action="store_true")
    args = parse_with_threads(parser)
    env = environment()
    results, rows = {}, []
    verdicts = Verdicts()
    plan = [("resnet18", args.reps, True)]
    if not args.skip_resnet50:
        plan.append(("resnet50", args.reps50, False))
    for name, reps, with_model in plan:
        cfg = CONFIGS[name]
        r = run_config(name, cfg, reps, with_model)
        results[name] = r
        crops = " + ".join(f"{c}x{s}" for c, s in zip(cfg["counts"], cfg["sizes"]))
        label = f"{name}, batch {cfg['batch']}, crops {crops}, K {cfg['K']}, {reps} reps x {cfg['steps']} step(s)"
        sps = r["seconds_per_step"]
        rows.append([label, fmt_spread(sps["bare"], " s"), fmt_spread(sps["model"], " s") if "model" in sps else "-",
                     fmt_spread(sps["swavkit"], " s"), fmt_spread(r["ratio_swavkit_over_bare"]),
                     fmt_spread(r["ratio_swavkit_over_model"]) if "ratio_swavkit_over_model" in r else "-",
                     fmt_spread(r["ratio_swavkit_over_bare_cpu_time"]), f"{r['flop_ratio_swavkit_over_bare']:.3f}",
                     fmt_spread(r["ratio_aa_control"])])
        verdicts.check(f"{name}: swavkit step / bare backbone step", r["ratio_swavkit_over_bare"]["median"],
                       f"<= {TARGET}", r["ratio_swavkit_over_bare"]["median"] <= TARGET)
        verdicts.info(f"{name}: FLOPs of the swavkit step / FLOPs of the bare step (matmul + conv)",
                      r["flop_ratio_swavkit_over_bare"], "none; the floor any implementation of this model pays")
        if with_model:
            verdicts.info(f"{name}: swavkit step / (backbone + head + prototypes, trivial loss)",
                          r["ratio_swavkit_over_model"]["median"],
                          "none; the SwAV-specific part (Sinkhorn + swapped loss)")
    tables = markdown_table(["config", "bare backbone s/step", "backbone+head+prototypes s/step",
                             "swavkit full step s/step", "swavkit / bare", "swavkit / (backbone+head+protos)",
                             "swavkit / bare from CPU time (cross-check)",
                             "arithmetic floor: swavkit / bare FLOPs", "A/A control: bare / identical bare"], rows)
    if not args.no_levers:
        lever = run_levers(CONFIGS["resnet18"], max(3, args.reps - 6), args.with_compile)
        results["levers_resnet18"] = lever
        s = lever["seconds_per_step"]
        tables += ("\n\nLevers on the swavkit step (resnet18 config, same interleaved protocol; speed-up = fp32 time / "
                   "lever time, >1 is faster):\n\n")
        tables += markdown_table(["variant", "s/step", "speed-up vs fp32"], [
            ["fp32 (library default on CPU)", fmt_spread(s["fp32"], " s"), "1"],
            [f"bf16 autocast (train.precision=bf16) - **{lever['bf16_refused_steps']} of {lever['bf16_steps']} steps "
             "refused: non-finite gradients** (torch's CPU bf16 conv on the 1x1 maps of 16 px crops; a refused step "
             "skips the optimiser)", fmt_spread(s["bf16_autocast"], " s"),
             fmt_spread(lever["speedup_bf16_autocast"])],
            ["channels_last (model.channels_last=true)", fmt_spread(s["channels_last"], " s"),
             fmt_spread(lever["speedup_channels_last"])]]
            + ([[f"torch.compile of the backbone (model.compile=true; first 2 steps took "
                 f"{lever['compile_first_two_steps_s']} s; a warm inductor cache makes this short)", fmt_spread(s["compile"], " s"),
                 fmt_spread(lever["speedup_compile"])]] if "speedup_compile" in lever else [])
            + ([[f"fp32 at torch's default {TORCH_DEFAULT_THREADS} threads (instead of {lever['threads']})",
                 fmt_spread(s[f"threads_{TORCH_DEFAULT_THREADS}"], " s"), fmt_spread(lever["speedup_default_threads"])]]
               if "speedup_default_threads" in lever else []))
        verdicts.info("resnet18: bf16 autocast speed-up on CPU", lever["speedup_bf16_autocast"]["median"])
        verdicts.info("resnet18: bf16 steps refused for non-finite gradients (fraction)",
                      round(lever["bf16_refused_steps"] / lever["bf16_steps"], 3))
        verdicts.info("resnet18: channels_last speed-up on CPU", lever["speedup_channels_last"]["median"])
        if "speedup_compile" in lever:
            verdicts.info("resnet18: torch.compile speed-up on CPU", lever["speedup_compile"]["median"])
        if "speedup_default_threads" in lever:
            verdicts.info(f"resnet18: speed-up of {TORCH_DEFAULT_THREADS} threads over {lever['threads']} on this shared machine",
                          lever["speedup_default_threads"]["median"])
    protocol = ("Synthetic crop tensors (randn), created once and fed to every arm; fp32 on CPU unless stated; "
                "steady state (prototypes not frozen), 1 warm-up round per arm. Arms: **bare** = timm backbone, "
                "one call per resolution group (as `SwAVModel.embed`), trivial loss, backward, LARS over the "
                "backbone (**A/A control**: a second identical bare backbone, whose ratio to the first shows how far "
                "a ratio moves by noise alone); **backbone+head+prototypes** = `SwAVModel` forward with a trivial loss (isolates "
                "the head/prototype cost); **swavkit** = the library's `swavkit.training.step.train_step`, the step train.py runs "
                "per batch. Ratio = median of per-repetition ratios. FLOPs: "
                "`torch.utils.flop_counter` over one step (matmuls and convolutions; the projection head "
                "and the prototypes are SwAV's own arithmetic, which no implementation can skip).")
    return report("step_overhead", "Step overhead: swavkit step vs bare backbone",
                  invocation(__file__),
                  protocol, tables, verdicts, env, {"results": results}, write_readme=not args.no_readme)


if __name__ == "__main__":
    sys.exit(main())
