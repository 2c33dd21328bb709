import pytest
import torch

from swavkit.model import build_model, create_backbone


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
