"""Every one-line error is a ``UserError`` (exit 2); a bug is not; a stop is 3."""

import importlib

import pytest

from swavkit.errors import EXIT_STOPPED, EXIT_USER_ERROR, UserError, exit_code_of, is_user_error

ONE_LINE_ERRORS = [("swavkit.errors", "ConfigError"), ("swavkit.errors", "DataError"),
                   ("swavkit.errors", "TrainingDiverged"), ("swavkit.errors", "DataLoaderCrashed"),
                   ("swavkit.artifacts.pretrained", "LoadError"), ("swavkit.artifacts.checkpoint", "CheckpointError"),
                   ("swavkit.runtime.distributed", "LaunchError"), ("swavkit.data.images", "UnreadableImage"),
                   ("swavkit.training.memory_plan", "MemoryPlanError"), ("swavkit.training.plot", "PlotError")]


@pytest.mark.parametrize("module_name,class_name", ONE_LINE_ERRORS)
def test_one_line_errors_are_user_errors(module_name, class_name):
    cls = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(cls, UserError)
    assert exit_code_of(cls.__new__(cls)) == EXIT_USER_ERROR


def test_old_homes_still_name_the_same_classes():
    from swavkit.errors import DataError, TrainingDiverged
    from swavkit.training.loop import TrainingDiverged as loop_diverged
    import swavkit  # noqa: F401 (installs the old-path finder)
    data_errors = importlib.import_module("swavkit.data.errors")
    assert data_errors.DataError is DataError and loop_diverged is TrainingDiverged


def test_a_bug_is_not_a_user_error_and_a_stop_is_three():
    from swavkit.runtime.signals import StopRequested
    assert not is_user_error(ValueError("bug")) and exit_code_of(KeyError("k")) == 1
    assert exit_code_of(StopRequested("SIGTERM")) == EXIT_STOPPED
