"""swavkit never destroys what it did not write: export targets, run folders, atomic file writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from swavkit.artifacts.checkpoint import CheckpointError, export_backbone, is_swavkit_export
from swavkit.cli.main import main
from swavkit.config import ConfigError, load_config
from swavkit.runtime.fileio import atomic_writer, read_jsonl, write_text_atomic
from swavkit.artifacts.pretrained import LoadError, export_torchvision, load_backbone
from swavkit.artifacts.rundir import RunFolder


def _export(net, out_dir) -> Path:
    return export_backbone(net, out_dir, image_size_px=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=0)


def _user_folder(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True)
    files = {"thesis.tex": b"chapter 1", "notes/ideas.txt": b"keep me"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _assert_untouched(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (root / name).read_bytes() == data


def test_export_refuses_a_folder_it_did_not_write(tiny_net, tmp_path):
    files = _user_folder(tmp_path / "models")
    with pytest.raises(CheckpointError, match="did not write"):
        _export(tiny_net, tmp_path / "models")
    _assert_untouched(tmp_path / "models", files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no temporary folder left behind


def test_export_into_a_run_folder_is_refused_and_the_run_kept(tiny_net, tmp_path):
    run = tmp_path / "runs" / "a"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(CheckpointError):
        _export(tiny_net, run)
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"weights"


def test_export_replaces_its_own_export_and_fills_an_empty_folder(tiny_net, tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    _export(tiny_net, target)
    assert is_swavkit_export(target)
    other = timm.create_model("resnet10t", num_classes=0)
    torch.nn.init.constant_(other.conv1[0].weight, 0.5)
    _export(other, target)
    assert torch.equal(load_file(str(target / "model.safetensors"))["conv1.0.weight"], other.conv1[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    # a user's file added to an export makes it a folder swavkit no longer replaces
    (target / "my_notes.txt").write_text("mine")
    with pytest.raises(CheckpointError):
        _export(tiny_net, target)
    assert (target / "my_notes.txt").read_text() == "mine"


def test_export_config_makes_no_claims_about_timm_weights(tiny_net, tmp_path):
    pretrained_cfg = json.loads((_export(tiny_net, tmp_path / "b") / "config.json").read_text())["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 32, 32]
    for claim in ("test_input_size", "license", "origin_url", "hf_hub_id", "test_crop_pct"):
        assert claim not in pretrained_cfg
    assert load_backbone(tmp_path / "b").num_features == tiny_net.num_features


def test_cli_export_over_a_user_folder_is_one_line_and_keeps_it(tiny_net, tmp_path, capsys):
    source = _export(tiny_net, tmp_path / "src")
    files = _user_folder(tmp_path / "home")
    assert main(["export", str(source), str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did not write" in err
    _assert_untouched(tmp_path / "home", files)


def test_torchvision_export_refuses_what_torchvision_cannot_load(tiny_net, tmp_path):
    source = _export(tiny_net, tmp_path / "r10t")
    with pytest.raises(LoadError, match="resnet10t"):
        export_torchvision(source, tmp_path / "tv.safetensors")
    assert not (tmp_path / "tv.safetensors").exists()
    net18 = timm.create_model("resnet18", num_classes=0)
    written = export_torchvision(_export(net18, tmp_path / "r18"), tmp_path / "tv18.safetensors")
    target = torchvision.models.resnet18(weights=None)
    target.fc = torch.nn.Identity()
    target.load_state_dict(load_file(str(written)), strict=True)


# --------------------------------------------------------------------------------------------------
# run folders

@pytest.mark.parametrize("given", ["", "~", "  "])
def test_empty_out_dir_is_refused(given, tmp_path):
    cfg = load_config([], [f"out_dir={given}"])  # YAML reads ~ as nothing
    with pytest.raises(ConfigError, match="out_dir"):
        RunFolder(cfg.out_dir)


def test_out_dir_tilde_means_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RunFolder("~/runs/a").path == tmp_path / "runs" / "a"


def test_folders_that_are_not_runs_are_refused(tmp_path):
    files = _user_folder(tmp_path / "project")
    with pytest.raises(ConfigError, match="not a swavkit run"):
        RunFolder(str(tmp_path / "project"))
    _assert_untouched(tmp_path / "project", files)
    with pytest.raises(ConfigError):
        RunFolder("/")
    (tmp_path / "empty").mkdir()
    RunFolder(str(tmp_path / "empty"))  # empty: fine
    RunFolder(str(tmp_path / "new"))  # does not exist yet: fine


@pytest.mark.parametrize("kind, option, what", [("pretrain", "out_dir:", "a swavkit run"),
                                                 ("finetune", "--out-dir:", "a swavkit fine-tune")])
def test_every_run_folder_follows_the_same_rule(kind, option, what, tmp_path):
    from swavkit.artifacts.rundir import FinetuneFolder

    open_folder = RunFolder if kind == "pretrain" else FinetuneFolder
    files = _user_folder(tmp_path / "project")
    with pytest.raises(ConfigError) as refused:
        open_folder(str(tmp_path / "project"))
    message = str(refused.value)
    assert message.startswith(f"{option} ") and f"not {what}" in message and "\n" not in message
    _assert_untouched(tmp_path / "project", files)
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ConfigError, match=f"^{option} .*a_file is a file"):
        open_folder(str(tmp_path / "a_file"))
    assert (tmp_path / "a_file").read_text() == "mine"
    open_folder(str(tmp_path / "new"))  # does not exist yet: fine, and nothing is created
    assert not (tmp_path / "new").exists()


def test_restart_deletes_only_the_runs_own_files(tiny_net, tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    run.start("model: {}\n", restart=False, resume_step=None)
    run.checkpoint.parent.mkdir()
    run.checkpoint.write_bytes(b"ckpt")
    run.metrics.write_text('{"step": 2}\n')
    _export(tiny_net, run.backbone)
    (run.path / "README_mine.md").write_text("my notes")
    again = RunFolder(str(run.path))
    again.start("model: {}\n", restart=True, resume_step=None)
    assert not run.checkpoint.exists() and not run.metrics.exists() and not run.backbone.exists()
    assert (run.path / "README_mine.md").read_text() == "my notes"
    assert RunFolder(str(run.path)).holds_run()


def test_resume_keeps_only_metrics_rows_up_to_the_checkpoint(tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    run.start("a: 1\n", restart=False, resume_step=None)
    run.metrics.write_text('{"step": 2, "loss": 1}\n{"step": 4, "loss": 1}\n{"step": 6, "loss": 1}\n{"step": 8, "lo')
    run.start("a: 1\n", restart=False, resume_step=4)
    assert [row["step"] for row in read_jsonl(run.metrics)] == [2, 4]
    assert run.metrics.read_text().endswith("\n")


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = write_text_atomic(tmp_path / "config.yaml", "old\n")
    with pytest.raises(OSError):
        with atomic_writer(path, "w") as handle:
            handle.write("new, partial")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_run_whose_backbone_folder_holds_user_files_is_refused_before_training(tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    run.start("model: {}\n", restart=False, resume_step=None)
    run.backbone.mkdir()
    (run.backbone / "README.md").write_text("my own notes, not a swavkit model card")
    with pytest.raises(ConfigError, match="did not write"):
        RunFolder(str(run.path))
    assert (run.backbone / "README.md").read_text().startswith("my own notes")


def test_cluster_out_never_overwrites_user_files_or_writes_into_the_images(tmp_path):
    from swavkit.clusters.explorer import check_output_folder
    from swavkit.data import DataError

    images = tmp_path / "images"
    images.mkdir()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "index.html").write_text("precious")
    with pytest.raises(DataError, match="did not write"):
        check_output_folder(user, str(images))
    with pytest.raises(DataError, match="inside the image folder"):
        check_output_folder(images, str(images))
    with pytest.raises(DataError, match="inside the image folder"):
        check_output_folder(images / "clusters", str(images))
    assert (user / "index.html").read_text() == "precious"
    check_output_folder(tmp_path / "new", str(images))  # a new folder is fine


def test_result_out_file_that_is_not_a_result_is_refused(tmp_path):
    from swavkit.evaluation.report import check_result_target, write_result

    precious = tmp_path / "my.json"
    precious.write_text('{"notes": "mine"}')
    with pytest.raises(FileExistsError):
        check_result_target(precious)
    with pytest.raises(FileExistsError):
        write_result({"schema": "swavkit-eval-v1"}, precious)
    assert precious.read_text() == '{"notes": "mine"}'
    ours = write_result({"schema": "swavkit-eval-v1", "v": 1}, tmp_path / "r.json")
    write_result({"schema": "swavkit-eval-v1", "v": 2}, ours)  # our own result: replaced
    assert json.loads(ours.read_text())["v"] == 2


def test_export_with_torchvision_refuses_before_writing(tiny_net, tmp_path, capsys):
    source = _export(tiny_net, tmp_path / "src")  # resnet10t: torchvision has no such model
    assert main(["export", str(source), str(tmp_path / "out"), "--torchvision", str(tmp_path / "tv.safetensors")]) == 2
    assert "--torchvision" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "tv.safetensors").exists()


def test_export_refusal_names_only_the_foreign_files(tiny_net, tmp_path):
    target = _export(tiny_net, tmp_path / "b")
    (target / "my.txt").write_text("mine")
    with pytest.raises(CheckpointError) as info:
        _export(tiny_net, target)
    assert "(my.txt)" in str(info.value)


def test_cluster_out_with_only_look_alike_names_is_not_taken_for_ours(tmp_path):
    from swavkit.clusters.explorer import check_output_folder
    from swavkit.data import DataError

    user = tmp_path / "mine"
    (user / "thumbs").mkdir(parents=True)
    (user / "assignments.csv").write_text("my own table")
    with pytest.raises(DataError, match="did not write"):
        check_output_folder(user, str(tmp_path / "images"))


def test_finetune_never_writes_over_a_file_it_did_not_write(tmp_path):
    from swavkit.evaluation.finetune import check_outputs, labels_path_for

    result = tmp_path / "ft.json"
    labels_path_for(result).write_text("my own list")
    with pytest.raises(FileExistsError):
        check_outputs(result)
    (tmp_path / "mine.json").write_text("{}")
    with pytest.raises(FileExistsError):
        check_outputs(tmp_path / "mine.json")
    check_outputs(tmp_path / "new.json")


def test_a_users_own_recipe_named_config_yaml_does_not_make_a_run(tmp_path):
    project = tmp_path / "project"
    (project / "wandb").mkdir(parents=True)
    (project / "wandb" / "mine.txt").write_text("mine")
    (project / "config.yaml").write_text("data: {}\ncrops: {}\nmodel: {}\nswav: {}\noptim: {}\ntrain: {}\n")
    with pytest.raises(ConfigError, match="not a swavkit run"):
        RunFolder(str(project))
    assert (project / "wandb" / "mine.txt").read_text() == "mine"


def test_shard_clean_up_never_leaves_the_output_folder(tmp_path):
    from swavkit.data.shard_writer import WRITTEN_BY, _own_files

    out = tmp_path / "shards"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("keep")
    (out / "shards.json").write_text(json.dumps({"written_by": WRITTEN_BY, "counts": {
        "../victim.txt": 1, "/etc/passwd": 1, "shard-000000.tar": 2}}))
    assert _own_files(out) == {"shards.json", "skipped.txt", "shard-000000.tar"}


def test_unreadable_config_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "binary.yaml"
    bad.write_bytes(b"\xff\xfe\x00 not text")
    assert main(["pretrain", "--config", str(bad)]) == 2
    assert "binary.yaml" in capsys.readouterr().err
