"""Image encoder: ViT-style patch stem (or a torchvision backbone from local weights) + small transformer.

Shapes: ``N`` images, ``C`` channels, ``S`` image side, ``P`` patch side, ``L`` tokens per image,
``W`` encoder width, ``Cb`` backbone feature channels, ``gh``/``gw`` patch grid rows/columns (``L = gh * gw``).

Accounting: ``num_params()`` is analytic for our own layers (tested against ``numel``); ``flops_per_item()``
is analytic for the patch stem (tested against ``FlopCounterMode``). A torchvision backbone is counted by
measurement instead: its parameters by ``numel`` and its FLOPs by one probe forward at construction.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

from moekit.multimodal.blocks import LN_EPS, EncoderLayer, layer_flops, layer_params
from moekit.multimodal.config import ImageEncoderConfig

# Feature node used as tokens when ``backbone_node`` is None: the last spatial map before pooling.
DEFAULT_BACKBONE_NODES = (
    (("resnet", "resnext", "wide_resnet"), "layer4"),
    (("regnet",), "trunk_output"),
    (("vgg", "alexnet", "densenet", "squeezenet", "mobilenet", "efficientnet", "convnext"), "features"),
    (("mnasnet",), "layers"),
    (("shufflenet",), "conv5"),
    (("vit_",), "encoder"),
)


def build_image_transform(cfg: ImageEncoderConfig, train: bool) -> v2.Compose:
    """uint8 ``[C0, H, W]`` (or ``[N, C0, H, W]``) -> normalised float32 ``[C, S, S]``.

    Grey images become RGB when the encoder wants 3 channels. ``train`` adds a light random affine when
    ``cfg.augment``; it draws from torch's global RNG, so callers that need determinism seed it (the
    task sampler runs it under ``torch.random.fork_rng`` with a per-sample seed).
    """
    steps: list[nn.Module] = [v2.ToDtype(torch.float32, scale=True)]
    if cfg.in_channels == 3:
        steps.append(v2.RGB())
    elif cfg.in_channels == 1:
        steps.append(v2.Grayscale(num_output_channels=1))
    steps.append(v2.Resize((cfg.image_size, cfg.image_size), antialias=True))  # no-op at the right size
    if train and cfg.augment:
        steps.append(v2.RandomAffine(degrees=10.0, translate=(0.1, 0.1), scale=(0.9, 1.1)))
    steps.append(v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)))
    return v2.Compose(steps)


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"ImageEncoderConfig.weights_path={path!r} does not exist (weights are never downloaded)"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"ImageEncoderConfig.weights_path={path!r} holds a {type(state).__name__}, not a state dict")
    return state


def _default_node(name: str) -> str:
    for prefixes, node in DEFAULT_BACKBONE_NODES:
        if name.startswith(prefixes):
            return node
    raise ValueError(
        f"ImageEncoderConfig.backbone_node=None has no default for backbone={name!r}; set backbone_node to a "
        "feature node name (see torchvision.models.feature_extraction.get_graph_node_names)"
    )


class BackboneStem(nn.Module):
    """A torchvision classifier cut at ``backbone_node``; its features become tokens ``[N, L, Cb]``."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        import torchvision.models as tvm
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        names = tvm.list_models(module=tvm)
        if cfg.backbone not in names:
            raise ValueError(
                f"ImageEncoderConfig.backbone={cfg.backbone!r} is not a torchvision classification model; "
                f"allowed: {names}"
            )
        node = cfg.backbone_node or _default_node(cfg.backbone)
        model = tvm.get_model(cfg.backbone, weights=None)  # weights=None: never downloads
        if cfg.weights_path is not None:
            model.load_state_dict(_load_state_dict(cfg.weights_path), strict=True)
        try:  # a module name (e.g. "layer4") stands for that module's output
            self.body = create_feature_extractor(model, return_nodes={node: "features"})
        except ValueError as err:
            nodes = get_graph_node_names(model)[1]
            raise ValueError(
                f"ImageEncoderConfig.backbone_node={node!r} is not a node of {cfg.backbone}; last nodes: {nodes[-12:]}"
            ) from err
        # Probe once in eval mode (batch-norm statistics stay untouched) to learn the token grid and cost.
        self.body.eval()
        probe = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            tokens = self.tokens(probe)
        self.body.train()
        self.num_tokens, self.out_channels = tokens.shape[1], tokens.shape[2]
        self.flops_per_item = counter.get_total_flops()

    def tokens(self, images_ncss: Tensor) -> Tensor:
        feats = self.body(images_ncss)["features"]
        if feats.dim() == 4:  # a feature map: one token per cell, row-major
            return rearrange(feats, "n cb h w -> n (h w) cb")
        if feats.dim() == 3:  # already [N, L, Cb] (ViT encoder output)
            return feats
        if feats.dim() == 2:  # pooled [N, Cb]: one token
            return feats[:, None, :]
        raise ValueError(f"backbone features have shape {tuple(feats.shape)}; expected 2-D, 3-D or 4-D")

    def forward(self, images_ncss: Tensor) -> Tensor:
        return self.tokens(images_ncss)


def image_encoder_params(cfg: ImageEncoderConfig) -> int:
    """Parameters of the patch-stem encoder (use ``ImageEncoder.num_params()`` for backbones)."""
    if cfg.backbone is not None:
        raise ValueError("image_encoder_params: backbone encoders are counted by ImageEncoder.num_params()")
    W, L, p = cfg.width, cfg.num_patches, cfg.patch_size
    stem = cfg.in_channels * p * p * W + W
    return stem + L * W + cfg.depth * layer_params(W, cfg.mlp_hidden) + 2 * W


def image_encoder_flops(cfg: ImageEncoderConfig) -> int:
    """Forward FLOPs per image of the patch-stem encoder: patch conv + transformer layers."""
    if cfg.backbone is not None:
        raise ValueError("image_encoder_flops: backbone encoders are counted by ImageEncoder.flops_per_item()")
    W, L, p = cfg.width, cfg.num_patches, cfg.patch_size
    return 2 * L * cfg.in_channels * p * p * W + cfg.depth * layer_flops(W, cfg.mlp_hidden, L)


class ImageEncoder(nn.Module):
    """images ``[N, C, S, S]`` (normalised) -> tokens ``[N, L, W]``."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        self.patch: nn.Conv2d | None = None
        self.backbone: BackboneStem | None = None
        self.adapter: nn.Linear | None = None
        if cfg.backbone is None:
            self.patch = nn.Conv2d(cfg.in_channels, W, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            self.num_tokens = cfg.num_patches
        else:
            self.backbone = BackboneStem(cfg)
            self.adapter = nn.Linear(self.backbone.out_channels, W)
            self.num_tokens = self.backbone.num_tokens
        self.pos = nn.Parameter(torch.empty(1, self.num_tokens, W))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(EncoderLayer(W, cfg.n_heads, cfg.mlp_hidden, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(W, eps=LN_EPS)

    @property
    def out_dim(self) -> int:
        return self.cfg.width

    def forward(self, images_ncss: Tensor) -> Tensor:
        """``images`` float (normalised), or uint8 0..255: scaled to [0, 1] and normalised with ``cfg.mean/std``,
        exactly as ``build_image_transform(cfg, train=False)`` does for an image already of the right size."""
        c = self.cfg
        if images_ncss.dim() != 4 or tuple(images_ncss.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"ImageEncoder expects images [N, {c.in_channels}, {c.image_size}, {c.image_size}] (ImageEncoderConfig"
                f".in_channels={c.in_channels}, image_size={c.image_size}), got {tuple(images_ncss.shape)}; "
                "build_image_transform(cfg) converts channels and resizes"
            )
        if images_ncss.dtype == torch.uint8:
            images_ncss = v2.functional.to_dtype(images_ncss, torch.float32, scale=True)
            images_ncss = v2.functional.normalize(images_ncss, list(c.mean), list(c.std))
            images_ncss = images_ncss.to(self.pos.dtype)
        elif not images_ncss.is_floating_point():
            raise ValueError(
                f"ImageEncoder: images must be float (normalised) or uint8 (0..255); got dtype {images_ncss.dtype}"
            )
        if self.patch is not None:
            x_nlw = rearrange(self.patch(images_ncss), "n w gh gw -> n (gh gw) w")  # one token per patch, row-major
        else:
            x_nlw = self.adapter(self.backbone(images_ncss))  # [N, L, W]
        x_nlw = x_nlw + self.pos
        for layer in self.layers:
            x_nlw = layer(x_nlw)
        return self.norm(x_nlw)

    def num_params(self) -> int:
        if self.backbone is None:
            return image_encoder_params(self.cfg)
        c, L = self.cfg, self.num_tokens
        ours = self.backbone.out_channels * c.width + c.width + L * c.width + 2 * c.width
        ours += c.depth * layer_params(c.width, c.mlp_hidden)
        return ours + sum(p.numel() for p in self.backbone.parameters())

    def flops_per_item(self) -> int:
        if self.backbone is None:
            return image_encoder_flops(self.cfg)
        c, L = self.cfg, self.num_tokens
        adapter = 2 * L * self.backbone.out_channels * c.width
        return self.backbone.flops_per_item + adapter + c.depth * layer_flops(c.width, c.mlp_hidden, L)
