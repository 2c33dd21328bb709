"""Released checkpoint layouts (reference SwAV, VISSL), strict loading, torchvision export."""

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from swavkit.model import build_model
from swavkit.pretrained import LoadError, export_torchvision, load_backbone, load_swav_model


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
