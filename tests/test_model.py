import pytest
import torch

from swavkit.core.model import build_model, create_backbone


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet10t", n_prototypes=12, hidden_dim=32, output_dim=16).eval()


def test_grouped_forward_equals_per_crop_forward(model):
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(3, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(3, 3, 16, 16, generator=g)
                                                                          for _ in range(3)]
    with torch.no_grad():
        z, scores = model(crops)
        per_crop = [model(c) for c in crops]
    torch.testing.assert_close(z, torch.cat([p[0] for p in per_crop]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, torch.cat([p[1] for p in per_crop]), rtol=1e-4, atol=1e-5)
    assert z.shape == (15, 16) and scores.shape == (15, 12)


def test_grouped_forward_calls_backbone_once_per_resolution(model):
    calls = []
    handle = model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 4
    with torch.no_grad():
        model(crops)
    handle.remove()
    assert [tuple(c) for c in calls] == [(4, 3, 32, 32), (8, 3, 16, 16)]


def test_embeddings_unit_norm_and_scores_are_cosines(model):
    model.prototypes.weight.data.mul_(7.0)  # un-normalised prototypes, as after an optimiser step
    model.prototypes.normalize_()
    with torch.no_grad():
        z, scores = model([torch.randn(4, 3, 32, 32) * 50])
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    assert scores.abs().max() <= 1.0 + 1e-5


def test_vit_backbone_accepts_multiple_crop_sizes():
    net = create_backbone("vit_tiny_patch16_224", img_size=32, depth=1)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == net(torch.randn(1, 3, 16, 16)).shape


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="not a timm model name"):
        create_backbone("resnet_does_not_exist")


def last_bn_of_each_block(net: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    """The BN closing each residual branch (bn2 of a BasicBlock, bn3 of a Bottleneck): the last BN that is
    a direct child of a block (the shortcut's BN sits inside ``downsample``)."""
    blocks = [m for m in net.modules() if hasattr(m, "zero_init_last")]
    return [[c for c in block.children() if isinstance(c, torch.nn.BatchNorm2d)][-1] for block in blocks]


def test_resnets_start_like_the_reference_unless_asked():
    """The SwAV reference (torchvision-style ResNet-50) starts every BN at gamma 1; timm zero-inits the last
    BN of each block. The pretraining model, the defaults and the paper configs follow the reference."""
    from pathlib import Path

    from swavkit.config import Config, load_config

    reference_init = last_bn_of_each_block(build_model("resnet10t", n_prototypes=4, hidden_dim=0, output_dim=8).backbone)
    assert len(reference_init) == 4 and all(bn.weight.detach().eq(1).all() for bn in reference_init)
    timm_init = last_bn_of_each_block(build_model("resnet10t", 4, 0, 8, zero_init_last=True).backbone)
    assert all(bn.weight.detach().eq(0).all() for bn in timm_init)
    configs = Path(__file__).resolve().parent.parent / "configs"
    assert Config().model.zero_init_last is False
    for recipe in ("imagenet_resnet50.yaml", "single_gpu_queue.yaml"):
        assert load_config([configs / recipe]).model.zero_init_last is False


def test_zero_init_last_only_where_the_backbone_has_it():
    vit = dict(img_size=32, depth=1)
    build_model("vit_tiny_patch16_224", 4, 0, 8, backbone_kwargs=vit)  # false: nothing to do on a ViT
    with pytest.raises(ValueError, match="model.zero_init_last=true: vit_tiny_patch16_224 has no such option"):
        build_model("vit_tiny_patch16_224", 4, 0, 8, backbone_kwargs=vit, zero_init_last=True)
