"""swavkit: SwAV self-supervised online clustering for any timm backbone.

The small public API; everything else lives in its layer's sub-package (ARCHITECTURE.md): ``runtime``,
``data``, ``core``, ``artifacts``, ``evaluation``, ``training``, ``embeddings``, ``clusters``,
``cli``.

Names are imported on first use (PEP 562), so ``import swavkit`` and ``swavkit --help`` do not pay for
torch and timm. Each name is the real object from its module (real signature, no wrapper).

Two functions share the name of an old (0.1) module path: ``train`` (``swavkit.train``, now
``swavkit.training.trainer``) and ``sinkhorn`` (``swavkit.core.sinkhorn``). The package attribute is always
the function (``swavkit.train(cfg)``, as documented), also after the old module path was imported
(swavkit/_moved.py keeps old paths working for this release); ``from swavkit.train import train`` works too.
"""

from __future__ import annotations

import importlib
import sys
import types

from swavkit import _moved

__version__ = "0.1.0"

# public name -> the module that defines it (a plain table, no registry)
_PUBLIC = {
    "Config": "swavkit.config", "ConfigError": "swavkit.errors", "load_config": "swavkit.config",
    "SwAVModel": "swavkit.core.model", "build_model": "swavkit.core.model", "create_backbone": "swavkit.core.model",
    "LoadError": "swavkit.artifacts.pretrained", "export_checkpoint": "swavkit.artifacts.pretrained",
    "load_backbone": "swavkit.artifacts.pretrained", "load_swav_model": "swavkit.artifacts.pretrained",
    "load_initial_backbone_state": "swavkit.artifacts.pretrained",
    "sinkhorn": "swavkit.core.sinkhorn", "swapped_prediction_loss": "swavkit.core.loss",
    "train": "swavkit.training.trainer", "TrainResult": "swavkit.training.trainer", "pretrain": "swavkit.api",
    "extract_features": "swavkit.evaluation.features", "evaluate_knn": "swavkit.evaluation.knn", "evaluate_linear": "swavkit.evaluation.linear_probe",
    "EvalOptions": "swavkit.evaluation.options", "KnnOptions": "swavkit.evaluation.options",
    "LinearOptions": "swavkit.evaluation.options", "embed": "swavkit.embeddings.embed",
}

# Functions named like an (old) submodule path. Importing a submodule makes Python set the package
# attribute of that name to the module, which would hide the function: ``swavkit.train(cfg)`` then failed
# on its second call ("'module' object is not callable").
_SHADOWED = {name for name in _PUBLIC if f"{__name__}.{name}" in _moved.MOVED}
_moved.install()


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)  # keep the function; the module stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = [*_PUBLIC, "__version__"]
