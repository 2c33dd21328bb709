"""The command line: instant help, real examples, one source argument, the same flags everywhere, options
and overrides in any order; and the outputs a user shares (result names, cluster page links)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import write_images
from swavkit import config as config_module
from swavkit.cli.main import build_parser, main, parse_arguments
from swavkit.runtime.cores import default_num_workers
from swavkit.evaluation.report import default_result_path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("pretrain", "export", "knn", "linear", "cluster", "assign", "embed", "neighbours", "plot", "shard", "finetune")


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_imports_neither_torch_nor_timm():
    code = textwrap.dedent("""
        import contextlib, io, sys
        from swavkit.cli.main import main
        for argv in (["--help"], *([c, "--help"] for c in %r)):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit:
                    pass
        print(sorted(m for m in ("torch", "timm", "torchvision", "faiss") if m in sys.modules))
    """ % (COMMANDS,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def epilog_examples() -> list[tuple[str, list[str]]]:
    """(command, argv after 'swavkit') for every example line of every sub-command's help."""
    examples = []
    for name, sub in subcommand_parsers().items():
        for line in (sub.epilog or "").splitlines():
            tokens = shlex.split(line)
            if "swavkit" in tokens:
                examples.append((name, tokens[tokens.index("swavkit") + 1:]))
    return examples


def test_every_help_example_parses_and_names_real_configs():
    examples = epilog_examples()
    assert {name for name, _ in examples} == set(COMMANDS), "every sub-command shows an example"
    for name, argv in examples:
        args = parse_arguments(build_parser(), argv)  # SystemExit (exit 2) on anything argparse refuses
        assert args.command == name
        for token in argv:
            if token.endswith(".yaml"):
                assert (REPO / token).is_file(), f"example of {name} names {token}, which does not exist"


def test_options_and_overrides_in_any_order(tmp_path, monkeypatch):
    recipe = tmp_path / "y.yaml"
    recipe.write_text("train:\n  epochs: 7\n  batch_size: 16\n")
    argv = ["pretrain", "data.path=x", "--config", str(recipe), "train.epochs=3", "--restart", "seed=4"]
    args = parse_arguments(build_parser(), argv)
    assert args.overrides == ["data.path=x", "train.epochs=3", "seed=4"] and args.config == [str(recipe)]
    assert args.restart
    # the whole command builds the config from them: file first, then every override in order
    seen = {}

    def fake_train(cfg, **kwargs):
        seen.update(cfg=cfg, **kwargs)
        return argparse.Namespace(completed=True)

    monkeypatch.setattr(importlib.import_module("swavkit.training.trainer"), "train", fake_train)
    assert main([*argv, "--workers", "0", "--no-progress"]) == 0
    cfg = seen["cfg"]
    assert (cfg.data.path, cfg.train.epochs, cfg.train.batch_size, cfg.seed, cfg.data.num_workers) == ("x", 3, 16, 4, 0)
    assert seen["restart"] is True
    for bad in (["pretrain", "a=1", "--bogus"], ["knn", "--backbone", "b", "--train", "t", "--val", "v", "a=1"]):
        with pytest.raises(SystemExit) as exited:
            parse_arguments(build_parser(), bad)
        assert exited.value.code == 2


EVAL_ARGS = ["--backbone", "b", "--train", "t", "--val", "v"]


@pytest.mark.parametrize("argv, hint", [
    (["pretrain", "--epochs", "3"], "--epochs (did you mean train.epochs=3?)"),  # a config key, as an override
    (["pretrain", "data.path=x", "--workerz", "2"], "(did you mean --workers 2?)"),
    (["knn", *EVAL_ARGS, "--neighbours", "5"], "--neighbours 5 (did you mean --k 5?)"),  # named by --k's help
    (["knn", *EVAL_ARGS, "--temprature=0.1"], "--temprature=0.1 (did you mean --temperature 0.1?)"),
    (["finetune", *EVAL_ARGS, "--label-fractoin", "1%"], "(did you mean --label-fraction 1%?)"),
    (["linear", *EVAL_ARGS, "--zzz"], "unrecognized arguments: --zzz"),  # nothing close: no guess
])
def test_an_unknown_option_gets_the_closest_valid_one_in_one_line(argv, hint, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_arguments(build_parser(), argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"swavkit {argv[0]}: error: unrecognized arguments: ") and err[-1].endswith(hint)
    assert err[0].startswith(f"usage: swavkit {argv[0]}")  # the sub-command's usage, not the top level's
    if argv[-1] == "--zzz":
        assert "did you mean" not in err[-1]


@pytest.mark.parametrize("command", ["pretrain", "knn", "linear", "cluster", "finetune"])
def test_workers_is_the_same_flag_everywhere(command):
    required = {"pretrain": [], "knn": ["--backbone", "b", "--train", "t", "--val", "v"],
                "linear": ["--backbone", "b", "--train", "t", "--val", "v"],
                "cluster": ["--checkpoint", "c", "--data", "d", "--out", "o"],
                "finetune": ["--backbone", "b", "--train", "t", "--val", "v"]}[command]
    for flag in ("--workers", "--num-workers"):
        assert parse_arguments(build_parser(), [command, *required, flag, "3"]).workers == 3
    default = parse_arguments(build_parser(), [command, *required]).workers
    # pretrain leaves it to data.num_workers, whose default is the same machine-suited number
    assert default == (None if command == "pretrain" else default_num_workers())
    assert config_module.Config().data.num_workers == default_num_workers()


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (3, 2), (16, 4)])
def test_default_workers_leave_a_core_to_the_main_process(monkeypatch, cores, workers):
    from swavkit.runtime import cores as cores_module

    monkeypatch.setattr(cores_module.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_workers() == workers


# ----------------------------------------------------------------------------------------------------
# a run folder is a source for every command

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """One finished 2-step run (resnet10t, 16 px crops) and its image folder."""
    import swavkit

    root = tmp_path_factory.mktemp("cli_run")
    write_images(root / "images", 16)
    swavkit.pretrain(root / "images", root / "run", backbone="resnet10t", epochs=1, batch_size=8, workers=0,
                     hidden_dim=32, output_dim=16, n_prototypes=10, counts=[2], sizes_px=[16], min_scales=[0.5],
                     max_scales=[1.0], blur_probability=0.0, warmup_epochs=0, progress=False)
    return {"root": root, "run": root / "run", "images": root / "images"}


def test_export_and_cluster_accept_a_run_folder(tiny_run, capsys):
    root, run = tiny_run["root"], tiny_run["run"]
    assert main(["export", str(run), str(root / "exported")]) == 0
    assert (root / "exported" / "model.safetensors").is_file()
    out = root / "clusters"
    assert main(["cluster", "--checkpoint", str(run), "--data", str(tiny_run["images"]), "--out", str(out),
                 "--workers", "0", "--no-progress"]) == 0
    assert (out / "index.html").is_file()
    capsys.readouterr()
    # an exported backbone has no prototypes: one line saying so, exit 2
    assert main(["cluster", "--checkpoint", str(root / "exported"), "--data", str(tiny_run["images"]),
                 "--out", str(root / "c2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exported backbone" in err and "\n" not in err


def test_cluster_page_links_are_relative(tiny_run, tmp_path):
    """Every src/href of the page is relative; the files next to it open from a copy in another folder."""
    import shutil

    out = tiny_run["root"] / "clusters_links"
    assert main(["cluster", "--checkpoint", str(tiny_run["run"]), "--data", str(tiny_run["images"]), "--out", str(out),
                 "--workers", "0", "--no-progress"]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert links and not [link for link in links if "://" in link or link.startswith("/")]
    originals = re.findall(r'<a href="([^"#]+)"><img', page)
    assert originals and all((out / link).resolve().is_file() for link in originals)
    moved = shutil.copytree(out, tmp_path / "elsewhere" / "clusters")  # as if unzipped on another machine
    local = [link for link in links if not link.startswith("#") and link not in originals]
    assert local and all((moved / link).is_file() for link in local)


def test_result_names_carry_the_run_name(tiny_run):
    run = tiny_run["run"]
    assert default_result_path("knn", str(run / "backbone")).name.startswith("knn-run-")
    assert default_result_path("linear", str(run / "backbone") + "/").name.startswith("linear-run-")
    assert default_result_path("knn", str(run / "checkpoints" / "last.pt")).name.startswith("knn-run-")
    assert default_result_path("knn", str(run)).name.startswith("knn-run-")
    assert default_result_path("knn", "swav_800ep_pretrain.pth.tar").name.startswith("knn-swav_800ep_pretrain.pth.tar-")
    assert default_result_path("knn", "timm:resnet18").name.startswith("knn-timm-resnet18-")


def test_precision_words_of_the_cli_are_the_resolvers():
    from swavkit.cli.args import PRECISIONS
    from swavkit.runtime.device import PRECISIONS as RESOLVED

    assert PRECISIONS == RESOLVED
    for command, required in (("finetune", ["--backbone", "b", "--train", "t", "--val", "v"]),
                              ("knn", ["--backbone", "b", "--train", "t", "--val", "v"])):
        assert parse_arguments(build_parser(), [command, *required, "--precision", "fp16"]).precision == "fp16"
        with pytest.raises(SystemExit):
            parse_arguments(build_parser(), [command, *required, "--workers", "-1"])
