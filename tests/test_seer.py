"""SEER weights: VISSL-format RegNet trunks and timm's ``*.seer`` names (from the local cache only), strictly."""

import re

import pytest
import timm
import torch

from swavkit.config import load_config
from swavkit.artifacts.pretrained import (InitialSource, LoadError, _state_and_architecture, load_backbone,
                                load_initial_backbone_state, locate_initial_source)

# timm name -> VISSL name (the layout of VISSL's RegNet trunk, the inverse of timm.models.regnet._filter_fn)
_TO_VISSL = [("conv1.conv", "f.a.0"), ("conv1.bn", "f.a.1"), ("conv2.conv", "f.b.0"), ("conv2.bn", "f.b.1"),
             ("se.fc1", "f.se.excitation.0"), ("se.fc2", "f.se.excitation.2"), ("conv3.conv", "f.c"),
             ("conv3.bn", "f.final_bn"), ("downsample.conv", "proj"), ("downsample.bn", "bn")]


def vissl_file(tmp_path, architecture="regnety_002"):
    """A tiny SEER-like checkpoint: VISSL's classy_state_dict with a RegNet trunk and a SwAV head."""
    torch.manual_seed(0)
    net = timm.create_model(architecture, num_classes=0)
    trunk = {}
    for key, value in net.state_dict().items():
        key = key.replace("stem.conv", "_feature_blocks.conv1.stem.0").replace("stem.bn", "_feature_blocks.conv1.stem.1")
        for timm_name, vissl_name in _TO_VISSL:
            key = key.replace(f".{timm_name}.", f".{vissl_name}.")
        key = re.sub(r"^s(\d)\.b(\d+)\.", lambda m: f"_feature_blocks.res{int(m.group(1)) + 1}.block{m.group(1)}-"
                     f"{int(m.group(2)) - 1}.", key)
        trunk[key] = value
    heads = {"0.projection_head.0.weight": torch.randn(8, net.num_features), "0.prototypes0.weight": torch.randn(5, 8)}
    path = tmp_path / "seer_tiny_model_final_checkpoint_phase0.torch"
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}}}, path)
    return path, net.state_dict()


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_vissl_regnet_file_loads_strictly(tmp_path):
    path, expected = vissl_file(tmp_path)
    assert any(k.startswith("_feature_blocks.res2.block1-0.f.a.0") for k in
               torch.load(path)["classy_state_dict"]["base_model"]["model"]["trunk"])
    assert_same(load_backbone(path, architecture="regnety_002").state_dict(), expected)
    assert_same(load_initial_backbone_state(path, "regnety_002"), expected)  # model.init
    cfg = load_config([], [f"model.init={path}", "model.backbone=regnety_002"])
    assert cfg.model.init == str(path)
    with pytest.raises(LoadError, match="does not fit model.backbone regnety_004"):  # another RegNet: refused
        load_initial_backbone_state(path, "regnety_004")


def test_vissl_regnet_missing_key_is_named(tmp_path):
    path, _ = vissl_file(tmp_path)
    state = torch.load(path)
    del state["classy_state_dict"]["base_model"]["model"]["trunk"]["_feature_blocks.res3.block2-0.f.b.0.weight"]
    torch.save(state, path)
    with pytest.raises(LoadError, match=r"missing keys: s2\.b1\.conv2\.conv\.weight"):
        load_backbone(path, architecture="regnety_002")


def test_timm_seer_name_found_in_the_local_cache_only(tmp_path, monkeypatch):
    """regnety_320.seer is 141 M parameters: the test checks where swavkit looks (a fake torch hub cache) and
    that timm's own file loader, which ``model.init=<name>.seer`` uses, maps a VISSL-format file strictly."""
    import huggingface_hub.constants

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # nothing real is looked at
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(LoadError, match="regnety_320.seer' are not on disk.*never downloads"):
        locate_initial_source("regnety_320.seer")
    url = timm.models.get_pretrained_cfg("regnety_320.seer").url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not read here")
    located = locate_initial_source("regnety_320.seer")
    assert located.kind == "timm" and located.path == cached
    # what _state_and_architecture does with a located *.seer file, on a tiny RegNet with the same loader
    path, expected = vissl_file(tmp_path)
    state, architecture = _state_and_architecture(InitialSource("timm", path, "regnety_002.pycls_in1k"), {})
    assert architecture == "regnety_002.pycls_in1k"
    assert_same(state, expected)


# the SEER recipes (configs/seer_regnety_1.3b.yaml, configs/seer_10b.yaml): tests/test_seer_scale.py
