"""Training checkpoints (atomic, weights-only loadable) and backbone export for timm.

A training checkpoint is a plain dict of tensors and primitives, so ``torch.load(weights_only=True)``
reads it without executing code. Exports are ``config.json`` + ``model.safetensors`` written by timm's
own ``save_for_hf``, so ``timm.create_model("local-dir:" + path, pretrained=True)`` loads them strictly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

from swavkit.errors import UserError
from swavkit.runtime.fileio import (atomic_writer, file_mode, fsync_dir, make_temp_folder, naming, write_json_atomic,
                                    write_text_atomic)
from swavkit.data.constants import crop_fraction_for
from swavkit.artifacts.layout import EXPORT_CONFIG, EXPORT_FILES, EXPORT_WEIGHTS
from swavkit.artifacts.modelcard import MODEL_CARD_FILE, is_swavkit_model_card

CHECKPOINT_FORMAT = "swavkit-train-v1"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


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
    with atomic_writer(path) as handle:
        torch.save(state, handle)
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


def read_checkpoint(path: str | Path, format_tag: str, what: str, remedy: str = "") -> dict:
    """A checkpoint file whose ``format`` entry is ``format_tag``; CheckpointError (one line) for any other file,
    naming it, ``what`` it should be and the ``remedy``."""
    state = load_state(path)
    if not isinstance(state, dict) or state.get("format") != format_tag:
        raise CheckpointError(f"{path} is not a swavkit {what} (no format '{format_tag}')" + (f"; {remedy}" if remedy
                                                                                              else ""))
    return state


def load_training_checkpoint(path: str | Path) -> dict:
    """A swavkit training checkpoint as saved (an FSDP run's holds ``sharded`` instead of ``model``: its whole
    model comes from :func:`swavkit.artifacts.sharded_checkpoint.load_whole_training_checkpoint`)."""
    return read_checkpoint(path, CHECKPOINT_FORMAT, "training checkpoint")


def is_swavkit_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a training checkpoint in swavkit's format: it loads weights-only (no code runs) and
    carries ``format: swavkit-train-v1``. Cheap at any size: the tensors are memory-mapped, never read, and
    the SHA-256 is not checked (it proves the file intact, not who wrote it). What makes a folder a run that
    ``--restart`` may clear (swavkit.artifacts.rundir)."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any file torch cannot read weights-only is not one swavkit wrote
        return False
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


def backbone_state(model_state: dict) -> dict:
    """The ``backbone.*`` entries of a SwAVModel state dict, prefix removed."""
    return {k[len("backbone."):]: v for k, v in model_state.items() if k.startswith("backbone.")}


# What an export folder holds (README.md = the model card). A folder with anything else in it was not
# written by swavkit alone, so export refuses to replace it.
EXPORT_TAG = "swavkit"
# config.json's record of data.bit_depth=16 (absent: 8), read by swavkit.artifacts.preprocessing.resolve_preprocessing
EXPORT_BIT_DEPTH_KEY = "input_bit_depth"
# pretrained_cfg entries that describe our weights and how to feed them. timm's registry entry for the
# architecture also carries test_input_size, licence, origin URL, paper ids ...: claims about *timm's*
# weights, not ours, so they are dropped from the export.
_EXPORT_CFG_KEYS = ("tag", "custom_load", "input_size", "fixed_input_size", "interpolation", "crop_pct",
                    "crop_mode", "mean", "std", "num_classes", "pool_size", "first_conv", "classifier")


def is_swavkit_export(path: str | Path) -> bool:
    """True for a folder that holds exactly what :func:`export_backbone` writes, tagged as ours."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False

    names = {entry.name for entry in path.iterdir()}
    if not names or not names <= set(EXPORT_FILES) or EXPORT_CONFIG not in names:
        return False
    if MODEL_CARD_FILE in names and not is_swavkit_model_card(path / MODEL_CARD_FILE):
        return False  # a README of the user's own
    try:
        config = json.loads((path / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("pretrained_cfg") or {}).get("tag") == EXPORT_TAG


def _foreign_entries(path: Path) -> list[str]:
    """The entries of a folder that an export would not hold (a README counts unless it is our card)."""

    ours = set(EXPORT_FILES) - {MODEL_CARD_FILE}
    if is_swavkit_model_card(path / MODEL_CARD_FILE):
        ours.add(MODEL_CARD_FILE)
    return sorted(entry.name for entry in path.iterdir() if entry.name not in ours) or ["a config.json without swavkit's tag"]


def check_export_target(out_dir: str | Path) -> Path:
    """Refuse (CheckpointError, one line) an ``out_dir`` that exists and is neither empty nor an export."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise CheckpointError(f"export target {out_dir} exists and is not a folder; choose a new folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_swavkit_export(out_dir):
        shown = ", ".join(_foreign_entries(out_dir)[:5])
        raise CheckpointError(f"export target {out_dir} holds files swavkit did not write ({shown}); it only "
                              "replaces its own exports (config.json + model.safetensors): choose a new or "
                              "empty folder")
    return out_dir


def _exchange_folders(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        renameat2 = ctypes.CDLL(libc_name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def export_backbone(backbone: torch.nn.Module, out_dir: str | Path, *, image_size_px: int,
                    mean, std, extra: dict | None = None, model_card: str | None = None, bit_depth: int = 8) -> Path:
    """Write ``out_dir/config.json`` + ``out_dir/model.safetensors`` for timm's ``local-dir:`` loader, and
    ``out_dir/README.md`` when a ``model_card`` text is given (then the folder is ready for the Hub).

    ``out_dir`` must be new, empty, or an earlier swavkit export (:func:`check_export_target`); the files
    are written to a temporary sibling and fsynced, then swapped in atomically, so ``out_dir`` always
    holds one complete export. ``mean``/``std`` hold one value per input channel (``input_size`` follows);
    ``bit_depth`` 16 is recorded as ``config.json["input_bit_depth"]`` (timm's pretrained_cfg refuses unknown
    keys; timm ignores this top-level one), which swavkit.artifacts.preprocessing reads back for evaluation.
    """
    from timm.models import save_for_hf

    out_dir = check_export_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_folder(out_dir.parent, f".{out_dir.name}.")  # renamed into place: an ordinary mode
    try:
        # crop_pct: how swavkit evaluates at this size (timm's registry value, e.g. 0.95, is not)
        pretrained_cfg = {"tag": EXPORT_TAG, "input_size": [len(mean), image_size_px, image_size_px],
                          "crop_pct": crop_fraction_for(image_size_px), "mean": list(mean), "std": list(std),
                          "num_classes": 0}
        pretrained_cfg.update(extra or {})
        save_for_hf(backbone, tmp, model_config={"pretrained_cfg": pretrained_cfg}, safe_serialization=True)
        config = json.loads((tmp / EXPORT_CONFIG).read_text(encoding="utf-8"))
        config["pretrained_cfg"] = {k: v for k, v in config["pretrained_cfg"].items() if k in _EXPORT_CFG_KEYS}
        if bit_depth != 8:  # only then: 8-bit RGB exports stay as they were
            config[EXPORT_BIT_DEPTH_KEY] = int(bit_depth)
        write_json_atomic(tmp / EXPORT_CONFIG, config)
        if model_card is not None:
            write_text_atomic(tmp / MODEL_CARD_FILE, model_card)
        with open(tmp / EXPORT_WEIGHTS, "rb+") as handle:
            os.fchmod(handle.fileno(), file_mode())  # safetensors writes it 0600: others could not load it
            os.fsync(handle.fileno())
        fsync_dir(tmp)
        if out_dir.is_dir() and _exchange_folders(tmp, out_dir):
            pass  # tmp now holds the previous export, removed below
        elif out_dir.is_dir():
            # No atomic exchange here: a short moment without out_dir, never a partial one.
            old = make_temp_folder(out_dir.parent, f".{out_dir.name}.old.")
            os.replace(out_dir, old / "previous")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except OSError as err:  # the temporary folder's name means nothing to the user: name the export
        raise naming(err, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
