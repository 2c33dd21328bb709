"""Training checkpoints (atomic, weights-only loadable) and backbone export for timm.

A training checkpoint is a plain dict of tensors and primitives, so ``torch.load(weights_only=True)``
reads it without executing code. Exports are ``config.json`` + ``model.safetensors`` written by timm's
own ``save_for_hf``, so ``timm.create_model("local-dir:" + path, pretrained=True)`` loads them strictly.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "swavkit-train-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def state_digest(obj, digest=None) -> str:
    """SHA-256 over every tensor's bytes and every primitive in a nested state, in a fixed order.

    torch's zip format has no checksum on tensor data, so a flipped byte in a weight would load
    silently; this digest, stored in the file, catches it."""
    top = digest is None
    digest = digest or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            digest.update(f"K{key!s}".encode())
            state_digest(obj[key], digest)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}".encode())
        for item in obj:
            state_digest(item, digest)
    else:
        digest.update(f"V{obj!r}".encode())
    return digest.hexdigest() if top else ""


def save_atomic(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that a kill or a full disk at any moment leaves either the old
    complete file or the new complete file, never a partial one (temp file + fsync + rename).
    A ``sha256`` entry (see :func:`state_digest`) lets loading detect tampering or bit rot."""
    path = Path(path)
    state = {**state, "sha256": state_digest(state)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state(path: str | Path) -> dict:
    """Load any torch-saved file without executing code; refuse corrupt or unsafe files in one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"refused to load {path}: it holds Python objects that a weights-only load does "
                              f"not allow, so it could run code ({first[:160]}). Only load files you trust, "
                              "and convert them to a plain state dict first") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first[:160]}); delete it to start "
                              "over, or restore a copy") from None
    if isinstance(state, dict) and "sha256" in state:
        stored = state.pop("sha256")
        if stored != state_digest(state):
            raise CheckpointError(f"checkpoint {path} fails its SHA-256 check: its contents changed after it was "
                                  "written (tampering or disk corruption); restore a copy or delete it to start over")
    return state


def load_training_checkpoint(path: str | Path) -> dict:
    state = load_state(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a swavkit training checkpoint (no format '{CHECKPOINT_FORMAT}')")
    return state


def backbone_state(model_state: dict) -> dict:
    """The ``backbone.*`` entries of a SwAVModel state dict, prefix removed."""
    return {k[len("backbone."):]: v for k, v in model_state.items() if k.startswith("backbone.")}


def export_backbone(backbone: torch.nn.Module, out_dir: str | Path, *, image_size_px: int,
                    mean, std, extra: dict | None = None) -> Path:
    """Write ``out_dir/config.json`` + ``out_dir/model.safetensors`` for timm's ``local-dir:`` loader.

    Written to a temporary sibling folder and renamed, so an existing export is replaced only by a
    complete one.
    """
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pretrained_cfg = {"tag": "swavkit", "input_size": [3, image_size_px, image_size_px],
                          "mean": list(mean), "std": list(std), "num_classes": 0}
        pretrained_cfg.update(extra or {})
        save_for_hf(backbone, tmp, model_config={"pretrained_cfg": pretrained_cfg}, safe_serialization=True)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
