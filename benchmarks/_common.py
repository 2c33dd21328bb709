"""Shared plumbing for the performance benchmarks (issue 5): environment record, A/B timing, results.

Timing rules (the machine is small and shared, so single timings mean little):
- arms that are compared run in ONE process, interleaved (A B B A A B ...), several repetitions;
- every reported number is a median over repetitions, with its spread (min..max);
- a ratio is the median of the per-repetition ratios (each repetition's arms ran back to back).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from swavkit.evaluation.report import run_git

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = BENCH_DIR / "_work"  # git-ignored scratch (unpacked data, run folders)
README = BENCH_DIR / "README.md"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PYTHON = sys.executable

TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before any script changes it

SHARED_MACHINE_NOTE = ("timings taken on a small CPU machine SHARED with other engineers running tests; "
                       "absolute numbers are noisy, ratios come from interleaved arms in one process")


# ----------------------------------------------------------------------------------------------------
# environment

def _git(*args: str) -> str:
    out = run_git(*args, cwd=REPO_ROOT)
    return "unknown" if out is None else out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for the timed work (default 1; 0 = torch's default, "
                             f"{TORCH_DEFAULT_THREADS} here). On a machine shared with other jobs, multi-threaded "
                             "timings measure scheduler stalls more than work (see README)")


def apply_threads(threads: int) -> int:
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def parse_with_threads(parser):
    """Add ``--threads``, parse the command line and apply it: how every timing benchmark starts."""
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    return args


def invocation(script: str) -> str:
    """``python benchmarks/<script> ARGS`` as this process was started, for the report."""
    return " ".join(["python", f"benchmarks/{Path(script).name}", *sys.argv[1:]])


def environment() -> dict:
    import timm
    import torchvision

    # modified or untracked (not ignored) files of the library and the benchmarks: what the commit lacks
    # With BENCH_COMMIT (a copy of a committed tree on another machine) a .git found there is not this
    # tree's history, so its status says nothing: unknown.
    changed = ("unknown" if os.environ.get("BENCH_COMMIT") else
               _git("status", "--porcelain", "--", "swavkit", "benchmarks", "pyproject.toml"))
    uncommitted = [line[3:] for line in changed.splitlines()] if changed != "unknown" else None
    return {
        # a machine that got a copy of the working tree without .git (a lent GPU) is told via BENCH_COMMIT
        "commit": os.environ.get("BENCH_COMMIT") or _git("rev-parse", "HEAD"),
        "working_tree_modified": bool(uncommitted) if uncommitted is not None else None,
        "uncommitted_files": uncommitted,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_threads_default": TORCH_DEFAULT_THREADS,
        "cpu_model": _cpu_model(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": "none (CPU only; no GPU was lent to this task)" if not torch.cuda.is_available()
               else torch.cuda.get_device_name(0),
        "note": SHARED_MACHINE_NOTE,
    }


# ----------------------------------------------------------------------------------------------------
# timing

def stats(values: list[float], digits: int = 4) -> dict:
    """median and spread of repeated measurements."""
    values = [float(v) for v in values]
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values), "values": [round(v, digits) for v in values]}


def interleaved(arms: dict[str, Callable[[], float | None]], repetitions: int, warmup: int = 1,
                progress: str = "") -> dict[str, list[float]]:
    """Run every arm ``repetitions`` times, interleaved, alternating the order (ABBA...) so that a slow
    phase of the shared machine hits both arms alike. An arm returns its own measurement in seconds (a
    float), or anything else: then its wall time is taken. Returns {arm: [seconds per repetition]}."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu = LAST_CPU_SECONDS
    cpu.clear()
    cpu.update({name: [] for name in names})
    for rep in range(repetitions):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            measured = arms[name]()
            if isinstance(measured, bool) or not isinstance(measured, (int, float)):
                measured = None  # the arm returned a result, not a time: use the wall time
            wall, used = time.perf_counter() - start, time.process_time() - start_cpu
            times[name].append(measured if measured is not None else wall)
            cpu[name].append(used * (times[name][-1] / wall) if wall > 0 else used)  # same unit as the arm's
        if progress:
            print(f"  [{progress}] rep {rep + 1}/{repetitions}: "
                  + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    return times


def time_loader(loader, batch: int, warm_batches: int, min_batches: int, min_seconds: float):
    """-> (seconds per image delivered by ``loader``, the last timed batch). ``warm_batches`` batches
    (worker start-up, the first batch) are not timed; then at least ``min_batches`` batches and
    ``min_seconds`` are, or the rest of the epoch if it runs out first."""
    it = iter(loader)
    for _ in range(warm_batches):
        next(it)
    n, last, start = 0, None, time.perf_counter()
    while n < min_batches or time.perf_counter() - start < min_seconds:
        out = next(it, None)
        if out is None:
            break
        n, last = n + 1, out
    elapsed = time.perf_counter() - start
    del it
    if n == 0:
        raise RuntimeError("the folder holds too few images for one timed batch")
    return elapsed / (n * batch), last


# CPU seconds (this process, all threads) of the arms of the last ``interleaved`` call, scaled like the
# arm's own measurement: a cross-check, since wall time on a shared machine includes waiting for a core.
LAST_CPU_SECONDS: dict[str, list[float]] = {}


def ratio_stats(numerator: list[float], denominator: list[float], digits: int = 3) -> dict:
    """Per-repetition ratios numerator[i] / denominator[i] (arms run back to back), summarised."""
    return stats([a / b for a, b in zip(numerator, denominator)], digits)


def fmt_spread(s: dict, unit: str = "", digits: int = 3) -> str:
    f = f"{{:.{digits}g}}"
    return f"{f.format(s['median'])}{unit} ({f.format(s['min'])}..{f.format(s['max'])})"


# ----------------------------------------------------------------------------------------------------
# targets, results, report

class Verdicts:
    """Collects target checks; ``exit_code`` is 1 when any target was missed."""

    def __init__(self):
        self.items: list[dict] = []

    def check(self, name: str, value: float, target: str, ok: bool) -> bool:
        self.items.append({"name": name, "value": value, "target": target, "met": bool(ok)})
        print(f"{'PASS' if ok else 'FAIL'}: {name} = {value} (target {target})", flush=True)
        return ok

    def info(self, name: str, value, note: str = "") -> None:
        self.items.append({"name": name, "value": value, "target": note or "none (informational)", "met": None})

    @property
    def exit_code(self) -> int:
        return 1 if any(item["met"] is False for item in self.items) else 0

    def markdown(self) -> str:
        rows = [[i["name"], str(i["value"]), i["target"],
                 {True: "met", False: "**MISSED**", None: "-"}[i["met"]]] for i in self.items]
        return markdown_table(["check", "measured (median)", "target", "verdict"], rows)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(REPO_ROOT)}")
    return path


PERFORMANCE_HEADING = "## Performance"


def update_readme(name: str, markdown: str, *, prefix: str = "perf", heading: str = PERFORMANCE_HEADING) -> None:
    """Replace this benchmark's block inside the README's ``heading`` section (created if missing).

    The file is re-read right before writing and only the text between this benchmark's markers (or the
    end of the Performance section, for a new block) changes: other sections (e.g. "Evaluation", written
    by someone else) are left byte-for-byte alone.
    """
    start, end = f"<!-- {prefix}:{name}:start -->", f"<!-- {prefix}:{name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        if heading not in text:
            text = text.rstrip("\n") + f"\n\n{heading}\n\n"
        # insert at the end of the Performance section: before the next "## " heading, or at the end
        at = text.index(heading) + len(heading)
        following = re.search(r"^## ", text[at:], flags=re.M)
        cut = at + following.start() if following else len(text)
        head, tail = text[:cut].rstrip("\n"), text[cut:]
        text = head + "\n\n" + block + "\n" + ("\n" + tail if tail else "")
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, README)
    print(f"updated {README.relative_to(REPO_ROOT)} (block '{name}')")


def report(name: str, title: str, command: str, protocol: str, tables: str, verdicts: Verdicts, env: dict,
           payload: dict, write_readme: bool = True, machine: str | None = None,
           heading: str = PERFORMANCE_HEADING) -> int:
    """Print the markdown, write results/<name>.json and the README block; return the exit code.
    ``machine``: a description that replaces the shared-CPU-machine sentence (e.g. a lent GPU machine).
    ``heading``: the README section that holds the block (created at the end when missing)."""
    if machine:  # the JSON says the same as the README line, not the shared-machine default
        env = {**env, "note": machine}
    machine = machine or (f"{env['cpu_count']} CPUs ({env['cpu_model']}), "
                          f"torch threads {env['torch_threads']} (default {env['torch_threads_default']}), "
                          f"load average at start {env['load_average_at_start']}. **Machine shared with other "
                          "engineers: noisy timings; medians over interleaved repetitions, spread in brackets "
                          "(min..max).**")
    md = (f"### {title}\n\n`{command}`  \n"
          f"commit `{env['commit'][:12]}`{' (+ uncommitted changes)' if env.get('working_tree_modified') else ''}, "
          f"{env['date_utc']}, torch {env['torch']}, timm {env['timm']}, {machine}\n\n"
          f"{protocol.strip()}\n\n{tables.strip()}\n\nTargets:\n\n{verdicts.markdown()}\n\n"
          f"Overall: {'all targets met' if verdicts.exit_code == 0 else '**at least one target MISSED**'} "
          f"(raw numbers: `benchmarks/results/{name}.json`).\n")
    print("\n" + md)
    write_result(name, {"benchmark": name, "command": command, "environment": env, "targets": verdicts.items,
                        "all_targets_met": verdicts.exit_code == 0, **payload})
    if write_readme:
        update_readme(name, md, heading=heading)
    return verdicts.exit_code


def rss_mb(pid: int | str = "self") -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def require_cifar10(dest: Path | None = None) -> Path:
    """DEST/{train,val} of CIFAR-10 JPEGs, unpacked from ../shared/data on first use; exit 2 if missing."""
    dest = dest or WORK_DIR / "cifar10"
    if (dest / "train").is_dir() and (dest / "val").is_dir():
        return dest
    script = SHARED_DATA / "materialize.py"
    if not script.is_file() or not (SHARED_DATA / "cifar10").exists():
        print(f"ERROR: CIFAR-10 not found: this benchmark needs {SHARED_DATA}/cifar10 and {script} "
              "(the team's shared data folder next to the repository)", file=sys.stderr)
        sys.exit(2)
    if dest.exists() and any(dest.iterdir()):
        print(f"ERROR: {dest} exists but is incomplete; delete it and rerun", file=sys.stderr)
        sys.exit(2)
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"unpacking CIFAR-10 into {dest} ...", flush=True)
    subprocess.run([PYTHON, str(script), "cifar10", str(dest)], check=True)
    return dest


def synthetic_jpegs(root: Path, n: int) -> Path:
    """n ImageNet-sized JPEGs (448x336, smooth random colour fields plus noise) in 8 sub-folders."""
    if root.is_dir() and len(list(root.rglob("*.jpg"))) >= n:
        return root
    from concurrent.futures import ProcessPoolExecutor

    for i in range(8):
        (root / f"part{i}").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_one_jpeg, [(root, i) for i in range(n)], chunksize=64))
    print(f"  made {n} JPEGs in {root} in {time.perf_counter() - start:.1f} s", flush=True)
    return root


def _one_jpeg(job) -> None:
    import numpy as np
    from PIL import Image

    root, i = job
    rng = np.random.default_rng(i)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((448, 336), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (336, 448, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / f"part{i % 8}" / f"{i:06d}.jpg", quality=90)


def prepare_shared_data(name: str, datasets: dict, shared_data: Path, program: str) -> Path:
    """``WORK_DIR/data/<name>`` with train/ and val/, unpacked once from the team's shared folder with its
    ``materialize.py``; ``datasets[name]`` = (dataset, train images per class, val images per class; 0 = all).
    Missing data: one line on stderr naming what is missing, exit code 2."""
    def fail(message: str) -> None:
        print(f"{program}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    dest = WORK_DIR / "data" / name
    if (dest / "train").is_dir() and (dest / "val").is_dir():
        return dest
    dataset, train_per_class, val_per_class = datasets[name]
    script = shared_data / "materialize.py"
    if not script.is_file() or not (shared_data / dataset).exists():
        fail(f"{dataset} data not found: need {shared_data / dataset} and {script} (pass --shared-data DIR)")
    if dest.exists() and any(dest.iterdir()):
        fail(f"{dest} exists but has no train/ and val/; delete it and rerun")
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"unpacking {name} into {dest} ...", flush=True)
    subprocess.run([sys.executable, str(script), dataset, str(dest), "--train-per-class", str(train_per_class),
                    "--val-per-class", str(val_per_class)], check=True)
    return dest
