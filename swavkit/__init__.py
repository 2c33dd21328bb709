"""swavkit: SwAV self-supervised online clustering for any timm backbone.

The small public API; everything else lives in its own module (see the README).

Names are imported on first use (PEP 562), so ``import swavkit`` and ``swavkit --help`` do not pay for
torch and timm. Each name is the real object from its module (real signature, no wrapper):
``swavkit.train is swavkit.train.train`` at the function level.

Two functions share their module's name: ``train`` and ``sinkhorn``. The package attribute is the function
(``swavkit.train(cfg)``, as documented), so ``import swavkit.train as m`` binds the function too: Python
evaluates that statement as ``m = swavkit.train`` (the attribute; sys.modules only when there is none), and
no package attribute can be both the function and the module. For the module, use
``importlib.import_module("swavkit.train")``; ``from swavkit.train import train, TrainResult`` (any name)
and plain ``import swavkit.train`` work as usual (tests/test_api.py).
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it (a plain table, no registry)
_PUBLIC = {
    "Config": "swavkit.config", "ConfigError": "swavkit.config", "load_config": "swavkit.config",
    "SwAVModel": "swavkit.model", "build_model": "swavkit.model", "create_backbone": "swavkit.model",
    "LoadError": "swavkit.pretrained", "export_checkpoint": "swavkit.pretrained",
    "load_backbone": "swavkit.pretrained", "load_swav_model": "swavkit.pretrained",
    "load_initial_backbone_state": "swavkit.pretrained",
    "sinkhorn": "swavkit.sinkhorn", "swapped_prediction_loss": "swavkit.loss",
    "train": "swavkit.train", "TrainResult": "swavkit.train", "pretrain": "swavkit.api",
    "extract_features": "swavkit.features", "evaluate_knn": "swavkit.knn", "evaluate_linear": "swavkit.linear_probe",
    "EvalOptions": "swavkit.eval_options", "KnnOptions": "swavkit.eval_options",
    "LinearOptions": "swavkit.eval_options", "embed": "swavkit.embed",
}

# Functions named like the submodule that defines them. Importing a submodule makes Python set the
# package attribute of that name to the module, which would hide the function: ``swavkit.train(cfg)``
# then failed on its second call ("'module' object is not callable").
_SHADOWED = {name for name, module in _PUBLIC.items() if module == f"{__name__}.{name}"}


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
