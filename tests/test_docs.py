"""The documentation site cannot drift from the code: its reference pages are generated from the parsers,
config.py and the public API (docs/hooks.py, run here without MkDocs), every public name is documented, the
docstring examples run, and recipes are found by name. `mkdocs build --strict` itself is a CI step (.ci/run)."""

from __future__ import annotations

import argparse
import doctest
import importlib
import sys
from pathlib import Path

import pytest

import swavkit
from swavkit.cli.main import build_parser
from swavkit.config import ConfigError, describe, load_config, recipes, resolve_config_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
import hooks  # noqa: E402  (docs/hooks.py: the generators the site build runs)

sys.path.remove(str(REPO / "docs"))


def test_every_public_name_has_a_complete_docstring():
    assert hooks.missing_docs() == []


def test_the_api_page_places_every_public_name_once():
    grouped = [name for names in hooks.API_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(swavkit._PUBLIC)
    page = hooks.api_reference()
    for name, module in swavkit._PUBLIC.items():
        assert f"::: {module}.{name}\n" in page


@pytest.mark.parametrize("name", sorted(swavkit._PUBLIC))
def test_public_docstring_examples_run(name):
    obj = getattr(importlib.import_module(swavkit._PUBLIC[name]), name)
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(obj, name, globs={}):
        runner.run(test)
    assert runner.failures == 0, f"swavkit.{name}: {runner.failures} docstring example(s) failed (see output)"


def test_config_page_says_what_help_config_prints():
    page = hooks.config_reference()
    lines = describe()
    assert len(lines) > 50
    for line in lines:
        key, rest = line.split(" (", 1)
        helptext = rest.split("): ", 1)[1]
        assert f"| `{key}` |" in page, key
        assert hooks._cell(helptext) in page, key
    for name in recipes():
        assert f"| `{name}` |" in page


def test_cli_page_lists_every_command_and_option():
    page = hooks.cli_reference()
    for name, sub in hooks._subparsers(build_parser()).items():
        assert f"## swavkit {name}\n" in page
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:  # hidden aliases stay hidden
                continue
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in page, f"swavkit {name} {flag}"


def test_benchmarks_page_is_benchmarks_readme():
    text = hooks.GENERATORS["benchmarks"]()
    assert text.strip() and text in (REPO / "benchmarks" / "README.md").read_text()


def test_every_recipe_resolves_by_name_and_path():
    named = recipes()
    assert {path.stem for path in (REPO / "configs").glob("*.yaml")} <= set(named)
    assert resolve_config_file("cifar10_resnet18") == resolve_config_file("cifar10_resnet18.yaml")
    assert resolve_config_file("cifar10_resnet18").read_text() == (REPO / "configs/cifar10_resnet18.yaml").read_text()
    assert load_config(["imagenet_resnet50"]).optim.base_lr == 4.8


def test_unknown_recipe_is_one_line_naming_the_recipes():
    with pytest.raises(ConfigError, match="shipped recipes .*imagenet_resnet50"):
        resolve_config_file("imagenet_resnet5O")
    with pytest.raises(ConfigError, match="the shipped recipe of that name is --config imagenet_resnet50"):
        resolve_config_file("elsewhere/imagenet_resnet50.yaml")


def test_help_config_with_a_recipe_shows_its_values(capsys):
    from swavkit.cli.main import main

    assert main(["pretrain", "--config", "imagenet_resnet50", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "optim.base_lr (float, default 0.0, recipe 4.8)" in out
    assert "  tiny_cpu_debug: " in out


def test_the_pictures_are_drawn_from_committed_results(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import make_figures
    finally:
        sys.path.remove(str(REPO / "docs"))
    monkeypatch.setattr(make_figures, "OUT", tmp_path)
    make_figures.main()
    drawn = sorted(path.name for path in tmp_path.glob("*.png"))
    committed = sorted(path.name for path in (REPO / "docs" / "images").glob("*.png"))
    assert drawn == committed and len(drawn) == 5, (drawn, committed)
