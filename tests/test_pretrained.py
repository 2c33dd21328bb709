"""Released checkpoint layouts (reference SwAV, VISSL), strict loading, torchvision export."""

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from swavkit.core.model import build_model
from swavkit.artifacts.pretrained import LoadError, export_torchvision, load_backbone, load_swav_model


@pytest.fixture(scope="module")
def reference_model():
    """A SwAVModel shaped like the released ResNet-50 (2048 -> 2048 -> 128, 3000 prototypes)."""
    torch.manual_seed(0)
    model = build_model("resnet50", n_prototypes=3000, hidden_dim=2048, output_dim=128).eval()
    for module in model.modules():  # non-trivial BN statistics, so a wrong mapping shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def reference_layout(model) -> dict:
    """The key layout of the torch.hub SwAV files: DDP's module. prefix, projection_head.{0,1,3}, prototypes."""
    state = {f"module.{k}": v for k, v in model.backbone.state_dict().items()}
    state |= {f"module.projection_head.{k[len('layers.'):]}": v for k, v in model.head.state_dict().items()}
    state["module.prototypes.weight"] = model.prototypes.weight.detach().clone()
    return state


def test_reference_swav_checkpoint_loads_exactly(reference_model, tmp_path):
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(reference_layout(reference_model), path)
    net = load_backbone(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference_model.backbone(x), rtol=0, atol=0)
        model, config = load_swav_model(path)
        torch.testing.assert_close(model(x)[1], reference_model(x)[1], rtol=0, atol=0)
    assert config["model"]["n_prototypes"] == 3000 and config["model"]["hidden_dim"] == 2048


def test_vissl_trunk_layout_loads_exactly(reference_model, tmp_path):
    trunk = {f"_feature_blocks.{k}": v for k, v in reference_model.backbone.state_dict().items()}
    path = tmp_path / "vissl_model_final.torch"
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}, path)
    net = load_backbone(path)
    for key, value in reference_model.backbone.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


def test_mismatch_names_the_keys(reference_model, tmp_path):
    state = reference_layout(reference_model)
    del state["module.layer4.2.conv3.weight"]
    state["module.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(LoadError, match=r"missing keys: layer4\.2\.conv3\.weight.*unexpected keys: extra\.weight"):
        load_backbone(path)
    with pytest.raises(LoadError, match="wrong shapes"):
        load_backbone(path, architecture="resnet18")


def test_torchvision_layout_export(reference_model, tmp_path):
    path = tmp_path / "ref.pth"
    torch.save(reference_layout(reference_model), path)
    out = export_torchvision(path, tmp_path / "resnet50_torchvision.safetensors")
    tv = torchvision.models.resnet50()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), reference_model.backbone(x), rtol=1e-5, atol=1e-5)


def test_timm_random_init_source():
    net = load_backbone("timm:resnet10t")
    assert net.num_classes == 0 and not net.training


# ----------------------------------------------------------------------------------------------------
# resolve_source: one meaning of a source argument

def _tiny_checkpoint(path, backbone: str = "resnet10t", seed: int = 0):
    """A swavkit training checkpoint (format and config as train writes them) of a tiny SwAVModel."""
    from swavkit.artifacts.checkpoint import CHECKPOINT_FORMAT, save_atomic
    from swavkit.config import from_dict, to_dict

    torch.manual_seed(seed)
    model = build_model(backbone, n_prototypes=10, hidden_dim=32, output_dim=16)
    cfg = from_dict({"model": {"backbone": backbone, "n_prototypes": 10, "hidden_dim": 32, "output_dim": 16}})
    save_atomic({"format": CHECKPOINT_FORMAT, "config": to_dict(cfg), "step": 1, "model": model.state_dict()}, path)
    return model


def test_resolve_source_gives_each_folder_one_meaning(tmp_path):
    from swavkit.artifacts.checkpoint import export_backbone
    from swavkit.artifacts.pretrained import resolve_source

    run = tmp_path / "run"
    model = _tiny_checkpoint(run / "checkpoints" / "last.pt")
    # an unfinished run (no backbone/ yet): both needs give the checkpoint
    assert resolve_source(run) == resolve_source(run, need="checkpoint") == run / "checkpoints" / "last.pt"
    assert resolve_source(run / "checkpoints") == run / "checkpoints" / "last.pt"
    export_backbone(model.backbone, run / "backbone", image_size_px=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert resolve_source(run) == run / "backbone"
    assert resolve_source(run, need="checkpoint") == run / "checkpoints" / "last.pt"
    assert resolve_source(run / "backbone") == run / "backbone"
    with pytest.raises(LoadError, match="exported backbone .*checkpoints/last.pt"):
        resolve_source(run / "backbone", need="checkpoint")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="empty: a folder without config.json"):
        resolve_source(tmp_path / "empty")
    with pytest.raises(LoadError, match="missing does not exist"):
        resolve_source(tmp_path / "missing")
    # the loaders follow it: a run folder gives the same backbone and model as its files
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(run)(x), model.eval().backbone(x), rtol=0, atol=0)
        torch.testing.assert_close(load_swav_model(run)[0](x)[1], model(x)[1], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# model.init: starting weights, local files only

def _assert_same_state(state: dict, expected: dict) -> None:
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_initial_state_from_an_export_and_a_run(tmp_path):
    from swavkit.artifacts.checkpoint import export_backbone
    from swavkit.artifacts.pretrained import load_initial_backbone_state

    model = _tiny_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", seed=3)
    expected = model.backbone.state_dict()
    _assert_same_state(load_initial_backbone_state(tmp_path / "run", "resnet10t"), expected)
    export_backbone(model.backbone, tmp_path / "export", image_size_px=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    _assert_same_state(load_initial_backbone_state(tmp_path / "export", "resnet10t"), expected)
    with pytest.raises(LoadError, match="holds a resnet10t backbone but model.backbone is resnet18"):
        load_initial_backbone_state(tmp_path / "export", "resnet18")


def test_initial_state_from_a_released_checkpoint(tmp_path):
    """The reference layout: module. prefix, projection_head.*, prototypes.* (dropped: the head starts fresh)."""
    from swavkit.artifacts.pretrained import load_initial_backbone_state

    torch.manual_seed(1)
    model = build_model("resnet10t", n_prototypes=10, hidden_dim=32, output_dim=16)
    released = reference_layout(model)
    assert any(k.startswith("module.prototypes") for k in released)
    torch.save(released, tmp_path / "swav_release.pth")
    _assert_same_state(load_initial_backbone_state(tmp_path / "swav_release.pth", "resnet10t"),
                       model.backbone.state_dict())
    del released["module.layer4.0.conv1.weight"]
    torch.save(released, tmp_path / "broken.pth")
    with pytest.raises(LoadError, match=r"model.init: .*broken.pth does not fit .*missing keys: layer4\.0\.conv1\."):
        load_initial_backbone_state(tmp_path / "broken.pth", "resnet10t")


def test_initial_state_from_timm_weights_on_disk_never_downloads(tmp_path, monkeypatch):
    """A timm pretrained name loads from timm's caches only; missing weights name where timm looks."""
    import timm
    from huggingface_hub import constants as hf_constants
    from safetensors.torch import save_file

    from swavkit.artifacts.pretrained import load_initial_backbone_state, locate_initial_source

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError) as err:
        locate_initial_source("resnet10t.c3_in1k")
    message = str(err.value)
    assert "not on disk" in message and str(tmp_path / "hf") in message and str(tmp_path / "torch") in message
    assert "\n" not in message
    # the file timm's own download would have left in the Hugging Face cache
    torch.manual_seed(2)
    classifier_model = timm.create_model("resnet10t", num_classes=1000)
    snapshot = tmp_path / "hf" / "models--timm--resnet10t.c3_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    weights = {k: v.contiguous() for k, v in classifier_model.state_dict().items()}
    save_file(weights, str(snapshot / "model.safetensors"))
    state = load_initial_backbone_state("resnet10t.c3_in1k", "resnet10t")
    expected = {k: v for k, v in classifier_model.state_dict().items() if not k.startswith("fc.")}
    _assert_same_state(state, expected)
