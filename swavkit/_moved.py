"""Old flat module paths (swavkit 0.1's ``swavkit.knn``, ``swavkit.train``, ...) -> their homes in the layered
package, for this release: ``import swavkit.knn`` / ``from swavkit.checkpoint import load_state`` keep
working, give the very module object of the new home (so a patched attribute is seen by both names), and
warn once with the new path. Installed by ``swavkit/__init__.py``; a plain table, no registry.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "swavkit.device": "swavkit.runtime.device",
    "swavkit.distributed": "swavkit.runtime.distributed",
    "swavkit.signals": "swavkit.runtime.signals",
    "swavkit.fileio": "swavkit.runtime.fileio",
    "swavkit.multicrop": "swavkit.data.multicrop",
    "swavkit.shard": "swavkit.data.shard_writer",
    "swavkit.model": "swavkit.core.model",
    "swavkit.loss": "swavkit.core.loss",
    "swavkit.sinkhorn": "swavkit.core.sinkhorn",
    "swavkit.optim": "swavkit.core.optim",
    "swavkit.schedule": "swavkit.core.schedule",
    "swavkit.checkpoint": "swavkit.artifacts.checkpoint",
    "swavkit.pretrained": "swavkit.artifacts.pretrained",
    "swavkit.modelcard": "swavkit.artifacts.modelcard",
    "swavkit.rundir": "swavkit.artifacts.rundir",
    "swavkit.preprocessing": "swavkit.artifacts.preprocessing",
    "swavkit.features": "swavkit.evaluation.features",
    "swavkit.knn": "swavkit.evaluation.knn",
    "swavkit.linear_probe": "swavkit.evaluation.linear_probe",
    "swavkit.finetune": "swavkit.evaluation.finetune",
    "swavkit.cluster": "swavkit.evaluation.cluster",
    "swavkit.floors": "swavkit.evaluation.floors",
    "swavkit.metrics": "swavkit.evaluation.metrics",
    "swavkit.report": "swavkit.evaluation.report",
    "swavkit.eval_options": "swavkit.evaluation.options",
    "swavkit.train": "swavkit.training.trainer",
    "swavkit.step": "swavkit.training.step",
    "swavkit.budget": "swavkit.training.budget",
    "swavkit.presets": "swavkit.training.presets",
    "swavkit.loggers": "swavkit.training.loggers",
    "swavkit.sharpness": "swavkit.training.collapse",
    "swavkit.diagnosis": "swavkit.training.diagnosis",
    "swavkit.plot": "swavkit.training.plot",
    "swavkit.rng": "swavkit.runtime.rng",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec):
        return importlib.import_module(self.new_name)

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`MOVED` and hands out the module of the new home."""

    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        warnings.warn(f"{fullname} moved to {new_name}; import it from there (the old path goes in the next "
                      "release)", DeprecationWarning, stacklevel=3)
        return importlib.machinery.ModuleSpec(fullname, _Alias(new_name))


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
