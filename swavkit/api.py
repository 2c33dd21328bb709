"""The keyword entry point for notebooks and scripts: no YAML needed.

    result = swavkit.pretrain("imgs/", "runs/a", backbone="resnet18", epochs=50, **{"swav.epsilon": 0.03})

Every keyword becomes a config key and goes through :mod:`swavkit.config` (same defaults, types and
one-line errors as YAML files and ``key=value`` overrides); ``swavkit pretrain`` builds its config here too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swavkit.config import Config, ConfigError, from_dict, merge_sources, merge_trees, validate
from swavkit.artifacts.layout import RUN_CHECKPOINT, RUN_CONFIG, RUN_CONFIG_HEADER

if TYPE_CHECKING:
    from swavkit.training.trainer import TrainResult

# Keywords that are not the last part of a config key: the words a user types first.
KEYWORD_ALIASES = {"data": "data.path", "workers": "data.num_workers"}


def quickstart_config_path() -> Path:
    """The bundled recipe used when neither a config file nor a data path is given."""
    return Path(str(resources.files("swavkit") / "presets" / "quickstart.yaml"))


def _leaf_keys(cls=Config, prefix: str = "") -> dict[str, list[str]]:
    """Last part of every config key -> the dotted keys ending with it (one each today)."""
    leaves: dict[str, list[str]] = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            for name, keys in _leaf_keys(type(default), f"{prefix}{f.name}.").items():
                leaves.setdefault(name, []).extend(keys)
        else:
            leaves.setdefault(f.name, []).append(f"{prefix}{f.name}")
    return leaves


def config_key(name: str) -> str:
    """A :func:`pretrain` keyword -> its dotted config key: dotted names pass through (checked by
    :func:`swavkit.config.from_dict`), plain names are the last part of a key (``epsilon`` ->
    ``swav.epsilon``) or an alias (``data`` -> ``data.path``, ``workers`` -> ``data.num_workers``)."""
    if "." in name:
        return name
    if name in KEYWORD_ALIASES:
        return KEYWORD_ALIASES[name]
    leaves = _leaf_keys()
    matches = leaves.get(name, [])
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"pretrain(): keyword '{name}' is ambiguous ({', '.join(matches)}); pass the dotted key, "
                          f"e.g. **{{'{matches[0]}': ...}}")
    close = difflib.get_close_matches(name, [*leaves, *KEYWORD_ALIASES], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"pretrain(): unknown keyword '{name}'{hint}; every config key is listed by "
                      "`swavkit pretrain --help-config` (dotted keys go in **{'swav.epsilon': 0.03})")


def _plain(value: Any) -> Any:
    """Paths become strings (config values are YAML types); containers are converted item by item."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def keyword_tree(keywords: dict[str, Any]) -> dict:
    """{"epochs": 3, "swav.epsilon": 0.03, "model": {...}} -> the nested dict of config keys.

    ``None`` means "not set". A section name with a mapping (``model={"backbone": "resnet18"}``) passes
    through as that section."""
    sections = {f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}
    tree: dict = {}
    for name, value in keywords.items():
        if value is None:
            continue
        if name in sections and isinstance(value, dict):
            parts = [name]
        else:
            parts = config_key(name).split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"pretrain(): '{name}' sets a key inside '{part}', which is also given a value")
        leaf = parts[-1]
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            node[leaf].update(_plain(value))
        else:
            node[leaf] = _plain(value)
    return tree


def build_config(config_files: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                 updates: dict | None = None, *, auto: bool | None = None, restart: bool = False) -> Config:
    """Defaults <- YAML files <- ``key=value`` overrides <- ``updates`` (nested dict), validated.

    With no file and no ``data.path`` anywhere, the bundled quickstart recipe on the Fashion-MNIST sample
    is used (and said so), as ``swavkit pretrain`` alone does.

    ``auto``: True derives every unset key from the data and the hardware (``--auto``); False keeps the schema
    defaults (``--no-auto``); None (the default) derives when no recipe file is given, so a plain folder gets a
    run that fits this machine, and keeps a recipe's values otherwise. A run already in ``out_dir`` (and not
    ``restart``) is never derived again: its saved config.yaml fills the unset keys, so a resume trains on.
    """
    files = list(config_files)
    tree = merge_sources(files, overrides, updates)
    if not files and not tree.get("data", {}).get("path") and not tree.get("data", {}).get("paths"):
        files = [quickstart_config_path()]
        tree = merge_sources(files, overrides, updates)
        print("swavkit: no config file and no data path given: the quickstart recipe on the bundled Fashion-MNIST "
              f"sample ({files[0]})")
        auto = bool(auto)  # the quickstart recipe is the recipe
    derive = (not files) if auto is None else auto
    if derive:
        saved = None if restart else _saved_run_config(tree)
        if saved is not None:
            return _resumed_config(saved, tree)
        from swavkit.training.presets import auto_config  # torch: only when the data is looked at

        return auto_config(tree, implicit=auto is None)
    cfg = from_dict(tree)
    validate(cfg)
    return cfg


def _saved_run_config(tree: dict) -> dict | None:
    """The config.yaml of the run in ``out_dir`` when it has a checkpoint to resume from; None otherwise."""
    import yaml

    out_dir = Path(str(tree.get("out_dir") or Config().out_dir)).expanduser()  # as training reads it
    if not (out_dir / RUN_CHECKPOINT).is_file() or not (out_dir / RUN_CONFIG).is_file():
        return None
    try:
        text = (out_dir / RUN_CONFIG).read_text(encoding="utf-8")
        # only swavkit's own config.yaml: another tool's folder is not read here (training refuses it in one line)
        saved = yaml.safe_load(text) if text.startswith(RUN_CONFIG_HEADER) else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # not readable: derive as for a new run; training then names the run folder's problem
    return saved if isinstance(saved, dict) else None


def _resumed_config(saved: dict, tree: dict) -> Config:
    """The saved config with the keys the user set now on top (training then refuses those a resume cannot
    change, naming them)."""
    merged = merge_trees(merge_sources(updates=saved), copy.deepcopy(tree))
    cfg = from_dict(merged)
    validate(cfg)
    print(f"swavkit: resuming the run in {cfg.out_dir}: unset keys come from its config.yaml (not derived again)")
    return cfg


def _config_files(config: str | Path | Sequence[str | Path] | None) -> list:
    if config is None:
        return []
    if isinstance(config, (str, os.PathLike)):
        return [config]
    return list(config)


def pretrain_config(data: str | Path | None = None, out_dir: str | Path | None = None, *,
                    backbone: str | None = None, epochs: int | None = None, batch_size: int | None = None,
                    init: str | Path | None = None, config: str | Path | Sequence[str | Path] | None = None,
                    auto: bool | None = None, restart: bool = False, **keys: Any) -> Config:
    """The :class:`~swavkit.config.Config` that :func:`pretrain` with the same arguments trains with."""
    keywords = {"data": data, "out_dir": out_dir, "backbone": backbone, "epochs": epochs,
                "batch_size": batch_size, "init": init, **keys}
    return build_config(_config_files(config), updates=keyword_tree(keywords), auto=auto, restart=restart)


def pretrain(data: str | Path | None = None, out_dir: str | Path | None = None, *,
             backbone: str | None = None, epochs: int | None = None, batch_size: int | None = None,
             init: str | Path | None = None, config: str | Path | Sequence[str | Path] | None = None,
             restart: bool = False, auto: bool | None = None, progress: bool = True,
             stop_after_steps: int | None = None, **keys: Any) -> TrainResult:
    """SwAV pretraining from keywords; returns what :func:`swavkit.train` returns.

    Args:
        data: folder of images (``data.path``); None with no ``config`` = the bundled sample, quickstart recipe.
        out_dir: run folder; a run already there resumes (``restart=True`` starts over).
        backbone: ``model.backbone``, a timm model name.
        epochs: ``train.epochs``.
        batch_size: ``train.batch_size``, the global batch (all processes together).
        init: ``model.init``: starting backbone weights (cached timm name, export, run folder, checkpoint).
        config: recipe(s) applied first: a shipped recipe's name (``"cifar10_resnet18"``) or a YAML path, or a
            list of them; keywords win over them.
        restart: discard the run in ``out_dir`` (its own files only) and start over.
        auto: None (default): without ``config``, the unset keys are derived from the data and the hardware
            and printed with their reasons (as ``swavkit pretrain data.path=DIR``); True: derive them also under
            a ``config`` (``--auto``); False: the schema defaults (``--no-auto``). Never on a resume.
        progress: show a progress bar.
        stop_after_steps: stop with a checkpoint once this global step is reached (resumable).
        **keys: any other config key, by its last part (``n_prototypes=512``, ``epsilon=0.03``) or dotted
            (``**{"swav.epsilon": 0.03}``).

    Returns:
        The :class:`~swavkit.training.trainer.TrainResult` of :func:`swavkit.train`.

    Raises:
        ConfigError: an unknown keyword (named, with the closest key) or an invalid value, before anything runs.

    Example:
        ```python
        result = swavkit.pretrain("imgs/", "runs/a", backbone="resnet18", epochs=50, **{"swav.epsilon": 0.03})
        backbone = swavkit.load_backbone(result.backbone_dir)
        ```
    """
    from swavkit.training.trainer import train  # torch: imported when a run starts, not with this module

    cfg = pretrain_config(data, out_dir, backbone=backbone, epochs=epochs, batch_size=batch_size, init=init,
                          config=config, auto=auto, restart=restart, **keys)
    return train(cfg, restart=restart, stop_after_steps=stop_after_steps, progress=progress)


__all__ = ["pretrain", "pretrain_config", "build_config", "config_key", "keyword_tree",
           "quickstart_config_path", "KEYWORD_ALIASES"]
