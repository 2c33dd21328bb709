"""Load backbones from anything a user has: an exported folder, a swavkit training checkpoint, a released
SwAV checkpoint (``module.``-prefixed, with ``projection_head.*`` / ``prototypes.*``), VISSL trunk
weights, or ``timm:<name>`` (random init, the floor of every benchmark). Loading is always strict:
a key mismatch raises :class:`LoadError` listing the keys, never silently random weights.

:func:`resolve_source` is the one place that says what a source names (a run folder, an export, a file);
:func:`load_initial_backbone_state` gives the starting weights of ``model.init``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import timm
from safetensors.torch import load_file, save

from swavkit.errors import UserError
from swavkit.artifacts.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, backbone_state, check_export_target,
                                export_backbone, load_state)
from swavkit.config import from_dict, head_hidden_dims, prototype_rows
from swavkit.core.model import SwAVModel, build_model, create_backbone
from swavkit.artifacts.modelcard import card_for_training
from swavkit.artifacts.seer import is_vissl_regnet, vissl_regnet_to_timm
from swavkit.artifacts.sharded_checkpoint import with_model_tensors
from swavkit.data.constants import DEFAULT_IMAGE_SIZE_PX, IMAGENET_MEAN, IMAGENET_STD, eval_size_px
from swavkit.artifacts.layout import EXPORT_CONFIG, EXPORT_WEIGHTS, RUN_CHECKPOINT, RUN_EXPORT_DIR, holds_export, run_folder_of
from swavkit.runtime.fileio import atomic_writer


class LoadError(UserError, RuntimeError):
    """The weights do not fit the model, or the source is not a checkpoint swavkit can read; the message
    names the source and lists the missing, unexpected and mis-shaped keys. Loading never falls back to
    random weights. The command line prints it as one line and exits with code 2.

    Example:
        >>> import swavkit
        >>> try:
        ...     swavkit.load_backbone("no/such/run")
        ... except (swavkit.LoadError, FileNotFoundError) as err:
        ...     print(type(err).__name__)
        LoadError
    """


def _describe_keys(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def key_mismatch(expected: dict, state: dict) -> str:
    """"" when ``state`` has exactly the keys and shapes of ``expected`` (a state dict), else one line
    naming the missing, unexpected and mis-shaped keys."""
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    wrong_shape = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys: {_describe_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
    if wrong_shape:
        parts.append("wrong shapes: " + _describe_keys(
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape))
    return "; ".join(parts)


def load_strict(module: torch.nn.Module, state: dict, source: str) -> torch.nn.Module:
    """``load_state_dict(strict=True)`` with a one-line error naming missing/unexpected/mis-shaped keys."""
    problems = key_mismatch(module.state_dict(), state)
    if problems:
        raise LoadError(f"{source} does not fit {type(module).__name__}: {problems}")
    module.load_state_dict(state, strict=True)
    return module


# ----------------------------------------------------------------------------------------------------
# released checkpoint layouts

_STRIP_PREFIXES = ("module.", "_feature_blocks.", "trunk.", "base_model.", "backbone.", "model.")
_HEAD_PREFIXES = ("projection_head.", "prototypes.", "heads.", "head.")


def _unwrap_container(state: dict) -> dict:
    """Find the tensor dict inside the usual wrappers: state_dict / model / VISSL classy_state_dict."""
    for path in (("classy_state_dict", "base_model", "model", "trunk"), ("model", "trunk"), ("state_dict",),
                 ("model",), ("teacher",)):
        node = state
        for key in path:
            if isinstance(node, dict) and key in node:
                node = node[key]
            else:
                node = None
                break
        if isinstance(node, dict) and node and all(isinstance(v, torch.Tensor) for v in node.values()):
            return node
    return state


def split_reference_state(state: dict) -> tuple[dict, dict]:
    """Released SwAV / VISSL weights -> (backbone state in timm/torchvision ResNet names, head state).

    The head state holds ``projection_head.*`` and ``prototypes.*`` with prefixes stripped, so it can be
    loaded into a :class:`SwAVModel`.
    """
    tensors = _unwrap_container(state)
    if is_vissl_regnet(tensors):  # SEER: VISSL's RegNet trunk names, mapped as timm maps them
        return vissl_regnet_to_timm(tensors), {}
    backbone, head = {}, {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = key
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        if name.startswith(_HEAD_PREFIXES):
            head[name] = value
        elif not name.startswith("fc."):  # a supervised classifier is not part of the backbone
            backbone[name] = value
    return backbone, head


def _reference_head_to_swavkit(head: dict) -> dict:
    """projection_head.{0,1,3} / prototypes.weight -> SwAVModel's head.layers.* / prototypes.weight. Several
    heads (DeepCluster-v2, SeLa-v2: prototypes.prototypes0.weight, 1, 2 ...) become one prototypes.weight, head
    after head, as a swavkit method=deepclusterv2 model holds them."""
    out, heads = {}, {}
    for key, value in head.items():
        if key.startswith("projection_head."):
            out["head.layers." + key[len("projection_head."):]] = value
        elif key.startswith("prototypes.prototypes") and key.endswith(".weight"):
            heads[int(key[len("prototypes.prototypes"):-len(".weight")])] = value
        elif key.startswith("prototypes."):
            out["prototypes." + key[len("prototypes."):]] = value
    if heads:
        out["prototypes.weight"] = torch.cat([heads[i] for i in sorted(heads)])
    return out


# ----------------------------------------------------------------------------------------------------
# public API

def resolve_source(source: str | Path, *, need: str = "backbone") -> Path:
    """The file or folder that holds the weights a source names; the one meaning of a source argument for
    ``load_backbone``, ``load_swav_model``, ``model.init``, ``swavkit knn|linear|export|cluster``.

    Args:
        source: an exported folder (``config.json`` + ``model.safetensors``), a run folder (a training
            ``out_dir``) or its ``checkpoints/`` folder, or a file (swavkit checkpoint, released SwAV/VISSL).
        need: "backbone" - a run folder gives its ``backbone/`` export when there is one (a finished run),
            else ``checkpoints/last.pt``; "checkpoint" - the head, prototypes or training state are needed,
            so a run folder gives ``checkpoints/last.pt`` and an export folder is refused.
    Raises:
        LoadError: the path does not exist, or a folder holds none of the above (the message says what).
    """
    if need not in ("backbone", "checkpoint"):
        raise ValueError(f"need: 'backbone' or 'checkpoint', got {need!r}")
    path = Path(source)
    if not path.exists():
        raise LoadError(f"{path} does not exist; give a run folder (out_dir), an exported backbone folder or a "
                        "checkpoint file")
    if not path.is_dir():
        return path
    if holds_export(path):
        if need == "checkpoint":
            raise LoadError(f"{path} is an exported backbone (no head, prototypes or training state); give the run "
                            f"folder or its {RUN_CHECKPOINT}")
        return path
    if need == "backbone" and holds_export(path / RUN_EXPORT_DIR):
        return path / RUN_EXPORT_DIR
    for candidate in (path / RUN_CHECKPOINT, path / RUN_CHECKPOINT.name):  # a run folder, or its checkpoints/
        if candidate.is_file():
            return candidate
    wanted = f"{RUN_EXPORT_DIR}/ or {RUN_CHECKPOINT}" if need == "backbone" else str(RUN_CHECKPOINT)
    raise LoadError(f"{path}: a folder without config.json + model.safetensors and without {wanted}; give a run "
                    "folder (out_dir), an exported backbone folder (swavkit export RUN OUT_DIR) or a checkpoint file")


def load_backbone(source: str | Path, *, architecture: str = "resnet50") -> torch.nn.Module:
    """A timm backbone (num_classes=0, eval mode) from any supported source.

    Args:
        source: an exported folder (``config.json`` + ``model.safetensors``), a swavkit run folder
            (its ``backbone/``, else its ``checkpoints/last.pt``; see :func:`resolve_source`), a swavkit
            training checkpoint (``.pt``), a released SwAV or VISSL checkpoint (``.pth``/``.torch``/``.tar``),
            ``timm:<name>`` for random init, or a timm pretrained name (``resnet50.a1_in1k``) whose weights are
            already in the local timm / Hugging Face cache (never downloaded; LoadError saying how to fetch them).
        architecture: timm name for released checkpoints, which do not record it (default resnet50).

    Returns:
        The timm backbone in eval mode: images [N, C, H, W] -> pooled features [N, num_features], with
        exactly the stored weights (keys checked strictly).

    Raises:
        LoadError: the source does not exist or is not a readable checkpoint, or its keys do not fit the
            architecture (the message lists the missing, unexpected and mis-shaped keys).

    Example:
        >>> import torch, swavkit
        >>> net = swavkit.load_backbone("timm:resnet10t")   # random init; a run folder or export in practice
        >>> tuple(net(torch.randn(2, 3, 32, 32)).shape), net.training
        ((2, 512), False)

        With a finished run: ``swavkit.load_backbone("runs/a")``, ``swavkit.load_backbone("runs/a/backbone")``,
        ``swavkit.load_backbone("swav_800ep_pretrain.pth.tar")`` (a released SwAV ResNet-50).
    """
    text = str(source)
    if text.startswith("timm:"):
        return create_backbone(text[len("timm:"):]).eval()
    if pretrained_timm_name(text):  # downloadable weights already on disk (--baselines), never fetched
        return cached_timm_backbone(locate_initial_source(text, what="backbone")).eval()
    path = resolve_source(text, need="backbone")
    if holds_export(path):
        try:
            config = json.loads((path / EXPORT_CONFIG).read_text())
            arch, model_args = config["architecture"], dict(config.get("model_args", {}))
        except (ValueError, KeyError) as err:
            raise LoadError(f"{path / 'config.json'}: not a timm export config ({err})") from None
        model_args["num_classes"] = 0
        net = timm.create_model(arch, pretrained=False, **model_args)
        return load_strict(net, load_file(str(path / EXPORT_WEIGHTS)), str(path)).eval()
    state = load_state(path)
    state = with_model_tensors(state, Path(path))  # an FSDP run's shards: its whole model
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        cfg = from_dict(state["config"])
        net = create_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs)
        return load_strict(net, backbone_state(state["model"]), str(path)).eval()
    backbone, _ = split_reference_state(state)
    net = create_backbone(architecture)
    return load_strict(net, backbone, f"{path} (as {architecture})").eval()


def load_swav_model(source: str | Path, *, architecture: str = "resnet50") -> tuple[SwAVModel, dict]:
    """The whole SwAVModel (backbone + head + prototypes) and the config dict it was trained with.

    Works for swavkit training checkpoints and released SwAV checkpoints (projection 2048-128,
    3000 prototypes are read from the tensor shapes).

    Args:
        source: a swavkit run folder (its ``checkpoints/last.pt``), a training checkpoint, or a released
            SwAV checkpoint.
        architecture: timm name for released checkpoints, which do not record it (default resnet50).

    Returns:
        (model, config): the :class:`SwAVModel` in eval mode, and the run's config as a nested dict (for a
        released checkpoint, the settings read from its tensors).

    Raises:
        LoadError: the source is not a checkpoint with prototypes, or its keys do not fit.

    Example:
        ```python
        model, config = swavkit.load_swav_model("runs/a")
        z, scores = model(images)               # images [B, 3, H, W] -> scores [B, K]
        clusters = scores.argmax(dim=1)         # what `swavkit cluster` assigns
        ```
    """
    path = resolve_source(source, need="checkpoint")
    state = load_state(path)
    state = with_model_tensors(state, Path(path))  # an FSDP run's shards: its whole model
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        cfg = from_dict(state["config"])
        m = cfg.model
        model = build_model(m.backbone, prototype_rows(cfg), head_hidden_dims(m), m.output_dim, m.backbone_kwargs,
                            head_bn=m.head_bn)
        return load_strict(model, state["model"], str(path)).eval(), state["config"]
    backbone, head = split_reference_state(state)
    head = _reference_head_to_swavkit(head)
    if "prototypes.weight" not in head:
        raise LoadError(f"{path} has no prototypes.weight: it holds a backbone only; use load_backbone")
    n_prototypes, output_dim = head["prototypes.weight"].shape
    linear_keys = sorted(k for k in head if k.startswith("head.layers.") and k.endswith(".weight")
                         and head[k].ndim == 2)
    hidden_dim = head[linear_keys[0]].shape[0] if len(linear_keys) > 1 else 0
    model = build_model(architecture, n_prototypes, hidden_dim, output_dim)
    full = {f"backbone.{k}": v for k, v in backbone.items()} | head
    config = {"model": {"backbone": architecture, "n_prototypes": n_prototypes, "hidden_dim": hidden_dim,
                        "output_dim": output_dim}}
    return load_strict(model, full, f"{path} (as {architecture})").eval(), config


# ----------------------------------------------------------------------------------------------------
# model.init: the starting weights of a training run

# Suffixes that make a model.init value a file name even when no such file exists (so a missing file is
# reported as missing, not as an unknown timm name).
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".tar", ".torch", ".safetensors", ".bin", ".ckpt")


@dataclass(frozen=True)
class InitialSource:
    """Where ``model.init`` weights are: kind "timm" (``path`` = the cached weight file of ``timm_name``),
    "export" (an exported folder) or "file" (a swavkit checkpoint or a released SwAV/VISSL file)."""
    kind: str
    path: Path
    timm_name: str = ""


def _timm_weight_candidates(name: str) -> tuple[list[Path], list[str]]:
    """Files where timm's pretrained weights for ``name`` would be cached, without any network access:
    (existing files, description of every place looked at)."""
    import huggingface_hub
    from huggingface_hub import constants as hf_constants

    cfg = timm.models.get_pretrained_cfg(name)
    found, places = [], []
    if cfg is None:
        return found, places
    if cfg.file:
        places.append(str(cfg.file))
        if Path(cfg.file).is_file():
            found.append(Path(cfg.file))
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = ["model.safetensors", cfg.hf_hub_filename or "pytorch_model.bin"]
        cache = hf_constants.HF_HUB_CACHE
        places.append(f"{repo} ({' or '.join(dict.fromkeys(names))}) in the Hugging Face cache {cache}")
        for filename in dict.fromkeys(names):
            cached = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=cache,
                                                            revision=revision or None)
            if isinstance(cached, str):  # None or a "known missing" marker otherwise
                found.append(Path(cached))
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        places.append(str(cached))
        if cached.is_file():
            found.append(cached)
    return found, places


def pretrained_timm_name(source: str | Path) -> str | None:
    """``source`` when it names timm pretrained weights (``resnet50.a1_in1k``; not an existing path, no
    folder separator or weight-file suffix), else None. Says nothing about whether they are on disk."""
    text = str(source)
    if (text.startswith("timm:") or Path(text).exists() or os.sep in text or "/" in text
            or text.endswith(_WEIGHT_FILE_SUFFIXES) or not timm.is_model(text)):
        return None
    pretrained_cfg = timm.models.get_pretrained_cfg(text)
    return text if pretrained_cfg is not None and pretrained_cfg.has_weights else None


def locate_initial_source(source: str | Path, what: str = "model.init") -> InitialSource:
    """What a ``model.init`` value (or another backbone source: ``what`` names it in messages) names, checked
    without loading it and without network access.

    Raises:
        LoadError: one line starting with ``what:``; for a timm name whose weights are not cached it says
            where timm looks and how to fetch them.
    """
    text = str(source)
    path = Path(text)
    if path.exists():
        resolved = resolve_source(path, need="backbone")
        return InitialSource("export" if resolved.is_dir() else "file", resolved)
    if os.sep in text or "/" in text or text.endswith(_WEIGHT_FILE_SUFFIXES):
        raise LoadError(f"{what}: {text} does not exist; give an existing export folder, run folder or "
                        "checkpoint file, or a timm pretrained name such as resnet50.a1_in1k")
    if not timm.is_model(text):
        raise LoadError(f"{what}: '{text}' is neither an existing file or folder nor a timm model name "
                        "(timm.list_pretrained() lists the names with weights)")
    pretrained_cfg = timm.models.get_pretrained_cfg(text)
    if pretrained_cfg is None or not pretrained_cfg.has_weights:
        raise LoadError(f"{what}: timm has no pretrained weights for '{text}'; see "
                        f"timm.list_pretrained('{text.split('.')[0]}*')")
    found, places = _timm_weight_candidates(text)
    if not found:
        raise LoadError(f"{what}: the weights of timm's '{text}' are not on disk (looked for "
                        f"{'; '.join(places)}); swavkit never downloads: run timm.create_model('{text}', "
                        "pretrained=True) once where there is network, or give a file")
    return InitialSource("timm", found[0], text)


def cached_timm_backbone(located: InitialSource, backbone_kwargs: dict | None = None) -> torch.nn.Module:
    """The timm backbone (num_classes=0) with the cached pretrained weights ``located`` found.

    timm itself maps the file to the model (its filter_fn, classifier removal); pointing its 'file' source
    at the cached file keeps it off the network."""
    return timm.create_model(located.timm_name, pretrained=True, num_classes=0,
                             pretrained_cfg_overlay={"file": str(located.path)}, **(backbone_kwargs or {}))


def _base_architecture(name: str) -> str:
    """timm name without its pretrained tag: resnet50.a1_in1k -> resnet50."""
    return timm.models.split_model_name_tag(name)[0]


def _state_and_architecture(located: InitialSource, backbone_kwargs: dict) -> tuple[dict, str | None]:
    """The backbone state dict a located source holds, and the architecture it records (None: unknown)."""
    if located.kind == "timm":
        return cached_timm_backbone(located, backbone_kwargs).state_dict(), located.timm_name
    if located.kind == "export":
        try:
            architecture = json.loads((located.path / EXPORT_CONFIG).read_text())["architecture"]
        except (ValueError, KeyError) as err:
            raise LoadError(f"model.init: {located.path / 'config.json'} is not a timm export config ({err})") from None
        return load_file(str(located.path / EXPORT_WEIGHTS)), architecture
    state = load_state(located.path)
    state = with_model_tensors(state, Path(located.path))  # an FSDP run's shards: its whole model
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return backbone_state(state["model"]), from_dict(state["config"]).model.backbone
    return split_reference_state(state)[0], None  # released files do not record their architecture


def load_initial_backbone_state(source: str | Path, backbone_name: str,
                                backbone_kwargs: dict | None = None) -> dict:
    """The ``model.init`` weights for a backbone ``timm.create_model(backbone_name, num_classes=0,
    **backbone_kwargs)``: a state dict whose keys and shapes match that backbone exactly.

    Args:
        source: a timm pretrained name whose weights are cached (never downloaded), an exported folder, a
            swavkit run folder or checkpoint (its backbone part), or a released SwAV/VISSL checkpoint
            (``module.``/``trunk`` prefixes stripped, head and prototypes dropped).
        backbone_name: ``model.backbone``; a source recording another architecture is refused.
        backbone_kwargs: ``model.backbone_kwargs`` (``in_chans`` ...), the keyword arguments the backbone is
            built with.

    Returns:
        The backbone's state dict (parameter and buffer name -> tensor), ready for ``load_state_dict``.

    Raises:
        LoadError: one line naming the source and the missing, unexpected or mis-shaped keys.

    Example:
        ```python
        net = swavkit.create_backbone("resnet50")
        net.load_state_dict(swavkit.load_initial_backbone_state("runs/a", "resnet50"))
        ```
    """
    backbone_kwargs = dict(backbone_kwargs or {})
    located = locate_initial_source(source)
    state, architecture = _state_and_architecture(located, backbone_kwargs)
    if architecture and _base_architecture(architecture) != _base_architecture(backbone_name):
        held = _base_architecture(architecture)
        raise LoadError(f"model.init: {source} holds a {held} backbone but model.backbone is {backbone_name}; "
                        f"set model.backbone={held}")
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = create_backbone(backbone_name, **backbone_kwargs).state_dict()
    problems = key_mismatch(expected, state)
    if problems:
        raise LoadError(f"model.init: {source} does not fit model.backbone {backbone_name}: {problems}")
    return state


def export_checkpoint(source: str | Path, out_dir: str | Path) -> Path:
    """``swavkit export``: a run folder or checkpoint -> timm-loadable ``out_dir`` (config.json,
    model.safetensors and, for swavkit runs, the README.md model card).

    Args:
        source: a swavkit run folder (its ``checkpoints/last.pt``), a training checkpoint, or a released
            SwAV/VISSL checkpoint.
        out_dir: a new or empty folder, or an earlier export (replaced in one atomic step); any other
            folder is refused before anything is loaded.

    Returns:
        ``out_dir`` as a Path; ``timm.create_model(f"local-dir:{out_dir}", pretrained=True)`` loads it.

    Raises:
        LoadError: the source cannot be read or does not fit its architecture.
        CheckpointError: ``out_dir`` is a file, or holds files that are not an earlier export.

    Example:
        ```python
        out = swavkit.export_checkpoint("runs/a", "exports/a")
        net = timm.create_model(f"local-dir:{out}", pretrained=True)
        ```
    """
    check_export_target(out_dir)  # before any loading: a refused target should fail fast
    checkpoint = resolve_source(source, need="checkpoint")
    state = load_state(checkpoint)
    state = with_model_tensors(state, Path(checkpoint))  # an FSDP run's shards: its whole model
    if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT):
        backbone = load_backbone(checkpoint)
        return export_backbone(backbone, out_dir, image_size_px=DEFAULT_IMAGE_SIZE_PX, mean=IMAGENET_MEAN,
                               std=IMAGENET_STD)
    cfg = from_dict(state["config"])
    net = create_backbone(cfg.model.backbone, **cfg.model.backbone_kwargs)
    load_strict(net, backbone_state(state["model"]), str(checkpoint))
    card = card_for_training(state["config"], architecture=cfg.model.backbone, feature_dim=net.num_features,
                             backbone_dir=out_dir, steps=int(state["step"]),
                             final_loss=float(state.get("last_loss", float("nan"))),
                             run_dir=run_folder_of(checkpoint))
    return export_backbone(net, out_dir, image_size_px=eval_size_px(cfg.crops.sizes_px), mean=cfg.crops.mean,
                           std=cfg.crops.std, model_card=card, bit_depth=cfg.data.bit_depth)


def export_torchvision(source: str | Path, out_file: str | Path, state: dict | None = None) -> Path:
    """Backbone weights in torchvision's ResNet key layout (``conv1``, ``layer1.0.downsample.0`` ...).

    timm's plain ResNets already use torchvision's names; the file has no ``fc.*``, so load it with
    ``model.fc = torch.nn.Identity(); model.load_state_dict(load_file(path))`` (strict). ``state``: the
    result of :func:`torchvision_state` when it was checked already.
    """

    state = state if state is not None else torchvision_state(source)
    with atomic_writer(out_file) as handle:
        handle.write(save(state))
    return Path(out_file)


def torchvision_state(source: str | Path) -> dict:
    """The backbone's weights after a strict load into torchvision's model of the same name, so a backbone
    torchvision cannot represent (resnet10t's deep stem, a ViT ...) is refused (LoadError) instead of
    written as an unloadable file."""
    import torchvision

    net = load_backbone(source)
    architecture = getattr(net, "default_cfg", {}).get("architecture") or type(net).__name__.lower()
    builder = getattr(torchvision.models, architecture, None)
    if builder is None or not architecture.startswith(("resnet", "resnext", "wide_resnet")):
        raise LoadError(f"{source}: torchvision has no '{architecture}' ResNet, so its weights cannot be written "
                        "in torchvision's layout; use the timm export (timm.create_model('local-dir:...'))")
    target = builder(weights=None)
    target.fc = torch.nn.Identity()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    load_strict(target, state, f"{source} as torchvision {architecture}")
    return state


__all__ = ["LoadError", "CheckpointError", "load_backbone", "load_swav_model", "load_strict", "key_mismatch",
           "resolve_source", "InitialSource", "locate_initial_source", "pretrained_timm_name", "cached_timm_backbone", "load_initial_backbone_state",
           "export_checkpoint", "export_torchvision", "split_reference_state"]
