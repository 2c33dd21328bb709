"""The ``README.md`` model card of an exported backbone folder.

With the card, an export folder (timm's ``config.json`` + ``model.safetensors``) is ready for the Hugging
Face Hub as it is: the YAML front matter says ``library_name: timm`` (the Hub then shows timm's loading
snippet), the body gives the architecture, how to load it, the resolved recipe, the data, the training
length and every benchmark result recorded for the backbone next to its floors.

The licence is never guessed: it depends on the training images, so the ``license:`` line is left for
the user (commented out, because the Hub refuses a card whose ``license`` value is empty or unknown).
A card swavkit wrote carries :data:`MODEL_CARD_MARKER` on the line after the front matter; a README
without it is the user's and is never replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from swavkit.artifacts.layout import RUN_EXPORT_DIR
from swavkit.data.constants import eval_size_px

MODEL_CARD_MARKER = "<!-- swavkit model card -->"
MODEL_CARD_FILE = "README.md"
RESULT_SCHEMA = "swavkit-eval-v1"  # = swavkit.evaluation.report.RESULT_SCHEMA (not imported: report imports torch)
RAW_PIXELS_SOURCE = "pixels"  # = swavkit.evaluation.features.RAW_PIXELS_SOURCE
HUB_TAGS = ("image-feature-extraction", "self-supervised-learning", "swav", "swavkit", "timm")
PLACEHOLDER_FOLDER = "path/to/backbone"
PLACEHOLDER_REPO = "YOUR-NAME/YOUR-MODEL"


def _front_matter(architecture: str, license: str | None) -> str:
    data = {"library_name": "timm", "pipeline_tag": "image-feature-extraction",
            "tags": [*HUB_TAGS, architecture]}
    if license:
        data["license"] = license
    text = yaml.safe_dump(data, sort_keys=False)
    if not license:
        text += ("# license: FILL IN before sharing (e.g. apache-2.0, mit, cc-by-4.0, cc-by-nc-4.0, other): the "
                 "weights' licence depends on the training images\n")
    return f"---\n{text}---\n{MODEL_CARD_MARKER}\n"


def _table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value) -> str:
        return "-" if value is None or value == "" else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _short_path(path: str) -> str:
    """The last two parts of a path ("fmnist/train"): names the data without the trainer's home folders."""
    return "/".join(Path(path).parts[-2:]) if path else "?"


def _get(config: dict | None, dotted: str):
    node = config or {}
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------------------
# sections

def _architecture_section(architecture: str, config: dict | None, feature_dim: int | None,
                          image_size_px: int, mean, std) -> str:
    rows = [["timm architecture", f"`{architecture}` (created with `num_classes=0`: pooled features, no "
                                  "classifier)"],
            ["feature dimension", feature_dim],
            ["input", f"{'RGB' if len(mean) == 3 else f'{len(mean)} channel(s)'}, {image_size_px} x {image_size_px} px"
                      + (", 16-bit" if config and _get(config, "data.bit_depth") == 16 else "")
                      + ", normalised with mean "
                      f"{[round(m, 4) for m in mean]} and std {[round(s, 4) for s in std]}"]]
    if config:
        hidden, out, k = (_get(config, f"model.{key}") for key in ("hidden_dim", "output_dim", "n_prototypes"))
        widths = _get(config, "model.head_dims") or ([hidden] if hidden else [])
        bn = "" if _get(config, "model.head_bn") in (None, True) or not widths else " (no BN)"
        rows.append(["training head (not in this folder)",
                     f"projection {' -> '.join(map(str, widths)) or '-'}{bn} -> {out}-d, L2-normalised, {k} "
                     "prototypes; only the backbone is exported"])
    return "## Architecture\n\n" + _table(["", ""], rows)


def _loading_section(folder_path: str, image_size_px: int) -> str:
    return f"""## How to load

With timm, from this folder (or from the Hub once uploaded, `"hf-hub:{PLACEHOLDER_REPO}"`):

```python
import timm

model = timm.create_model("local-dir:{folder_path}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)  # {image_size_px} px input, this folder's mean/std
transform = timm.data.create_transform(**config)
features = model(transform(image).unsqueeze(0))  # [1, num_features]
```

With swavkit (strict loading: a missing or unexpected weight is an error, never a silent random init):

```python
import swavkit

backbone = swavkit.load_backbone("{folder_path}")
```

Evaluate it the way the results below were measured:
`swavkit knn --backbone {folder_path} --train TRAIN_DIR --val VAL_DIR`."""


def _recipe_section(config: dict | None, training: dict | None) -> str:
    if not config:
        return "## Training recipe\n\nNot recorded for this export."
    training = training or {}
    # the config may say "auto" / 0 (= the reference value); training holds what these were resolved to
    optimizer = training.get("optimizer") or _get(config, "optim.optimizer")
    lr = (f"peak LR {training['peak_lr']:g}" if training.get("peak_lr") else
          f"base LR {_get(config, 'optim.base_lr')} at batch {_get(config, 'optim.reference_batch_size')}")
    counts, sizes = _get(config, "crops.counts") or [], _get(config, "crops.sizes_px") or []
    queue = _get(config, "swav.queue_length")
    rows = [["multi-crop", " + ".join(f"{c} x {s} px" for c, s in zip(counts, sizes))],
            ["prototypes K", _get(config, "model.n_prototypes")],
            ["Sinkhorn epsilon / iterations", f"{_get(config, 'swav.epsilon')} / "
                                             f"{_get(config, 'swav.sinkhorn_iterations')}"],
            ["temperature", _get(config, "swav.temperature")],
            ["queue", f"{queue} embeddings from epoch {_get(config, 'swav.queue_start_epoch')}" if queue else "off"],
            ["optimiser", f"{optimizer}, {lr}, weight decay {_get(config, 'optim.weight_decay')}"],
            ["global batch / epochs", f"{_get(config, 'train.batch_size')} / {_get(config, 'train.epochs')}"],
            ["precision", _get(config, "train.precision")], ["seed", _get(config, "seed")]]
    resolved = yaml.safe_dump(config, sort_keys=False).rstrip()
    return ("## Training recipe\n\nSwAV (Caron et al., 2020) trained with swavkit. The main settings:\n\n"
            + _table(["setting", "value"], rows)
            + "\n\n<details>\n<summary>The resolved configuration (<code>swavkit pretrain --config</code> "
              "accepts it as is)</summary>\n\n```yaml\n" + resolved + "\n```\n\n</details>")


def _data_section(data: dict | None) -> str:
    if not data:
        return "## Training data\n\nNot recorded for this export."
    path = str(data.get("path") or "")
    where = (f"the folder `{_short_path(path)}`" if path
             else "the Fashion-MNIST sample bundled with swavkit (MIT licence)")
    count = data.get("n_images")
    text = f"Self-supervised (no labels) on {f'{count:,} images' if count is not None else 'the images'} of {where}."
    if data.get("description"):
        text += f" {data['description']}"
    return "## Training data\n\n" + text


def _training_section(training: dict | None) -> str:
    if not training:
        return "## Training length\n\nNot recorded for this export."
    rows = [["optimisation steps", training.get("steps")], ["epochs", training.get("epochs")]]
    if training.get("global_batch_size") and training.get("steps"):
        rows.append(["images seen (steps x global batch)", f"{training['steps'] * training['global_batch_size']:,}"])
    loss, ln_k = training.get("final_loss"), training.get("ln_k")
    if loss is not None:
        verdict = ""
        if ln_k:
            verdict = f" ({100 * (1 - loss / ln_k):.1f} % below ln K = {ln_k:.3f}, the level of a collapsed run)"
        rows.append(["final loss", f"{loss:.4f}{verdict}"])
    if training.get("wall_time_s") is not None:
        rows.append(["wall time", f"{training['wall_time_s'] / 3600:.2f} h"])
    if training.get("device"):
        rows.append(["hardware", training["device"]])
    return "## Training length\n\n" + _table(["", ""], rows)


def _metric(record: dict, key: str) -> float | None:
    value = (record.get("metrics") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _floor_kind(record: dict) -> str | None:
    source = str((record.get("backbone") or {}).get("source", ""))
    if source == RAW_PIXELS_SOURCE:
        return "raw pixels"
    if source.startswith("timm:"):
        return "random init"
    return None


def _protocol(record: dict) -> str:
    protocol, evaluation = record.get("protocol") or {}, record.get("evaluation", "?")
    if evaluation == "knn":
        return f"k-NN (k={protocol.get('k')}, T={protocol.get('temperature')})"
    if evaluation == "linear":
        return f"linear probe ({protocol.get('recipe', '?')} recipe)"
    extra = ", ".join(f"{key} {protocol[key]}" for key in ("label_fraction", "epochs") if key in protocol)
    return f"{evaluation} ({extra})" if extra else str(evaluation)


def _embedded_floors(record: dict) -> dict[str, float]:
    """``record["floors"]`` as {name: top-1 %}; each value a number, a {"top1": x} dict or a result record."""
    floors = {}
    for name, value in (record.get("floors") or {}).items():
        if isinstance(value, dict):
            value = _metric(value, "top1") if "metrics" in value else value.get("top1")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            floors[str(name).replace("_", " ")] = float(value)
    return floors


def _embedded_baselines(record: dict) -> dict[str, float]:
    """``record["baselines"]`` (swavkit.evaluation.baselines) as {shown name: top-1 %}."""
    return {str(value.get("name", name)): float(value["top1"]) for name, value in (record.get("baselines") or {}).items()
            if isinstance(value, dict) and isinstance(value.get("top1"), (int, float))}


def _results_section(results: list[dict]) -> str:
    if not results:
        return ("## Benchmark results\n\nNone recorded yet. Measure them with `swavkit knn` / `swavkit linear` "
                "(each writes a JSON record with its protocol) and export again to list them here.")
    rows, verdicts = [], []
    for record in results:
        data, prep = record.get("data") or {}, record.get("preprocessing") or {}
        top1, floor = _metric(record, "top1"), _floor_kind(record)
        floors = _embedded_floors(record)
        below = [name for name, value in floors.items() if top1 is not None and top1 <= value]
        rows.append([
            f"{floor} (floor)" if floor else "this backbone", _protocol(record),
            f"`{_short_path(str(data.get('val_dir') or ''))}`: {data.get('n_train', '?')} train / "
            f"{data.get('n_val', '?')} val, {data.get('n_classes', '?')} classes",
            prep.get("image_size_px"), f"{top1:.2f}" if top1 is not None else None,
            f"{_metric(record, 'top5'):.2f}" if _metric(record, "top5") is not None else None,
            ", ".join(f"{name} {value:.2f}" for name, value in floors.items()) or None,
            ", ".join(f"{name} {value:.2f}" for name, value in _embedded_baselines(record).items()) or None,
            ("**not above the " + " and ".join(below) + " floor**") if below else None])
        if record.get("verdict"):
            verdicts.append(f"- {_protocol(record)}: {record['verdict']}")
    return ("## Benchmark results\n\nTop-1 / top-5 accuracy in %, frozen features unless the protocol says "
            "otherwise. The floors are what the same protocol gives without SwAV: the same architecture "
            "randomly initialised, and raw pixels. A number is only worth what it adds above them. The baselines "
            "are other weights (e.g. downloadable ImageNet ones) measured with the same data, image size and "
            "protocol: what the pretraining had to beat.\n\n"
            + _table(["backbone", "protocol", "data", "image px", "top-1", "top-5", "floors (top-1)",
                      "baselines (top-1)", "note"], rows)
            + ("\n\n" + "\n".join(verdicts) if verdicts else ""))


def _use_section(image_size_px: int) -> str:
    return f"""## Intended use and limitations

- A feature extractor: k-NN retrieval, clustering, linear probes and fine-tuning on images like the
  training images. It has no classifier and predicts no labels by itself.
- It learned from the training images only, without labels: it carries their biases and has not been
  evaluated for fairness or safety. Check it on your own data before relying on it.
- Features are best at the training resolution ({image_size_px} px); other sizes usually score lower.
- The benchmark numbers hold for the listed data, image size and protocol only.

## Licence

Fill in the `license:` line at the top of this file before sharing: the licence of the weights depends on
the licence of the training images."""


def _upload_section(folder_path: str) -> str:
    return f"""## Upload to the Hugging Face Hub

This folder is already in the Hub's timm layout (`config.json`, `model.safetensors`, this `README.md`).
After `huggingface-cli login` (or with `HF_TOKEN` set):

```python
from huggingface_hub import HfApi

HfApi().create_repo("{PLACEHOLDER_REPO}", exist_ok=True)  # once
HfApi().upload_folder(folder_path="{folder_path}", repo_id="{PLACEHOLDER_REPO}")
```"""


CITATION = """## Citation

```bibtex
@inproceedings{caron2020swav,
  title     = {Unsupervised Learning of Visual Features by Contrasting Cluster Assignments},
  author    = {Caron, Mathilde and Misra, Ishan and Mairal, Julien and Goyal, Priya and Bojanowski, Piotr
               and Joulin, Armand},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2020}
}
```"""


# ----------------------------------------------------------------------------------------------------

def render_model_card(*, architecture: str, config: dict | None, data: dict | None, training: dict | None,
                      results: list[dict], image_size_px: int, mean, std, feature_dim: int | None = None,
                      license: str | None = None, folder_path: str | Path | None = None) -> str:
    """The text of ``README.md`` for an exported backbone folder.

    Args:
        architecture: timm model name, e.g. "resnet50".
        config: the resolved training config (``swavkit.config.to_dict(cfg)``), or None when unknown.
        data: {"path": training folder ("" = the bundled sample), "n_images": int, "description": optional}.
        training: {"steps", "epochs", "final_loss", "ln_k", optional "global_batch_size", "wall_time_s",
            "device", and "optimizer" / "peak_lr" as resolved from "auto" / 0 in the config}.
        results: evaluation records as ``swavkit knn`` / ``linear`` write them (swavkit.evaluation.report.RESULT_KEYS);
            records of ``timm:<name>`` or ``pixels`` are shown as floors, and a record's own ``"floors"``
            ({name: top-1 % | {"top1": x} | record}) fills its floors column, its ``"baselines"`` the baselines
            column and its ``"verdict"`` a line below the table.
        image_size_px, mean, std: the input the backbone was trained with.
        feature_dim: the backbone's pooled feature size, when known.
        license: a Hub licence id; None leaves the line for the user to fill.
        folder_path: where the folder is, for the loading snippets (default a placeholder).
    """
    folder = str(folder_path) if folder_path is not None else PLACEHOLDER_FOLDER
    title = f"# {architecture} pretrained with SwAV (swavkit)\n\n" \
            f"A `{architecture}` backbone trained without labels by SwAV's online clustering (swapped " \
            "prediction of Sinkhorn codes), exported in timm's layout."
    sections = [title, _architecture_section(architecture, config, feature_dim, image_size_px, mean, std),
                _loading_section(folder, image_size_px), _data_section(data), _training_section(training),
                _recipe_section(config, training), _results_section(list(results)), _use_section(image_size_px),
                _upload_section(folder), CITATION]
    return _front_matter(architecture, license) + "\n" + "\n\n".join(sections) + "\n"


def card_for_training(config: dict, *, architecture: str, feature_dim: int | None, backbone_dir: str | Path,
                      steps: int | None, final_loss: float | None, n_images: int | None = None,
                      extra_training: dict | None = None, run_dir: str | Path | None = None) -> str:
    """The card of a backbone trained by swavkit, from its resolved config (``to_dict(cfg)``) and how far it
    got; the results are those already recorded under ``results/`` for ``backbone_dir`` or for the run
    folder it was exported from (``run_dir``)."""
    import math

    results, seen = [], set()
    for folder in [backbone_dir] + ([Path(run_dir) / RUN_EXPORT_DIR] if run_dir else []):  # also matches run_dir
        for record in results_for_backbone(folder):
            key = (record.get("evaluation"), str(record.get("backbone", {}).get("source")), record.get("started_at"))
            if key not in seen:
                seen.add(key)
                results.append(record)

    training = {"steps": steps, "epochs": _get(config, "train.epochs"), "final_loss": final_loss,
                "ln_k": math.log(_get(config, "model.n_prototypes")),
                "global_batch_size": _get(config, "train.batch_size"), **(extra_training or {})}
    crops = config["crops"]
    return render_model_card(architecture=architecture, config=config,
                             data={"path": _get(config, "data.path"), "n_images": n_images}, training=training,
                             results=results, image_size_px=eval_size_px(crops["sizes_px"]),
                             mean=crops["mean"], std=crops["std"], feature_dim=feature_dim, folder_path=backbone_dir)


def is_swavkit_model_card(path: str | Path) -> bool:
    """True when ``path`` is a README that swavkit wrote: front matter, then :data:`MODEL_CARD_MARKER`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        return False
    end = lines.index("---", 1)
    return end + 1 < len(lines) and lines[end + 1] == MODEL_CARD_MARKER


def front_matter(text: str) -> dict:
    """The YAML metadata between the first two ``---`` lines of a card (what the Hub reads)."""
    lines = text.splitlines()
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        return {}
    return yaml.safe_load("\n".join(lines[1:lines.index("---", 1)])) or {}


def results_for_backbone(backbone_dir: str | Path, results_dir: str | Path = "results") -> list[dict]:
    """The result records in ``results_dir/*.json`` measured on this export (its folder or its run folder),
    followed by the floor records (``timm:<same architecture>``, ``pixels``) measured on the same validation
    folder at the same image size. Unreadable or foreign JSON files are skipped."""
    backbone_dir = Path(backbone_dir).resolve()
    ours = {backbone_dir, backbone_dir.parent} if backbone_dir.name == "backbone" else {backbone_dir}
    records = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("schema") == RESULT_SCHEMA:
            records.append(record)

    def source_path(record):
        source = str((record.get("backbone") or {}).get("source", ""))
        return None if _floor_kind(record) or not source else Path(source).resolve()

    own = [record for record in records if source_path(record) in ours]
    settings = {(str((r.get("data") or {}).get("val_dir")), (r.get("preprocessing") or {}).get("image_size_px"),
                 (r.get("backbone") or {}).get("architecture")) for r in own}
    floors = [record for record in records if _floor_kind(record) and any(
        str((record.get("data") or {}).get("val_dir")) == val_dir
        and (record.get("preprocessing") or {}).get("image_size_px") == size
        and (_floor_kind(record) == "raw pixels" or (record.get("backbone") or {}).get("architecture") == arch)
        for val_dir, size, arch in settings)]
    return own + floors


__all__ = ["MODEL_CARD_MARKER", "MODEL_CARD_FILE", "render_model_card", "card_for_training", "is_swavkit_model_card", "front_matter",
           "results_for_backbone"]
