"""Memory per process for models bigger than one device: DDP vs FSDP vs FSDP + activation checkpointing.

    .venv/bin/python benchmarks/bench_memory_scale.py [--backbone regnety_008] [--steps 2] [--reps 7]
    .venv/bin/python benchmarks/bench_memory_scale.py --device cuda --batch 32 --sizes 224 96 --counts 2 4   # GPU

1. Per-process memory at 1 and 2 processes (gloo on CPU, NCCL on GPUs), each arm in fresh processes, the
   library's own step (swavkit.training.step.train_step, LARS): the bytes this process holds of parameters + gradients +
   optimiser state (counted tensor by tensor, its shards under FSDP), the activation bytes autograd keeps
   for the backward (a saved-tensors hook over the step), and the peak memory (CPU: ru_maxrss; GPU:
   torch.cuda.max_memory_allocated). FSDP in one process uses a 1-process group (swavkit's train refuses it:
   nothing to shard; it is here to show the wrapping itself costs nothing).
   Target (issue 23): FSDP over 2 processes holds <= 0.6x DDP's parameter + gradient + optimiser bytes per process.
2. Activation checkpointing in one process, arms interleaved in one process (plain, on = every block, 0.5 = the
   first half of the blocks), medians; target for each: activation bytes cut >= 2x at <= 1.4x the step time.
3. The largest RegNetY per strategy under a memory cap (--cap-gib, default 80: an H100), estimated per process:
   parameter + gradient + LARS momentum bytes (exact counts, meta device; / N under FSDP, plus two all-gathered
   units) + activation bytes of one forward at --estimate-batch per process with the SEER crops (2x224 + 4x96),
   counted by the same hook on the meta device. An estimate (no allocator slack, no workspace): part 1 checks the
   hook against the measured run; a GPU run of this script measures the real thing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (Verdicts, apply_threads, environment, fmt_spread, interleaved, invocation,  # noqa: E402
                     markdown_table, peak_rss_mb, ratio_stats, report, stats)

FSDP_TARGET = 0.6
ACTIVATION_CUT_TARGET = 2.0
TIME_TARGET = 1.4
REGNETY = ["regnety_002", "regnety_004", "regnety_006", "regnety_008", "regnety_016", "regnety_032", "regnety_040",
           "regnety_064", "regnety_080", "regnety_120", "regnety_160", "regnety_320", "regnety_640", "regnety_1280",
           "regnety_2560"]
MIB = 2 ** 20


# ----------------------------------------------------------------------------------------------------
# the step, as the library runs it

def build_state(args, strategy: str, checkpointing: str, device):
    import torch

    from swavkit.core.activation_checkpointing import apply_activation_checkpointing
    from swavkit.core.model import build_model
    from swavkit.core.optim import build_optimizer
    from swavkit.training.sharding import shard_model
    from swavkit.training.step import TrainState

    torch.manual_seed(0)
    with torch.device(device):  # on a GPU, initialise there: a 1.3 B-parameter init on the CPU takes minutes
        core = build_model(args.backbone, args.prototypes, args.hidden_dim, 128)
    apply_activation_checkpointing(core.backbone, checkpointing)
    core = core.to(device)
    model = core
    if strategy == "fsdp":
        shard_model(core, args.precision, device, args.backbone)
    elif torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda"
                                                          else None, static_graph=True)
    optimizer = build_optimizer(core, "lars", lr=0.1, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001)
    state = TrainState(core, optimizer, torch.amp.GradScaler(device.type, enabled=False), model=model,
                       sharded=strategy == "fsdp")
    return state


def make_crops(args, device, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(args.batch, 3, s, s, generator=g).to(device)
            for s, c in zip(args.sizes, args.counts) for _ in range(c)]


def step_once(state, crops, settings) -> int:
    """One library step; returns the bytes autograd kept for its backward (distinct storages)."""
    import torch

    from swavkit.training.step import train_step

    seen: dict[tuple, int] = {}

    def pack(t):
        if t.numel() and not (t.is_leaf and t.requires_grad):  # weights saved by a layer are not activations
            seen[(t.untyped_storage().data_ptr(), t.device.type)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(state, crops, settings, lr=0.1)
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------------
# part 1: one arm = fresh processes

def arm_worker(rank: int, world: int, port: int, args, strategy: str, checkpointing: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from swavkit.training.sharding import local_state_bytes
    from swavkit.training.step import StepSettings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    state = build_state(args, strategy, checkpointing, device)
    settings = StepSettings(autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None)
    crops = make_crops(args, device, seed=rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, activation = [], 0
    for _ in range(args.steps):
        start = time.perf_counter()
        activation = step_once(state, crops, settings)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    held = local_state_bytes(state.core, state.optimizer)
    peak = (torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else peak_rss_mb())
    record = {"rank": rank, "params_grads_optimizer_bytes": sum(held.values()), **{f"{k}_bytes": v for k, v in held.items()},
              "activation_bytes": activation, "peak_mib": round(peak, 1),
              "seconds_per_step": round(statistics.median(seconds[1:] or seconds), 3)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(args, strategy: str, checkpointing: str, world: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(arm_worker, args=(world, free_port(), args, strategy, checkpointing, out), nprocs=world)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    worst = max(ranks, key=lambda r: r["params_grads_optimizer_bytes"])
    return {"strategy": strategy, "activation_checkpointing": checkpointing, "processes": world, "ranks": ranks,
            "params_grads_optimizer_mib": round(worst["params_grads_optimizer_bytes"] / MIB, 1),
            "activation_mib": round(max(r["activation_bytes"] for r in ranks) / MIB, 1),
            "peak_mib": max(r["peak_mib"] for r in ranks),
            "seconds_per_step": max(r["seconds_per_step"] for r in ranks)}


# ----------------------------------------------------------------------------------------------------
# part 2: checkpointing, interleaved in one process

def checkpointing_arms(args) -> dict:
    import torch

    from swavkit.training.step import StepSettings

    device = torch.device(args.device)
    settings = StepSettings(autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None)
    crops = make_crops(args, device)
    states = {"plain": build_state(args, "ddp", "off", device), "on": build_state(args, "ddp", "on", device),
              "0.5": build_state(args, "ddp", "0.5", device)}
    activation = {}

    def arm(name):
        def run():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            activation[name] = step_once(states[name], crops, settings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start
        return run

    times = interleaved({name: arm(name) for name in states}, args.reps, warmup=1, progress="checkpointing")
    return {"activation_bytes": activation, "seconds": {k: stats(v) for k, v in times.items()},
            "time_ratio": {k: ratio_stats(times[k], times["plain"]) for k in ("on", "0.5")},
            "activation_cut": {k: round(activation["plain"] / max(1, activation[k]), 2) for k in ("on", "0.5")}}


# ----------------------------------------------------------------------------------------------------
# part 3: the largest RegNetY under a cap (meta-device estimate)

def estimate(name: str, batch: int, checkpointing: str, hidden_dim: int, prototypes: int,
             crops=((2, 224), (4, 96))) -> dict:
    """Per-process bytes of one model at ``batch`` per process: parameters, largest block, activations (fp32)."""
    import torch

    from swavkit.core.activation_checkpointing import apply_activation_checkpointing, backbone_blocks
    from swavkit.core.model import build_model

    with torch.device("meta"):
        core = build_model(name, prototypes, hidden_dim, 128)
    apply_activation_checkpointing(core.backbone, checkpointing)
    params = sum(p.numel() for p in core.parameters())
    largest_block = max((sum(p.numel() for p in b.parameters()) for b in backbone_blocks(core.backbone)), default=0)
    seen: dict[int, int] = {}

    def pack(t):  # meta tensors have no storage to tell views apart: one entry per tensor object
        if not (t.is_leaf and t.requires_grad):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    kept = []  # keeps the saved tensors alive, so that no id is reused
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or pack(t), lambda t: t):
        core.train()
        for count, side in crops:  # one backbone call per resolution, as the grouped forward does
            z = core.backbone(torch.empty(count * batch, 3, side, side, device="meta"))
            core.prototypes(torch.nn.functional.normalize(core.head(z), dim=1))
    return {"params": params, "largest_block_params": largest_block, "activation_bytes": sum(seen.values())}


def per_process_gib(e: dict, strategy: str, world: int) -> float:
    state = 12 * e["params"]  # fp32 weights + gradients + LARS momentum
    if strategy == "fsdp":  # its shard, plus the current and the prefetched unit all-gathered whole (4 + 4 bytes)
        state = state / world + 8 * e["largest_block_params"]
    return (state + e["activation_bytes"]) / 2 ** 30


def largest_under_cap(args) -> tuple[list[list], dict]:
    rows, found, estimates = [], {}, {}
    arms = [("ddp", "off", 1), ("fsdp", "off", 2), ("fsdp", "on", 2), ("fsdp", "on", 8)]
    for name in REGNETY:
        for checkpointing in ("off", "on"):
            estimates[(name, checkpointing)] = estimate(name, args.estimate_batch, checkpointing, args.hidden_dim,
                                                        args.prototypes)
    for strategy, checkpointing, world in arms:
        label = f"{strategy}{' + checkpointing' if checkpointing == 'on' else ''} x {world}"
        fits = [n for n in REGNETY if per_process_gib(estimates[(n, checkpointing)], strategy, world) <= args.cap_gib]
        best = fits[-1] if fits else "none"
        found[label] = best
        e = estimates.get((best, checkpointing))
        rows.append([label, best, f"{e['params'] / 1e6:.0f} M" if e else "-",
                     f"{per_process_gib(e, strategy, world):.1f}" if e else "-"])
    table = {f"{n}|{c}": v for (n, c), v in estimates.items()}
    return rows, {"largest": found, "estimates": table}


def measure_largest(args) -> tuple[list[list], dict]:
    """GPU only, one process: the largest RegNetY whose library step runs at --batch per GPU, plain and
    checkpointed (FSDP in one process holds the same bytes as DDP: nothing to shard over)."""
    import torch

    from swavkit.training.step import StepSettings

    device, found, rows = torch.device("cuda", 0), {}, []
    settings = StepSettings(autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None)
    for checkpointing in ("off", "on"):
        found[checkpointing] = None
        for name in REGNETY[REGNETY.index(args.search_from):]:
            state = None
            try:
                gc.collect()  # the previous model, and an out-of-memory traceback's frames
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                state = build_state(argparse.Namespace(**{**vars(args), "backbone": name}), "ddp", checkpointing, device)
                crops = make_crops(args, device)
                for _ in range(2):
                    step_once(state, crops, settings)
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
                found[checkpointing] = name
                rows.append([name, checkpointing, f"{peak:.1f}"])
                print(f"  {name} checkpointing {checkpointing}: {peak:.1f} GiB", flush=True)
            except torch.cuda.OutOfMemoryError:
                rows.append([name, checkpointing, "out of memory"])
                print(f"  {name} checkpointing {checkpointing}: out of memory", flush=True)
                break
            finally:
                del state
    return rows, found


# ----------------------------------------------------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="regnety_008")
    parser.add_argument("--batch", type=int, default=8, help="images per process")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--hidden-dim", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2, help="steps per arm in part 1 (the last ones timed)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions in part 2")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--cap-gib", type=float, default=80.0)
    parser.add_argument("--estimate-batch", type=int, default=32)
    parser.add_argument("--name", default="memory_scale")
    parser.add_argument("--measure-largest", action="store_true", help="GPU: also find the largest RegNetY whose "
                        "step really runs at --batch per GPU (from --search-from upwards, until out of memory)")
    parser.add_argument("--search-from", default="regnety_160", choices=REGNETY)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-readme", action="store_true")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    apply_threads(args.threads)
    env, verdicts = environment(), Verdicts()
    arms = [("ddp", "off", 1), ("fsdp", "off", 1), ("fsdp", "on", 1), ("ddp", "off", 2), ("fsdp", "off", 2),
            ("fsdp", "on", 2)]
    if args.device == "cuda":
        import torch

        arms = [a for a in arms if a[2] <= torch.cuda.device_count()]
    results = []
    for strategy, checkpointing, world in arms:
        print(f"part 1: {strategy}, checkpointing {checkpointing}, {world} process(es) ...", flush=True)
        results.append(run_arm(args, strategy, checkpointing, world))
        print(f"  {results[-1]['params_grads_optimizer_mib']} MiB params+grads+optimiser, "
              f"{results[-1]['activation_mib']} MiB activations, peak {results[-1]['peak_mib']} MiB", flush=True)
    rows = [[r["strategy"] + (" + checkpointing" if r["activation_checkpointing"] == "on" else ""), r["processes"],
             r["params_grads_optimizer_mib"], r["activation_mib"], r["peak_mib"], r["seconds_per_step"]] for r in results]
    peak_name = "peak CUDA max_allocated (MiB)" if args.device == "cuda" else "peak RSS (MiB)"
    tables = [f"**Per process**, {args.backbone}, batch {args.batch} per process, crops "
              f"{' + '.join(f'{c}x{s}' for c, s in zip(args.counts, args.sizes))}, K {args.prototypes}, "
              f"{args.precision}, LARS, {args.steps} steps:\n\n" + markdown_table(
                  ["strategy", "processes", "params + grads + optimiser (MiB)", "activations kept (MiB)", peak_name,
                   "s/step (median)"], rows)]
    by = {(r["strategy"], r["activation_checkpointing"], r["processes"]): r for r in results}
    if ("fsdp", "off", 2) in by and ("ddp", "off", 2) in by:
        share = by[("fsdp", "off", 2)]["params_grads_optimizer_mib"] / by[("ddp", "off", 2)]["params_grads_optimizer_mib"]
        verdicts.check("FSDP over 2 processes / DDP: params + grads + optimiser bytes per process", round(share, 3),
                       f"<= {FSDP_TARGET}", share <= FSDP_TARGET)
    print("part 2: activation checkpointing, interleaved ...", flush=True)
    ckpt = checkpointing_arms(args)
    rows = [[value, f"{ckpt['activation_bytes'][value] / MIB:.1f}", ckpt["activation_cut"][value],
             fmt_spread(ckpt["seconds"][value], " s"), fmt_spread(ckpt["time_ratio"][value])] for value in ("on", "0.5")]
    tables.append(f"**Activation checkpointing**, one process, {args.reps} interleaved repetitions (plain: "
                  f"{ckpt['activation_bytes']['plain'] / MIB:.1f} MiB of activations kept, "
                  f"{fmt_spread(ckpt['seconds']['plain'], ' s')} per step):\n\n" + markdown_table(
                      ["model.activation_checkpointing", "activations kept (MiB)", "cut (x)", "s/step",
                       "step time / plain"], rows))
    for value in ("on", "0.5"):  # both settings are checked: "on" is what configs/seer_regnety_1.3b.yaml uses
        verdicts.check(f"activation checkpointing={value}: activation bytes plain / checkpointed",
                       ckpt["activation_cut"][value], f">= {ACTIVATION_CUT_TARGET}",
                       ckpt["activation_cut"][value] >= ACTIVATION_CUT_TARGET)
        verdicts.check(f"activation checkpointing={value}: step time / plain (median of interleaved pairs)",
                       ckpt["time_ratio"][value]["median"], f"<= {TIME_TARGET}",
                       ckpt["time_ratio"][value]["median"] <= TIME_TARGET)
    print("part 3: largest RegNetY under the cap (meta-device estimate) ...", flush=True)
    cap_rows, cap = largest_under_cap(args)
    tables.append(f"**Largest RegNetY under {args.cap_gib:g} GiB per process** (estimate: fp32 weights + grads + LARS "
                  f"momentum, / N under FSDP plus two whole units, + activations of batch {args.estimate_batch} per "
                  "process at 2x224 + 4x96 counted on the meta device; no allocator slack):\n\n"
                  + markdown_table(["strategy x processes", "largest RegNetY", "parameters", "GiB per process"], cap_rows))
    check = estimate(args.backbone, args.batch, "off", args.hidden_dim, args.prototypes,
                     crops=tuple(zip(args.counts, args.sizes)))
    measured = by[("ddp", "off", 1)]["activation_mib"]
    tables.append(f"Estimator check: {args.backbone} activations at this run's batch and crops, meta-device count "
                  f"{check['activation_bytes'] / MIB:.1f} MiB vs {measured} MiB measured in part 1.")
    verdicts.info("largest RegNetY under the cap, per strategy (estimate)", json.dumps(cap["largest"]))
    measured_largest = None
    if args.measure_largest and args.device == "cuda":
        print("part 3b: the largest RegNetY that really steps on this GPU ...", flush=True)
        found_rows, measured_largest = measure_largest(args)
        tables.append(f"**Measured on this GPU**, one process, batch {args.batch}, {args.precision}: the step of each "
                      "RegNetY, upwards until out of memory (peak = torch.cuda.max_memory_allocated):\n\n"
                      + markdown_table(["backbone", "activation checkpointing", "peak GiB"], found_rows))
        verdicts.info("largest RegNetY stepping on this GPU (plain / checkpointed)", json.dumps(measured_largest))
    payload = {"config": {k: v for k, v in vars(args).items()}, "arms": results, "checkpointing": ckpt,
               "cap": {"cap_gib": args.cap_gib, **cap}, "measured_largest": measured_largest, "estimator_check_mib": {
                   "meta_count": round(check["activation_bytes"] / MIB, 1), "measured": measured}}
    protocol = (__doc__.split("\n\n", 2)[2] if __doc__ else "")
    machine = None if args.device == "cpu" else f"GPU: {__import__('torch').cuda.get_device_name(0)}"
    return report(args.name, "Memory per process: DDP, FSDP, activation checkpointing (issue 23)",
                  invocation("bench_memory_scale.py"), protocol, "\n\n".join(tables), verdicts, env, payload,
                  write_readme=not args.no_readme, machine=machine)


if __name__ == "__main__":
    sys.exit(main())
