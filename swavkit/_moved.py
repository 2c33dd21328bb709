"""Old flat module paths (swavkit 0.1's ``swavkit.knn``, ``swavkit.train``, ...) -> their homes in the layered
package, for this release: ``import swavkit.knn`` / ``from swavkit.checkpoint import load_state`` keep
working, give the very module object of the new home (so a patched attribute is seen by both names), and
warn once with the new path. Installed by ``swavkit/__init__.py``; a plain table, no registry.

Three things make that hold: the finder comes first on ``sys.meta_path`` (``swavkit/presets/`` is a data folder,
which the path finder would otherwise import as an empty namespace package for ``swavkit.presets``); the warning
points at the user's own import line (``stacklevel`` counted past importlib's frames, which vary with how the
import was made), so the default filters show it there; and the new module's ``__spec__``, which the import
machinery overwrites with the alias's spec, is put back (else ``importlib.reload`` of it reloads the alias).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
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
    "swavkit.cluster": "swavkit.clusters.explorer",
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
    "swavkit.data.errors": "swavkit.errors",  # DataError joined the other one-line errors
    # evaluation/ holds evaluations only (issue 29): embeddings, search, clusters and the ONNX export moved out
    "swavkit.evaluation.embed": "swavkit.embeddings.embed",
    "swavkit.evaluation.neighbours": "swavkit.embeddings.neighbours",
    "swavkit.evaluation.cluster": "swavkit.clusters.explorer",
    "swavkit.evaluation.kmeans": "swavkit.clusters.kmeans",
    "swavkit.evaluation.groups": "swavkit.clusters.groups",
    "swavkit.evaluation.onnx_export": "swavkit.artifacts.onnx_export",
}


# Frames of the import machinery between find_spec and the import statement: importlib's frozen bootstrap
# (which warnings skips by itself) and importlib/__init__.py (import_module, reload), which it does not.
_IMPORTLIB_DIR = os.path.dirname(importlib.__file__)


class _Alias(importlib.abc.Loader):
    def __init__(self, new_name: str):
        self.new_name = new_name
        self.new_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.new_name)
        self.new_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # already executed under its new name; the import machinery has just set module.__spec__ to the
        # alias's spec: give the module its own back
        module.__spec__ = self.new_spec


def _import_statement_stacklevel() -> int:
    """The ``stacklevel`` for a warning issued in find_spec that names the frame of the import statement (or
    of the user's ``importlib.import_module`` call): counted as ``warnings`` counts, which skips the frozen
    bootstrap frames itself."""
    frame, level = sys._getframe(2), 2  # find_spec's caller; stacklevel 1 would be find_spec itself
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            pass  # skipped by warnings, not counted
        elif name.startswith(_IMPORTLIB_DIR + os.sep):
            level += 1
        else:
            return level
        frame = frame.f_back
    return level


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`MOVED` and hands out the module of the new home."""

    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        warnings.warn(f"{fullname} moved to {new_name}; import it from there (the old path goes in the next "
                      "release)", DeprecationWarning, stacklevel=_import_statement_stacklevel())
        return importlib.machinery.ModuleSpec(fullname, _Alias(new_name))


def install() -> None:
    """First on ``sys.meta_path``: an old name must be found before a folder of that name (``swavkit/presets/``)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
