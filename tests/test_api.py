"""The Python API: every public name works any number of times in one process, with its real signature,
and the keyword entry point ``swavkit.pretrain`` builds its config like YAML + overrides do."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import swavkit
from conftest import write_images
from evaluation_fixtures import write_labelled_folders
from swavkit.api import pretrain_config
from swavkit.config import ConfigError, load_config

# A seconds-long CPU run: resnet10t, two 16 px crops, batch 8 over 16 images = 2 steps.
TINY = {"backbone": "resnet10t", "epochs": 1, "batch_size": 8, "workers": 0, "hidden_dim": 32, "output_dim": 16,
        "n_prototypes": 10, "counts": [2], "sizes_px": [16], "min_scales": [0.5], "max_scales": [1.0],
        "blur_probability": 0.0, "warmup_epochs": 0, "freeze_prototypes_epochs": 0}


def tiny_overrides(data: Path, out_dir: Path) -> list[str]:
    """TINY as key=value overrides, for swavkit.load_config."""
    keys = {"data.path": data, "out_dir": out_dir, "model.backbone": "resnet10t", "train.epochs": 1,
            "train.batch_size": 8, "data.num_workers": 0, "model.hidden_dim": 32, "model.output_dim": 16,
            "model.n_prototypes": 10, "crops.counts": "[2]", "crops.sizes_px": "[16]", "crops.min_scales": "[0.5]",
            "crops.max_scales": "[1.0]", "crops.blur_probability": 0.0, "optim.warmup_epochs": 0,
            "swav.freeze_prototypes_epochs": 0}
    return [f"{k}={v}" for k, v in keys.items()]


# The two checks below each need a fresh interpreter, and each pays the torch import there: the module's
# fixture starts both at once, so they take one import's time on two cores instead of two.
FRESH_INTERPRETER_CHECKS = {
    # ``import swavkit`` loads neither torch nor timm; after the submodule ``swavkit.train`` is imported (by
    # anyone), ``swavkit.train`` is still the function
    "light": """
        import sys
        import swavkit
        assert "torch" not in sys.modules and "timm" not in sys.modules, "import swavkit loaded torch/timm"
        from swavkit.train import TrainResult          # imports the submodule named like the function
        import swavkit.sinkhorn                        # the same for sinkhorn
        assert callable(swavkit.train) and swavkit.train.__module__ == "swavkit.training.trainer", swavkit.train
        assert callable(swavkit.sinkhorn) and swavkit.sinkhorn.__module__ == "swavkit.core.sinkhorn"
        assert swavkit.train is sys.modules["swavkit.train"].train
        print("ok")
    """,
    # what works for ``swavkit.train`` / ``swavkit.sinkhorn``: from-imports, plain import, importlib
    "submodules": """
        import importlib, types
        import swavkit.train
        from swavkit.train import train, TrainResult
        import swavkit.train as bound
        module = importlib.import_module("swavkit.train")
        assert isinstance(module, types.ModuleType) and module.train is train and module.TrainResult is TrainResult
        assert swavkit.train is train and bound is train  # the documented function, whichever came first
        from swavkit.sinkhorn import sinkhorn
        assert importlib.import_module("swavkit.sinkhorn").sinkhorn is sinkhorn is swavkit.sinkhorn
        print("ok")
    """,
}


@pytest.fixture(scope="module")
def fresh_interpreters() -> dict[str, tuple[int, str, str]]:
    """name -> (exit code, stdout, stderr) of each FRESH_INTERPRETER_CHECKS script, run concurrently."""
    procs = {name: subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, code in FRESH_INTERPRETER_CHECKS.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        results[name] = (proc.returncode, stdout, stderr)
    return results


def test_import_is_light_and_names_are_the_real_objects(fresh_interpreters):
    """In a fresh process: ``import swavkit`` loads neither torch nor timm, and after the submodule
    ``swavkit.train`` is imported (by anyone), ``swavkit.train`` is still the function."""
    code, stdout, stderr = fresh_interpreters["light"]
    assert code == 0 and stdout.strip() == "ok", stderr[-2000:]


def test_submodules_named_like_their_function_import_as_documented(fresh_interpreters):
    """What works for ``swavkit.train`` / ``swavkit.sinkhorn`` (swavkit/__init__.py says why ``import
    swavkit.train as m`` binds the function): from-imports, plain import, importlib."""
    code, stdout, stderr = fresh_interpreters["submodules"]
    assert code == 0 and stdout.strip() == "ok", stderr[-2000:]


def test_public_functions_have_real_signatures():
    """The package attribute is the function of the defining module itself, never a ``*args, **kwargs``
    wrapper defined in swavkit/__init__.py."""
    functions = {name: getattr(swavkit, name) for name in swavkit.__all__ if inspect.isfunction(getattr(swavkit, name))}
    assert {"train", "pretrain", "evaluate_knn", "load_backbone"} <= set(functions)
    for name, function in functions.items():
        assert function.__module__ not in ("swavkit", "swavkit.__init__"), name
        assert getattr(sys.modules[function.__module__], name) is function, name
        kinds = {p.kind for p in inspect.signature(function).parameters.values()}
        assert inspect.Parameter.VAR_POSITIONAL not in kinds, name
    assert list(inspect.signature(swavkit.train).parameters)[:2] == ["cfg", "restart"]


def test_every_public_callable_works_twice_in_one_process(tmp_path):
    images = tmp_path / "images"
    write_images(images, 16)
    train_dir, val_dir = write_labelled_folders(tmp_path / "labelled", n_train=4, n_val=2, size_px=24)
    run, keyword_run = tmp_path / "run", tmp_path / "keyword_run"
    net = swavkit.create_backbone("resnet10t")
    from swavkit.model import ProjectionHead, Prototypes
    from swavkit.data import LabelledImageFolder
    from swavkit.data import eval_transform

    dataset = LabelledImageFolder(train_dir, eval_transform(16, (0.5,) * 3, (0.5,) * 3, 1.0))
    eval_args = dict(image_size_px=16, batch_size=8, num_workers=0, device="cpu", out_json="", progress=False)
    calls = {  # in dependency order: the runs first
        "pretrain": lambda: swavkit.pretrain(images, keyword_run, progress=False, **TINY),
        "train": lambda: swavkit.train(load_config([], tiny_overrides(images, run)), progress=False),
        "TrainResult": lambda: swavkit.TrainResult(run, run / "checkpoints" / "last.pt", None, 0, 0.0, False),
        "Config": lambda: swavkit.Config(),
        "ConfigError": lambda: swavkit.ConfigError("x"),
        "LoadError": lambda: swavkit.LoadError("x"),
        "load_config": lambda: swavkit.load_config([], tiny_overrides(images, run)),
        "create_backbone": lambda: swavkit.create_backbone("resnet10t"),
        "build_model": lambda: swavkit.build_model("resnet10t", 10, 32, 16),
        "SwAVModel": lambda: swavkit.SwAVModel(net, ProjectionHead(net.num_features, 32, 16), Prototypes(16, 10)),
        "sinkhorn": lambda: swavkit.sinkhorn(torch.randn(8, 10), 0.05, 3),
        "swapped_prediction_loss": lambda: swavkit.swapped_prediction_loss(
            torch.randn(2, 8, 10), {0: torch.full((8, 10), 0.1)}, 0.1),
        "export_checkpoint": lambda: swavkit.export_checkpoint(run / "checkpoints" / "last.pt", tmp_path / "export"),
        "load_backbone": lambda: swavkit.load_backbone(run),
        "load_swav_model": lambda: swavkit.load_swav_model(run),
        "load_initial_backbone_state": lambda: swavkit.load_initial_backbone_state(run, "resnet10t"),
        "extract_features": lambda: swavkit.extract_features(net, dataset, num_workers=0, progress=False),
        "evaluate_knn": lambda: swavkit.evaluate_knn(run, train_dir, val_dir, k=3, **eval_args),
        "evaluate_linear": lambda: swavkit.evaluate_linear(run, train_dir, val_dir, lbfgs_iterations=5, **eval_args),
        "EvalOptions": lambda: swavkit.EvalOptions(num_workers=0),
        "KnnOptions": lambda: swavkit.KnnOptions(k=3),
        "LinearOptions": lambda: swavkit.LinearOptions(recipe="reference"),
        "embed": lambda: swavkit.embed(run, images, tmp_path / "emb.npy", num_workers=0, device="cpu", progress=False),
    }
    public = {name for name in swavkit.__all__ if callable(getattr(swavkit, name))}
    assert set(calls) == public, "a public name without a call here (or a call for a name no longer public)"
    for name, call in calls.items():
        first, second = call(), call()
        assert type(first) is type(second), name
    # the second runs resumed the finished ones: same step, same weights
    assert swavkit.train(load_config([], tiny_overrides(images, run)), progress=False).step == 2
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_pretrain_tiny_run_returns_the_train_result(tmp_path):
    images = tmp_path / "images"
    write_images(images, 16)
    result = swavkit.pretrain(images, tmp_path / "a", progress=False, **TINY, **{"swav.epsilon": 0.03})
    assert isinstance(result, swavkit.TrainResult) and result.completed and result.step == 2
    assert (result.backbone_dir / "model.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["swav"]["epsilon"] == 0.03 and saved["data"]["path"] == str(images)
    assert saved["model"]["backbone"] == "resnet10t" and saved["crops"]["sizes_px"] == [16]
    net = swavkit.load_backbone(tmp_path / "a")
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_keywords_yaml_and_dotted_keys_build_the_same_config_as_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  backbone: resnet18\n  n_prototypes: 30\ntrain:\n  epochs: 3\n")
    cfg = pretrain_config(tmp_path / "imgs", tmp_path / "out", epochs=5, config=recipe, epsilon=0.04,
                          model={"hidden_dim": 64}, **{"swav.temperature": 0.2, "crops.sizes_px": (64, 32)})
    same = load_config([recipe], [f"data.path={tmp_path / 'imgs'}", f"out_dir={tmp_path / 'out'}", "train.epochs=5",
                                  "swav.epsilon=0.04", "model.hidden_dim=64", "swav.temperature=0.2",
                                  "crops.sizes_px=[64,32]"])
    assert cfg == same
    assert cfg.model.backbone == "resnet18" and cfg.train.epochs == 5 and cfg.model.n_prototypes == 30


@pytest.mark.parametrize("keywords, message", [
    ({"epoch": 3}, "unknown keyword 'epoch' (did you mean epochs?)"),
    ({"swav.epsilo": 0.1}, "unknown config key 'swav.epsilo'"),
    ({"epochs": "many"}, "train.epochs: expected an integer"),
    ({"backbone": "resnet_nope"}, "model.backbone: 'resnet_nope' is not a timm model name"),
])
def test_bad_keywords_raise_config_error_naming_the_key_before_anything_runs(tmp_path, keywords, message):
    with pytest.raises(ConfigError) as err:
        swavkit.pretrain(tmp_path / "imgs", tmp_path / "out", **keywords)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_no_data_and_no_config_means_the_quickstart_recipe(tmp_path, capsys):
    cfg = pretrain_config(out_dir=tmp_path / "q")
    assert cfg.data.path == "" and "quickstart recipe" in capsys.readouterr().out
    assert cfg.model.backbone == load_config([swavkit.api.quickstart_config_path()]).model.backbone
