"""`swavkit export --onnx`: a dynamic-batch ONNX graph that reproduces the PyTorch backbone, written only
when checked; one line when the exporter's packages are missing; a foreign file is never replaced."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from swavkit.artifacts.checkpoint import export_backbone
from swavkit.cli import main
from swavkit.evaluation.features import load_eval_backbone


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """An exported resnet10t whose input size is 32 px (the ONNX graph's fixed side)."""
    folder = tmp_path_factory.mktemp("onnx") / "export"
    torch.manual_seed(0)
    return export_backbone(load_eval_backbone("timm:resnet10t"), folder, image_size_px=32,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def onnx_file(backbone_dir, tmp_path_factory):
    """(the file `swavkit export EXPORT --onnx FILE` wrote, what it printed)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import contextlib
    import io

    target = tmp_path_factory.mktemp("onnx_out") / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(backbone_dir), "--onnx", str(target)]) == 0
    return target, printed.getvalue()


def test_onnx_reproduces_pytorch_at_any_batch_and_records_the_backbone(backbone_dir, onnx_file, tmp_path, capsys):
    import onnxruntime

    from swavkit.embeddings.embed import weights_sha256
    from swavkit.artifacts.onnx_export import read_metadata

    target, printed = onnx_file
    assert "max abs difference to PyTorch" in printed and "checked at batch 3 with onnxruntime" in printed
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch" and session.get_inputs()[0].shape[1:] == [3, 32, 32]
    backbone = load_eval_backbone(backbone_dir)
    for batch in (1, 5):  # neither is the traced batch (2) nor the checked one (3)
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = backbone(images).numpy()
        found = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
        assert found.shape == (batch, 512)
        assert np.abs(found - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())
    metadata = read_metadata(target)
    assert metadata["weights_sha256"] == weights_sha256(backbone) and metadata["architecture"] == "resnet10t"
    assert '"image_size_px": 32' in metadata["preprocessing"] and '"mean": [0.5, 0.5, 0.5]' in metadata["preprocessing"]

    # someone else's file is not replaced (its own is: the next test)
    foreign = tmp_path / "theirs.onnx"
    foreign.write_bytes(b"not ours")
    assert main(["export", str(backbone_dir), "--onnx", str(foreign)]) == 2
    assert "exists and is not a swavkit ONNX export" in capsys.readouterr().err
    assert foreign.read_bytes() == b"not ours"


def test_onnx_check_runs_without_onnxruntime_and_replaces_its_own_file(backbone_dir, onnx_file, monkeypatch):
    from swavkit.artifacts.onnx_export import export_onnx

    target, _ = onnx_file
    before = target.stat().st_ino
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = export_onnx(backbone_dir, target)
    assert result["checker"].startswith("onnx.reference") and result["max_abs_diff"] <= result["tolerance"]
    assert result["input_shape"] == ["batch", 3, 32, 32] and target.stat().st_ino != before  # a new file, renamed in


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_missing_exporter_packages_are_one_line_naming_the_extra(backbone_dir, tmp_path, monkeypatch, capsys,
                                                                missing):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    out_dir = tmp_path / "timm_export"
    assert main(["export", str(backbone_dir), str(out_dir), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    # the packages absent here are named (a fresh install without the extra lacks both)
    named = err.split("needs the ", 1)[-1].split(" package", 1)[0].split(" and ")
    assert len(err.splitlines()) == 1 and missing in named and 'swavkit[onnx]' in err
    assert list(tmp_path.iterdir()) == []  # refused before anything, the timm export included, was written


def test_export_needs_a_target(backbone_dir, capsys):
    assert main(["export", str(backbone_dir)]) == 2
    assert "give OUT_DIR" in capsys.readouterr().err
