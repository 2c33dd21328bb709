"""Issue 27: hostile files handed to every entry point that loads a run or checkpoint (docs/guides/safety.md
has the table). Each case: the code in a pickle never runs (its marker file is never created), nothing on disk
changes, and the user gets one line (exit code 2 on the command line).

The runs are tests/data/v0_1_run (a real swavkit 0.1 run of test_resnet), whole and re-saved as an FSDP run's
sharded checkpoint (DCP folder + last.pt naming it) by :func:`shard_run`, which goes through torch's own
``get_state_dict`` and ``dcp.save`` as swavkit.artifacts.sharded_checkpoint does. The command-line cases call
``swavkit.cli.main.main`` in-process (the same code as the ``swavkit`` command, without a new interpreter).
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from conftest import write_images
from evaluation_fixtures import write_labelled_folders
from swavkit.artifacts.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, load_training_checkpoint,
                                          save_atomic)
from swavkit.artifacts.dcp_reader import read_metadata_file
from swavkit.artifacts.pretrained import LoadError, load_backbone
from swavkit.artifacts.sharded_checkpoint import SHARDED_KEY
from swavkit.cli.main import main
from swavkit.config import from_dict

OLD_RUN = Path(__file__).parent / "data" / "v0_1_run"
SHARDS = "sharded-step000000125-0123abcd"  # a folder name swavkit writes


class CodeRunner:
    """Unpickling this runs a shell command that creates ``marker`` (what a hostile file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def shard_run(run: Path, *, extra_model: dict | None = None, extra_lr=None) -> None:
    """Re-save ``run``'s whole last.pt as an FSDP run's: model and optimizer as a DCP folder, last.pt naming it.
    ``extra_model`` entries join the model dict and ``extra_lr`` replaces a param group's lr (hostile items)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from swavkit.core.model import build_model
    from swavkit.core.optim import build_optimizer, resolve_optimizer_name

    checkpoint = run / "checkpoints" / "last.pt"
    saved = load_training_checkpoint(checkpoint)
    cfg = from_dict(saved["config"])
    m, o = cfg.model, cfg.optim
    core = build_model(m.backbone, m.n_prototypes, m.hidden_dim, m.output_dim, m.backbone_kwargs)
    core.load_state_dict(saved["model"])
    optimizer = build_optimizer(core, resolve_optimizer_name(o.optimizer, core.backbone), lr=0.1,
                                weight_decay=o.weight_decay, momentum=o.momentum,
                                trust_coefficient=o.lars_trust_coefficient, lars_exclude=o.lars_exclude)
    optimizer.load_state_dict(saved["optimizer"])
    for param in core.parameters():  # the old run's frozen prototypes never stepped; a resume expects every buffer
        optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
    model_state, optimizer_state = get_state_dict(core, optimizer)
    model_state.update(extra_model or {})
    if extra_lr is not None:
        optimizer_state["param_groups"][0]["lr"] = extra_lr
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(checkpoint.parent / SHARDS))
    rest = {k: v for k, v in saved.items() if k not in ("model", "optimizer")}
    save_atomic({**rest, SHARDED_KEY: SHARDS}, checkpoint)  # re-saved: its SHA-256 matches


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    shutil.rmtree(target / "backbone", ignore_errors=True)  # the checkpoint is what gets loaded
    return target


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time: what "nothing changed" compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _metadata_with(folder: Path, change) -> None:
    """Rewrite ``folder/.metadata`` (a safe pickle) after ``change(metadata)``: an edited companion."""
    metadata = read_metadata_file(folder / ".metadata")
    change(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def _first_storage(metadata):
    return next(iter(metadata.storage_data.values()))


def _oversized(metadata) -> None:
    entry = metadata.state_dict_metadata["model.prototypes.weight"]
    entry.size = torch.Size([1 << 20, 1 << 20])  # 4 TiB of float32 declared by a 40 kB file


# name -> how a sharded run is made hostile (applied to a fresh copy of the sound sharded run)
SHARDED_FORMS = {
    "metadata-pickle": lambda run, marker: (run / "checkpoints" / SHARDS / ".metadata").write_bytes(
        pickle.dumps(CodeRunner(marker))),
    "metadata-zero-byte": lambda run, marker: (run / "checkpoints" / SHARDS / ".metadata").write_bytes(b""),
    "metadata-truncated": lambda run, marker: (run / "checkpoints" / SHARDS / ".metadata").write_bytes(
        (run / "checkpoints" / SHARDS / ".metadata").read_bytes()[:5000]),
    "metadata-wrong-type": lambda run, marker: (run / "checkpoints" / SHARDS / ".metadata").write_bytes(
        pickle.dumps({"storage_data": {}})),
    "metadata-names-outside-file": lambda run, marker: _metadata_with(
        run / "checkpoints" / SHARDS, lambda md: setattr(_first_storage(md), "relative_path", "../../last.pt")),
    "metadata-oversized-tensor": lambda run, marker: _metadata_with(run / "checkpoints" / SHARDS, _oversized),
    "shard-truncated": lambda run, marker: [p.write_bytes(p.read_bytes()[:1000])
                                            for p in (run / "checkpoints" / SHARDS).glob("*.distcp")],
    "shard-folder-renamed-in-last-pt": lambda run, marker: save_atomic(
        {**load_training_checkpoint(run / "checkpoints" / "last.pt"), SHARDED_KEY: "../../elsewhere"},
        run / "checkpoints" / "last.pt"),
}
# what each form's one line says
SHARDED_MESSAGES = {
    "metadata-pickle": "could run code", "data-item-pickle": "could run code", "whole-file-pickle": "could run code",
    "metadata-zero-byte": "truncated or corrupt", "metadata-truncated": "truncated or corrupt",
    "metadata-wrong-type": "not DCP metadata", "metadata-names-outside-file": "outside its folder",
    "metadata-oversized-tensor": "more than its shard files hold", "shard-truncated": "truncated",
    "shard-folder-renamed-in-last-pt": "missing or incomplete", "last-pt-edited": "SHA-256",
    "last-pt-zero-byte": "truncated or corrupt", "last-pt-wrong-type": "not a swavkit training checkpoint",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the cases read, built once: the sound runs, one hostile run per form, images, labelled
    folders, and embeddings made by a run whose DCP metadata was made hostile afterwards."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "CODE-RAN"
    sound = copy_run(OLD_RUN, root / "sound-sharded")
    shard_run(sound)
    runs = {"sound-sharded": sound}
    for name, make_hostile in SHARDED_FORMS.items():
        runs[name] = copy_run(sound, root / name)
        make_hostile(runs[name], marker)
    runs["data-item-pickle"] = copy_run(OLD_RUN, root / "data-item-pickle")
    shard_run(runs["data-item-pickle"], extra_model={"evil": CodeRunner(marker)}, extra_lr=CodeRunner(marker))
    whole = copy_run(OLD_RUN, root / "whole-file-pickle")
    torch.save({"format": CHECKPOINT_FORMAT, "config": {}, "payload": CodeRunner(marker)},
               whole / "checkpoints" / "last.pt")
    runs["whole-file-pickle"] = whole
    edited = copy_run(OLD_RUN, root / "last-pt-edited")
    raw = bytearray((edited / "checkpoints" / "last.pt").read_bytes())
    raw[-30000] ^= 0x01  # one bit of a weight flipped: still a readable zip, its digest no longer matches
    (edited / "checkpoints" / "last.pt").write_bytes(bytes(raw))
    runs["last-pt-edited"] = edited
    runs["last-pt-zero-byte"] = copy_run(OLD_RUN, root / "last-pt-zero-byte")
    (runs["last-pt-zero-byte"] / "checkpoints" / "last.pt").write_bytes(b"")
    runs["last-pt-wrong-type"] = copy_run(OLD_RUN, root / "last-pt-wrong-type")
    torch.save({"weights": torch.zeros(3)}, runs["last-pt-wrong-type"] / "checkpoints" / "last.pt")

    write_images(root / "images", 6, size_px=32)
    train, val = write_labelled_folders(root / "labelled", n_train=2, n_val=1, size_px=32)
    # --query: embeddings made by a sound run whose metadata turns hostile afterwards (the manifest names it)
    queried = copy_run(sound, root / "queried-run")
    assert main(["embed", str(queried), str(root / "images"), "--out", str(root / "emb" / "e.npy"), "--no-progress"]) == 0
    SHARDED_FORMS["metadata-pickle"](queried, marker)
    return {"root": root, "marker": marker, "runs": runs, "images": root / "images", "train": train, "val": val,
            "queried": queried, "embeddings": root / "emb" / "e.json"}


def test_the_sound_sharded_run_loads_the_same_weights_as_the_whole_one(world):
    whole = load_backbone(OLD_RUN / "checkpoints" / "last.pt").state_dict()
    sharded = load_backbone(world["runs"]["sound-sharded"]).state_dict()
    assert "model" not in load_training_checkpoint(world["runs"]["sound-sharded"] / "checkpoints" / "last.pt")
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[k], sharded[k]) for k in whole)


def test_a_metadata_pickle_cannot_change_the_classes_it_may_build(tmp_path):
    """pickle's BUILD with a slot state sets attributes on whatever object precedes it: here the Metadata class
    itself. Refused, and the class is as it was."""
    from torch.distributed.checkpoint.metadata import Metadata

    before = dict(vars(Metadata))
    sets_a_class_attribute = (b"\x80\x04" + pickle.GLOBAL + b"torch.distributed.checkpoint.metadata\nMetadata\n"
                              + pickle.NONE + pickle.MARK + pickle.SHORT_BINUNICODE + bytes([7]) + b"__eq__x"
                              + pickle.NONE + pickle.DICT + pickle.TUPLE2 + pickle.BUILD + pickle.STOP)
    (tmp_path / ".metadata").write_bytes(sets_a_class_attribute)
    with pytest.raises(CheckpointError, match="sets attributes of Metadata.__eq__x"):
        read_metadata_file(tmp_path / ".metadata")
    assert dict(vars(Metadata)) == before


def _refused_in_python(world, call, form: str) -> str:
    before = snapshot(world["root"])
    with pytest.raises((CheckpointError, LoadError)) as info:
        call()
    assert not world["marker"].exists(), f"{form}: the payload ran"
    assert snapshot(world["root"]) == before
    message = str(info.value)
    assert "\n" not in message and SHARDED_MESSAGES[form] in message, message
    return message


@pytest.mark.parametrize("form", [*SHARDED_FORMS, "data-item-pickle", "whole-file-pickle", "last-pt-edited",
                                  "last-pt-zero-byte", "last-pt-wrong-type"])
@pytest.mark.parametrize("entry", ["run folder", "last.pt"])
def test_load_backbone_refuses_every_hostile_form(world, form, entry):
    run = world["runs"][form]
    source = run if entry == "run folder" else run / "checkpoints" / "last.pt"
    if form == "last-pt-wrong-type":  # not a swavkit checkpoint: read as a released file, whose keys do not fit
        SHARDED_MESSAGES[form] = "does not fit"
    _refused_in_python(world, lambda: load_backbone(source, architecture="test_resnet"), form)


def _command(world, name: str, run: Path, out: Path) -> list[str]:
    """The command line of entry point ``name`` reading ``run``; ``out``: a new path for what it would write."""
    images, train, val = str(world["images"]), str(world["train"]), str(world["val"])
    tiny = ["data.num_workers=0", "train.epochs=1", "train.batch_size=4", "model.hidden_dim=32",
            "model.output_dim=16", "model.n_prototypes=16", "crops.counts=[2,2]", "crops.sizes_px=[32,16]"]
    return {
        "export": ["export", str(run), str(out)],
        "cluster": ["cluster", "--checkpoint", str(run), "--data", images, "--out", str(out), "--no-progress"],
        "pretrain model.init": ["pretrain", f"data.path={images}", f"out_dir={out}", "model.backbone=test_resnet",
                                f"model.init={run}", *tiny, "--no-progress"],
        "pretrain resume": ["pretrain", "--config", str(run / "config.yaml"), f"out_dir={run}", "--no-progress"],
        "embed": ["embed", str(run), images, "--out", str(out / "e.npy"), "--no-progress"],
        "knn": ["knn", "--backbone", str(run), "--train", train, "--val", val, "--floors", "off", "--no-progress",
                "--out", str(out / "r.json")],
        "linear": ["linear", "--backbone", str(run), "--train", train, "--val", val, "--floors", "off",
                   "--no-progress", "--out", str(out / "r.json")],
        "finetune": ["finetune", "--backbone", str(run), "--train", train, "--val", val, "--floors", "off",
                     "--out-dir", str(out / "ft"), "--out", str(out / "r.json"), "--no-progress"],
        "neighbours --query": ["neighbours", str(world["embeddings"]), "--query", str(next(world["images"].iterdir())),
                               "--out", str(out), "--no-progress"],
    }[name]


ENTRY_POINTS = ["export", "cluster", "pretrain model.init", "pretrain resume", "embed", "knn", "linear", "finetune"]


def _refused_on_the_command_line(world, capsys, name: str, form: str, run: Path) -> None:
    out = world["root"] / "outputs" / f"{name}-{form}".replace(" ", "_").replace(".", "_")
    before = snapshot(world["root"])
    capsys.readouterr()
    code = main(_command(world, name, run, out))
    err = capsys.readouterr().err
    assert not world["marker"].exists(), f"{name} / {form}: the payload ran"
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swavkit ") and SHARDED_MESSAGES[form] in lines[0], err
    assert snapshot(world["root"]) == before, f"{name} / {form} changed files"


@pytest.mark.parametrize("form", ["metadata-pickle", "data-item-pickle", "whole-file-pickle"])
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_no_entry_point_runs_code_from_a_checkpoint(world, capsys, name, form):
    _refused_on_the_command_line(world, capsys, name, form, world["runs"][form])


@pytest.mark.parametrize("form", ["metadata-truncated", "metadata-oversized-tensor", "shard-truncated",
                                  "last-pt-edited"])
@pytest.mark.parametrize("name", ["export", "pretrain resume", "embed"])
def test_damaged_checkpoints_are_one_line_at_the_command_line(world, capsys, name, form):
    _refused_on_the_command_line(world, capsys, name, form, world["runs"][form])


def test_neighbours_query_never_runs_code_from_the_run_its_manifest_names(world, capsys):
    _refused_on_the_command_line(world, capsys, "neighbours --query", "metadata-pickle", world["queried"])
