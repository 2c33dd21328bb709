"""Backbone (any timm model, wrapped, never copied) + projection head + L2-normalised prototypes."""

from __future__ import annotations

import difflib

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

from swavkit.config import ConfigError


def is_transformer(backbone: nn.Module) -> bool:
    """Patch-based models (ViT, DeiT, Swin, ...): they want AdamW rather than LARS."""
    return hasattr(backbone, "patch_embed")


def check_backbone_name(name: str) -> None:
    """Raise a one-line :class:`ConfigError` with the closest timm names when ``name`` is not a timm model.

    Cheap (no model is built), so configs are checked before any data folder is scanned.
    """
    if timm.is_model(name):
        return
    known = timm.list_models()
    # Case-insensitive match: "ResNet50" should still suggest resnet50.
    lowered = {n.lower(): n for n in known}
    close = [lowered[n] for n in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)]
    hint = f"did you mean {', '.join(close)}?" if close else f"see timm.list_models('*{name[:4]}*')"
    raise ConfigError(f"model.backbone: '{name}' is not a timm model name; {hint}")


def create_backbone(name: str, zero_init_last: bool | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` returning pooled features [N, num_features].

    Never downloads weights (pretrained=False). Models that can take several input resolutions only when
    told so (vision transformers) get ``dynamic_img_size=True``, so the small crops go through the same
    model; models that have no such option are created without it.

    Args:
        name: a timm model name.
        zero_init_last: None = timm's default; else passed to backbones that have timm's option (ResNets:
            last BN of each block at 0 or 1). False is then a no-op for the others.
        **kwargs: passed to ``timm.create_model`` (``in_chans=1``, ``drop_path_rate=0.1`` ...).

    Returns:
        The backbone module: images [N, C, H, W] -> pooled features [N, num_features].

    Raises:
        ConfigError: ``name`` is not a timm model (the message names the closest ones), or
            ``zero_init_last=True`` for a backbone without that option.

    Example:
        >>> import torch, swavkit
        >>> net = swavkit.create_backbone("resnet10t")
        >>> tuple(net(torch.randn(2, 3, 32, 32)).shape)
        (2, 512)
    """
    check_backbone_name(name)
    optional = {"dynamic_img_size": True} if "dynamic_img_size" not in kwargs else {}
    if zero_init_last is not None and "zero_init_last" not in kwargs:
        optional["zero_init_last"] = zero_init_last
    while True:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, **optional, **kwargs)
        except TypeError as err:
            # timm passes unknown keyword arguments to the model class, which names the one it refuses
            refused = next((key for key in optional if f"'{key}'" in str(err)), None)
            if refused is None:
                raise
            if refused == "zero_init_last" and optional[refused]:
                raise ConfigError(f"model.zero_init_last=true: {name} has no such option (timm ResNet, ResNetV2, "
                                  "RegNet ... have it); set it to false") from None
            del optional[refused]


class ProjectionHead(nn.Module):
    """An MLP: for each hidden width h, Linear -> [BatchNorm1d] -> ReLU; then Linear(last, out).

    ``hidden_dims`` 2048 (an int: one hidden layer; 0 = a single Linear) with BN is the SwAV paper's head;
    [8192, 8192] without BN is SEER's (VISSL ``swav_head`` with ``use_bn: False``). The layers sit in one
    ``nn.Sequential`` named ``layers`` so the default head keeps the state-dict keys ``layers.0``, ``layers.1``
    (BN), ``layers.3`` that older checkpoints and exports carry.
    """

    def __init__(self, in_dim: int, hidden_dims: int | list[int] = 2048, out_dim: int = 128, batch_norm: bool = True):
        super().__init__()
        if isinstance(hidden_dims, int):
            hidden_dims = [hidden_dims] if hidden_dims else []
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in hidden_dims:
            layers.append(nn.Linear(width, hidden))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU(inplace=True))
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in_dim] -> [N, out_dim]"""
        return self.layers(x)


class Prototypes(nn.Module):
    """K prototype vectors c_k (rows of ``weight``, [K, dim]); scores are z @ C^T."""

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_prototypes, dim))
        nn.init.normal_(self.weight)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project rows back onto the unit sphere (done before each step, so scores are cosines)."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[N, dim] unit embeddings -> [N, K] scores."""
        return F.linear(z, self.weight)


class SwAVModel(nn.Module):
    """Composes backbone, head and prototypes; forward takes the list of crops of one batch.

    Grouped forward: consecutive crops of the same size are concatenated and run through the backbone in
    one call per resolution (BN statistics are per resolution group, as in the reference); the head
    and prototypes then run once over all crops.

    Args:
        backbone: a timm model with ``num_classes=0``: images [B, C, H, W] -> pooled features [B, d].
        head: the projection head, features [N, d] -> embeddings [N, out_dim].
        prototypes: K prototype vectors of out_dim (a bias-free linear layer, rows kept at unit length).

    Example:
        >>> import torch, swavkit
        >>> model = swavkit.build_model("resnet10t", n_prototypes=30, hidden_dim=64, output_dim=16)
        >>> crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
        >>> z, scores = model(crops)          # two backbone calls: one per resolution
        >>> tuple(z.shape), tuple(scores.shape)
        ((12, 16), (12, 30))
    """

    def __init__(self, backbone: nn.Module, head: ProjectionHead, prototypes: Prototypes):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.prototypes = prototypes

    @property
    def n_prototypes(self) -> int:
        return self.prototypes.weight.shape[0]

    def embed(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features of every crop, one backbone call per run of equal-sized crops.

        Args:
            crops: V tensors [B, C, H_v, W_v], all large crops first.

        Returns:
            features [V*B, d], crop-major (crop 0's B rows first).
        """
        features = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return torch.cat(features)

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and prototype scores of every crop.

        Args:
            crops: V tensors [B, C, H_v, W_v] (all large crops first), or one tensor [B, C, H, W].

        Returns:
            (z [V*B, out_dim] unit-norm embeddings, scores [V*B, K] cosines with the prototypes), crop-major.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        z = self.head(self.embed(crops))
        # Normalising here, not in the caller, makes it impossible to feed raw embeddings to the
        # prototypes (the classic source of NaNs in Sinkhorn).
        z = F.normalize(z.float(), dim=1).to(z.dtype)
        return z, self.prototypes(z)


def build_model(backbone: str, n_prototypes: int, hidden_dim: int | list[int] = 2048, output_dim: int = 128,
                backbone_kwargs: dict | None = None, zero_init_last: bool = False, head_bn: bool = True) -> SwAVModel:
    """The model to pretrain: a timm backbone, a projection head and prototypes.

    Args:
        backbone: a timm model name (``model.backbone``), created without weights and without classifier.
        n_prototypes: K, the number of prototypes (``model.n_prototypes``; the paper: 3000).
        hidden_dim: the head's hidden width (the paper: 2048), or a list of widths (``head_hidden_dims`` of the
            config; SEER: ``[8192, 8192]``); an empty list or 0 is a single Linear.
        output_dim: dimension of the L2-normalised embedding the prototypes score (the paper: 128).
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``{"in_chans": 1}``).
        zero_init_last: start the last BN of each residual block at 0 (timm's default) or 1. Defaults to the
            SwAV reference (False: its torchvision-style ResNet-50 starts every BN at gamma 1);
            ``backbone_kwargs`` may still override it.
        head_bn: BatchNorm after each hidden Linear of the head (the paper: True; SEER: False).

    Returns:
        A :class:`SwAVModel` in training mode.

    Raises:
        ConfigError: an unknown timm name (with the closest names), or ``zero_init_last=True`` for a
            backbone without that option.

    Example:
        >>> import swavkit
        >>> model = swavkit.build_model("resnet10t", n_prototypes=100, hidden_dim=512, output_dim=64)
        >>> model.n_prototypes, model.backbone.num_features
        (100, 512)
    """
    net = create_backbone(backbone, zero_init_last=zero_init_last, **(backbone_kwargs or {}))
    head = ProjectionHead(net.num_features, hidden_dim, output_dim, batch_norm=head_bn)
    return SwAVModel(net, head, Prototypes(output_dim, n_prototypes))
