"""The backbone as ONNX (``swavkit export SOURCE --onnx FILE``), checked against PyTorch before it is kept.

The graph maps ``images`` [B, C, S, S] float32 (normalised as the export's preprocessing says) to
``features`` [B, D] float32, with a dynamic batch axis B and the evaluation side S fixed (a ViT's position
embeddings, and many convnets' pooling, are tied to it). It is written with torch's own exporter
(``torch.onnx.export(dynamo=True)``, which needs the ``onnx`` and ``onnxscript`` packages: extra
``swavkit[onnx]``) to a temporary sibling of FILE, then run on a batch of a size other than the one it was
traced with, by onnxruntime when installed, else by onnx's reference evaluator (pure numpy, slower), and
compared with the PyTorch backbone's output on the same batch. Only a file whose largest absolute
difference is within tolerance replaces FILE; the difference is printed either way.

FILE's metadata (``metadata_props``) records what a user of the file needs: the source, architecture,
feature dim, preprocessing (side, crop fraction, mean, std) and the weights' sha256 (the same identity
``swavkit embed`` records), plus a marker by which a later export recognises the file as swavkit's to
replace: any other existing file is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

from swavkit.artifacts.identity import backbone_name, input_channels, load_seeded_backbone, weights_sha256
from swavkit.errors import ConfigError
from swavkit.runtime.fileio import file_mode, fsync_dir, naming_output

ONNX_FORMAT = "swavkit-onnx-v1"
FORMAT_KEY = "swavkit_format"
EXPORT_BATCH = 2  # traced with this batch; batch 1 would let the exporter specialise the axis to 1
CHECK_BATCH = 3  # checked with another size: proves the batch axis is really dynamic
# Largest |ONNX - PyTorch| accepted, relative to the largest |PyTorch output| (at least 1): fp32 kernels
# differ in summation order, ~1e-6 relative for a resnet here; 1e-3 still catches a wrong graph.
RELATIVE_TOLERANCE = 1e-3
EXTRA_HINT = 'pip install "swavkit[onnx]" (onnx, onnxscript, onnxruntime)'


def require_exporter() -> None:
    """ConfigError, one line, when torch's ONNX exporter cannot run here (it needs onnx and onnxscript)."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"--onnx needs the {' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, which "
                          f"torch's ONNX exporter imports; {EXTRA_HINT}")


def check_onnx_target(path: str | Path) -> Path:
    """``--onnx FILE`` may be new or an earlier swavkit ONNX export (its marker); anything else is refused
    (FileExistsError, one line) before any work, as ``--out`` result files are (swavkit.evaluation.report)."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"--onnx {path} is a folder; give a file name such as model.onnx")
    if path.exists() and read_metadata(path).get(FORMAT_KEY) != ONNX_FORMAT:
        raise FileExistsError(f"--onnx {path} exists and is not a swavkit ONNX export; choose another file name")
    return path


def read_metadata(path: str | Path) -> dict:
    """The ``metadata_props`` of an ONNX file as a dict ({} when it is no ONNX file or onnx is missing)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file at all (or no onnx package): nothing of ours
        return {}
    return {prop.key: prop.value for prop in model.metadata_props}


def _run_onnx(path: Path, images) -> tuple:
    """(features [B, D] numpy, checker name) of the ONNX file on ``images`` [B, C, S, S] numpy float32."""
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return session.run(None, {name: images})[0], f"onnxruntime {onnxruntime.__version__}"
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    return evaluator.run(None, {evaluator.input_names[0]: images})[0], "onnx.reference (onnxruntime not installed)"


def _trace(backbone, example, tmp: Path) -> None:
    """torch.onnx.export with a dynamic batch axis, its progress lines kept off the terminal."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(backbone, (example,), str(tmp), input_names=["images"], output_names=["features"],
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)


def _add_metadata(tmp: Path, metadata: dict) -> None:
    import onnx

    model = onnx.load(str(tmp))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(tmp))


def export_onnx(source: str | Path, out_file: str | Path, *, image_size_px: int | None = None) -> dict:
    """Write the backbone of ``source`` to ``out_file`` as ONNX (dynamic batch) and check it.

    Args:
        source: any backbone source of :func:`swavkit.load_backbone` (run folder, export, checkpoint,
            released SwAV file) or ``timm:<name>``.
        image_size_px: the fixed input side (default: the export's input size, else the checkpoint's large crop).

    Returns:
        {"path", "input_shape" ["batch", C, S, S], "feature_dim", "max_abs_diff", "tolerance", "checker",
        "check_batch"}. Raises ConfigError (exporter packages missing), FileExistsError (a foreign file at
        ``out_file``), LoadError (the ONNX output differs from PyTorch's beyond tolerance: nothing written).
    """
    import numpy as np
    import torch

    from swavkit.artifacts.preprocessing import resolve_preprocessing  # torch + timm: not at `swavkit --help`
    from swavkit.artifacts.pretrained import LoadError  # torch + timm: not at `swavkit --help`

    require_exporter()
    out_file = check_onnx_target(out_file)
    preprocessing = resolve_preprocessing(source, image_size_px)
    backbone = load_seeded_backbone(source).eval()
    channels, size = input_channels(backbone), preprocessing.image_size_px
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(EXPORT_BATCH, channels, size, size, generator=generator)
    images = torch.randn(CHECK_BATCH, channels, size, size, generator=generator)
    with torch.inference_mode():
        expected = backbone(images).float().numpy()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with naming_output(out_file):  # a read-only folder: name the file asked for, not the temporary one
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, file_mode())  # mkstemp makes it private; the export is an ordinary file
    try:
        _trace(backbone, example, tmp)
        _add_metadata(tmp, {FORMAT_KEY: ONNX_FORMAT, "source": str(source), "architecture": backbone_name(backbone),
                            "feature_dim": int(expected.shape[1]), "in_channels": channels,
                            "weights_sha256": weights_sha256(backbone), "preprocessing": preprocessing.as_dict()})
        found, checker = _run_onnx(tmp, images.numpy())
        max_abs_diff = float(np.max(np.abs(found - expected))) if found.shape == expected.shape else float("inf")
        tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
        if not max_abs_diff <= tolerance:
            raise LoadError(f"--onnx {out_file}: the ONNX graph does not reproduce PyTorch's output (shape "
                            f"{list(found.shape)} vs {list(expected.shape)}, max abs difference {max_abs_diff:.3g} > "
                            f"{tolerance:.3g}, {checker}); nothing was written")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out_file)
        fsync_dir(out_file.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out_file), "input_shape": ["batch", channels, size, size], "feature_dim": int(expected.shape[1]),
            "max_abs_diff": max_abs_diff, "tolerance": tolerance, "checker": checker, "check_batch": CHECK_BATCH}


def describe(result: dict) -> str:
    """The line ``swavkit export --onnx`` prints."""
    return (f"ONNX: {result['path']} (images {result['input_shape']} -> features [batch, {result['feature_dim']}]); "
            f"checked at batch {result['check_batch']} with {result['checker']}: max abs difference to PyTorch "
            f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:.3g})")


__all__ = ["ONNX_FORMAT", "export_onnx", "check_onnx_target", "require_exporter", "read_metadata", "describe"]
