"""What a pip user gets: the wheel, installed into a fresh virtual environment outside the checkout, runs the
quickstart and finds every recipe of configs/ by name.

Minutes long (a clean venv installs torch and the rest from the package index), so it is marked ``wheel``,
left out of the default run by pyproject's addopts, and run as its own step by .ci/run:
``python -m pytest -m wheel tests/test_wheel.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.wheel

# what never belongs in the source tree that the wheel is built from: anywhere, and (the outputs commands leave in
# the checkout) at its top only - swavkit/embeddings and swavkit/clusters are packages of the same names
_NOT_SOURCE_ANYWHERE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                              ".pytest_cache")
_NOT_SOURCE_AT_TOP = {"runs", "site", "_work", "exports", "results", "embeddings", "clusters"}


def _not_source(folder: str, names: list[str]) -> set[str]:
    ignored = set(_NOT_SOURCE_ANYWHERE(folder, names))
    return ignored | (_NOT_SOURCE_AT_TOP & set(names) if Path(folder) == REPO else set())


def _run(argv: list, cwd: Path, timeout_s: float = 1800) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the built wheel, a fresh venv's bin/ with it installed)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=_not_source)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", source], cwd=work)
    wheel = next((work / "dist").glob("swavkit-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", work / "venv"], check=True)  # no --system-site-packages: clean
    bin_dir = work / "venv" / "bin"
    _run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], cwd=work)
    return wheel, bin_dir


def test_the_wheel_ships_every_recipe_of_configs(installed):
    wheel, _ = installed
    shipped = {Path(name).name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("swavkit/recipes/")}
    missing = sorted(path.name for path in (REPO / "configs").glob("*.yaml") if path.name not in shipped)
    assert not missing, f"configs/ files not in the wheel (check setup.py / pyproject package-data): {missing}"
    modules = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    left_out = sorted(str(path.relative_to(REPO)) for path in (REPO / "swavkit").rglob("*.py")
                      if str(path.relative_to(REPO)) not in modules)
    assert not left_out, f"package modules not in the wheel (check setup.py's packages): {left_out}"


def test_installed_quickstart_runs_outside_the_checkout(installed, tmp_path):
    """The no-argument quickstart (bundled sample, bundled preset, online k-NN on the bundled val split),
    cut to one epoch with the k-NN after it: what must be in the wheel is the same, the minutes are not."""
    _, bin_dir = installed
    log = _run([bin_dir / "swavkit", "pretrain", "--no-progress", f"out_dir={tmp_path / 'quick'}", "train.epochs=1",
                "monitor.every_epochs=1"], cwd=tmp_path, timeout_s=1800)
    assert "quickstart recipe on the bundled Fashion-MNIST sample" in log, log[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "quick" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("knn_top1") is not None for row in rows), rows[-1]
    assert (tmp_path / "quick" / "backbone" / "model.safetensors").is_file()


def test_installed_named_recipe_help_config(installed, tmp_path):
    _, bin_dir = installed
    out = _run([bin_dir / "swavkit", "pretrain", "--config", "imagenet_resnet50", "--help-config"], cwd=tmp_path)
    assert "optim.base_lr (float, default 0.0, recipe 4.8)" in out, out[:2000]
    for path in (REPO / "configs").glob("*.yaml"):
        assert f"  {path.stem}: " in out, f"--help-config does not list the recipe {path.stem}"
