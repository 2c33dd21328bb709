"""Draw the documentation's pictures from committed results; nothing here trains or measures.

    python docs/make_figures.py            # writes docs/images/*.png

Sources (all committed):
- docs/data/quickstart/metrics.jsonl: one `swavkit pretrain` quickstart run on the bundled sample, with its
  online k-NN rows and their random-init and raw-pixel floors;
- docs/data/quickstart/assignments.csv: `swavkit cluster` of that run on the sample's val split;
- benchmarks/results/eval-*-auto-*.json: k-NN after a time budget, with its random-init and raw-pixel floors;
- benchmarks/results/step_overhead.json: the swavkit step against the bare backbone step;
- benchmarks/results/memory_scale.json: bytes per process for DDP, FSDP and activation checkpointing.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO / "docs" / "data"
OUT = REPO / "docs" / "images"
DPI = 100


def _save(fig, name: str) -> None:
    fig.tight_layout()
    fig.savefig(OUT / name, dpi=DPI)
    plt.close(fig)
    print(f"wrote {OUT / name}")


def quickstart_curves() -> None:
    rows = [json.loads(line) for line in (DATA / "quickstart" / "metrics.jsonl").read_text().splitlines() if line]
    knn_rows = [r for r in rows if r.get("knn_top1") is not None]
    floors = {"random_init": knn_rows[0]["knn_top1_random_init"], "raw_pixels": knn_rows[0]["knn_top1_raw_pixels"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = [r for r in rows if "loss" in r]
    left.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    left.axhline(rows[0]["ln_k"], color="grey", linestyle="--", label=f"ln K = {rows[0]['ln_k']:.2f} (uniform codes)")
    left.set_xlabel("step")
    left.set_ylabel("swapped-prediction loss")
    left.set_title("loss falls below ln K: the codes carry information")
    left.legend()
    knn = [(r["epoch"], r["knn_top1"]) for r in knn_rows]
    right.plot([0] + [e for e, _ in knn], [floors["random_init"]] + [v for _, v in knn], marker="o", label="online 20-NN")
    right.axhline(floors["random_init"], color="tab:red", linestyle="--", label=f"random init {floors['random_init']:.1f} %")
    right.axhline(floors["raw_pixels"], color="tab:green", linestyle=":", label=f"raw pixels {floors['raw_pixels']:.1f} %")
    right.set_xlabel("epoch")
    right.set_ylabel("20-NN top-1 on the sample's val split (%)")
    right.set_title("online k-NN against its floors")
    right.legend(loc="lower right")
    _save(fig, "quickstart_curves.png")


def knn_vs_budget() -> None:
    by_data: dict[str, list] = defaultdict(list)
    for path in sorted(RESULTS.glob("eval-*-auto-*m.json")):
        result = json.loads(path.read_text())
        rows = {row["label"].split(",")[0]: row for row in result["rows"]}
        swav = next(row for label, row in rows.items() if label.startswith("SwAV"))
        random_init = next(row for label, row in rows.items() if "random init" in label)
        by_data[result["data"]].append((result["pretraining"]["budget_minutes"], swav["knn"]["metrics"]["top1"],
                                        random_init["knn"]["metrics"]["top1"],
                                        rows["raw pixels"]["knn"]["metrics"]["top1"]))
    fig, axes = plt.subplots(1, len(by_data), figsize=(5 * len(by_data), 3.6), squeeze=False)
    for ax, (data, points) in zip(axes[0], sorted(by_data.items())):
        points.sort()
        minutes = [p[0] for p in points]
        ax.plot(minutes, [p[1] for p in points], marker="o", label="swavkit --auto --budget")
        ax.plot(minutes, [p[2] for p in points], color="tab:red", linestyle="--", marker="x", label="random init (floor)")
        ax.plot(minutes, [p[3] for p in points], color="tab:green", linestyle=":", marker="x", label="raw pixels (floor)")
        ax.set_xticks(minutes)
        ax.set_xlabel("pretraining budget on 2 CPU cores (minutes)")
        ax.set_ylabel("20-NN top-1 (%)")
        ax.set_title(data)
        ax.legend(loc="lower right", fontsize=8)
    _save(fig, "knn_vs_budget.png")


def step_vs_backbone() -> None:
    result = json.loads((RESULTS / "step_overhead.json").read_text())
    arms = [("bare", "bare backbone step"), ("model", "+ head + prototypes"), ("swavkit", "swavkit step")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.25
    names = list(result["results"])
    for i, (arm, label) in enumerate(arms):
        xs, medians, errors = [], [], [[], []]
        for j, name in enumerate(names):
            seconds = result["results"][name]["seconds_per_step"].get(arm)
            if seconds is None:
                continue
            bare = result["results"][name]["seconds_per_step"]["bare"]["median"]
            xs.append(j + (i - 1) * width)
            medians.append(seconds["median"] / bare)
            errors[0].append((seconds["median"] - seconds["min"]) / bare)
            errors[1].append((seconds["max"] - seconds["median"]) / bare)
        ax.bar(xs, medians, width, yerr=errors, capsize=3, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n{result['results'][n]['config']['counts']} x {result['results'][n]['config']['sizes']} px"
                        for n in names])
    ax.set_ylabel("step time / bare backbone step")
    ax.set_ylim(0.8, None)
    ax.set_title("training step against the bare backbone (CPU, median, min-max)")
    ax.legend(fontsize=8)
    _save(fig, "step_vs_backbone.png")


def memory_per_process() -> None:
    result = json.loads((RESULTS / "memory_scale.json").read_text())
    arms = [a for a in result["arms"] if a["processes"] == 2]
    labels = [f"{a['strategy'].upper()}\ncheckpointing {a['activation_checkpointing']}" for a in arms]
    state = [a["params_grads_optimizer_mib"] for a in arms]
    activations = [a["activation_mib"] for a in arms]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(labels, state, label="parameters + gradients + optimiser")
    ax.bar(labels, activations, bottom=state, label="activations kept for backward")
    for x, (s, a) in enumerate(zip(state, activations)):
        ax.text(x, s + a + 2, f"{s + a:.0f} MiB", ha="center")
    config = result["config"]
    ax.set_ylim(0, 1.2 * max(s + a for s, a in zip(state, activations)))
    ax.set_ylabel("MiB per process")
    ax.set_title(f"2 processes, {config['backbone']}, batch {config['batch']} per process")
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, "memory_per_process.png")


def cluster_grid(clusters: int = 6, per_cluster: int = 8) -> None:
    """The most confident images of the largest clusters, one row each (what index.html shows)."""
    members: dict[str, list] = defaultdict(list)
    with open(DATA / "quickstart" / "assignments.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            members[row["cluster"]].append((float(row["confidence"]), row["path"]))
    largest = sorted(members, key=lambda c: -len(members[c]))[:clusters]
    fig, axes = plt.subplots(len(largest), per_cluster, figsize=(per_cluster * 0.9, len(largest) * 1.0))
    for r, cluster in enumerate(largest):
        best = sorted(members[cluster], reverse=True)[:per_cluster]
        for c in range(per_cluster):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(best):
                ax.imshow(Image.open(REPO / best[c][1]).convert("L"), cmap="gray")
        axes[r][0].set_title(f"cluster {cluster} ({len(members[cluster])} images)", fontsize=7, loc="left")
    _save(fig, "cluster_grid.png")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    quickstart_curves()
    knn_vs_budget()
    step_vs_backbone()
    memory_per_process()
    cluster_grid()


if __name__ == "__main__":
    main()
