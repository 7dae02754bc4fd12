"""Segmentation models built by name, with one interface for every architecture.

Every model returned by :func:`build_model` is a :class:`Segmenter`: ``forward`` gives
logits at the input resolution, ``features``/``decode`` split the network where the
decode head starts (HRDA's scale attention and the ImageNet feature distance need
that cut), and ``head_parameters`` names what gets the larger learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.models.daformer import DAFORMER_VARIANTS, build_daformer
from common.models.deeplabv2 import build_deeplabv2
from common.models.segformer import SEGFORMER_VARIANTS, build_segformer
from common.models.segmenter import Segmenter

__all__ = [
    "ARCHITECTURES",
    "Segmenter",
    "SmallUNet",
    "WeightsFile",
    "build_base_model",
    "load_weights_file",
]


WeightsFile = str | Path | None  # a local weights file; nothing is ever downloaded


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Encoder(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth)]
        self.stem = nn.Sequential(_conv_bn(3, chans[0]), _conv_bn(chans[0], chans[0]))
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _conv_bn(chans[i - 1], chans[i]), _conv_bn(chans[i], chans[i]))
            for i in range(1, depth)
        )
        self.channels = chans

    def forward(self, x: Tensor) -> list[Tensor]:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        return skips


class _Decoder(nn.Module):
    def __init__(self, chans: list[int]) -> None:
        super().__init__()
        self.up = nn.ModuleList(
            nn.Sequential(_conv_bn(chans[i] + chans[i - 1], chans[i - 1]), _conv_bn(chans[i - 1], chans[i - 1]))
            for i in range(len(chans) - 1, 0, -1)
        )

    def forward(self, skips: list[Tensor]) -> Tensor:
        x = skips[-1]
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x


class _UNetBackbone(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.encoder = _Encoder(width, depth)
        self.decoder = _Decoder(self.encoder.channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class SmallUNet(Segmenter):
    """A small BN U-Net: fast enough on two CPU cores for demos, tests and CamVid."""

    def __init__(self, num_classes: int, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.backbone = _UNetBackbone(width, depth)
        self._feature_channels = width
        self.classifier = nn.Sequential(_conv_bn(width, width), nn.Conv2d(width, num_classes, 1))

    @property
    def feature_channels(self) -> int:
        return self._feature_channels

    def _features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def decode(self, feats: Tensor) -> Tensor:
        return self.classifier(feats)


class TorchvisionSegmenter(Segmenter):
    """Wraps a torchvision segmentation model (DeepLabV3, FCN, LR-ASPP)."""

    def __init__(self, net: nn.Module, feature_channels: int) -> None:
        super().__init__()
        self.backbone = net.backbone
        self.classifier = net.classifier
        self._feature_channels = feature_channels
        self._dict_head = type(net.classifier).__name__ == "LRASPPHead"

    @property
    def feature_channels(self) -> int:
        return self._feature_channels

    def _features(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        if self._dict_head:
            # LR-ASPP reads a low and a high level map; carry both in one tensor.
            low = F.interpolate(feats["low"], size=feats["high"].shape[-2:], mode="bilinear", align_corners=False)
            return torch.cat([feats["high"], low], dim=1)
        return feats["out"]

    def decode(self, feats: Tensor) -> Tensor:
        if self._dict_head:
            high_c = self._feature_channels
            return self.classifier({"high": feats[:, :high_c], "low": feats[:, high_c:]})
        return self.classifier(feats)


def _torchvision(builder_name: str, feature_channels: int) -> Callable[[int], Segmenter]:
    def build(num_classes: int) -> Segmenter:
        from torchvision.models import segmentation

        builder = getattr(segmentation, builder_name)
        kwargs: dict[str, object] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
        if builder_name != "lraspp_mobilenet_v3_large":
            kwargs["aux_loss"] = False
        return TorchvisionSegmenter(builder(**kwargs), feature_channels)

    return build


ARCHITECTURES: dict[str, Callable[[int], Segmenter]] = {
    "small_unet": lambda num_classes: SmallUNet(num_classes, width=16),
    "tiny_unet": lambda num_classes: SmallUNet(num_classes, width=8, depth=3),
    # One more level (1/16 scale, 256 channels): a wider view for telling sky from building in dim light.
    "small_unet_d5": lambda num_classes: SmallUNet(num_classes, width=16, depth=5),
    "small_unet_w12d5": lambda num_classes: SmallUNet(num_classes, width=12, depth=5),
    "deeplabv3_resnet50": _torchvision("deeplabv3_resnet50", 2048),
    "deeplabv3_resnet101": _torchvision("deeplabv3_resnet101", 2048),
    "deeplabv3_mobilenet_v3_large": _torchvision("deeplabv3_mobilenet_v3_large", 960),
    "lraspp_mobilenet_v3_large": _torchvision("lraspp_mobilenet_v3_large", 960),
    "fcn_resnet50": _torchvision("fcn_resnet50", 2048),
    # The field's networks (MiT encoders with LayerNorm: BN only in their heads), built without weights;
    # `fedmerge import-weights` turns the published files into a start.
    **{name: partial(build_segformer, name) for name in SEGFORMER_VARIANTS},
    **{name: partial(build_daformer, name) for name in DAFORMER_VARIANTS},
    "deeplabv2_resnet101": partial(build_deeplabv2, "deeplabv2_resnet101"),
}


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from safetensors or a PyTorch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _strip_prefixes(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def _load_into(module: nn.Module, state: dict[str, Tensor], what: str, path: Path, strict: bool) -> None:
    target = module.state_dict()
    mismatched = [k for k, v in state.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"{path}: {what} tensor {k!r} has shape {tuple(state[k].shape)}, "
            f"the model expects {tuple(target[k].shape)} ({len(mismatched)} mismatched in all)"
        )
    missing = sorted(set(target) - set(state))
    if strict and missing:
        raise ValueError(f"{path}: {what} weights lack {len(missing)} tensors, first {missing[0]!r}")
    if not set(state) & set(target):
        raise ValueError(f"{path}: no tensor name matches the {what}; is this the right architecture?")
    # Completed with the module's own tensors, the state loads strictly: some library modules (smp's MiT
    # encoder) override load_state_dict without a `strict` argument.
    module.load_state_dict({**target, **{k: v for k, v in state.items() if k in target}})


def build_base_model(
    arch: str, num_classes: int, weights: WeightsFile = None, backbone_weights: WeightsFile = None
) -> Segmenter:
    """One of :data:`ARCHITECTURES`, never downloading (torchvision is asked for ``weights=None``).

    Wrapped architectures (``hrda_<base>``) are built by ``common.models.factory.build_model``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}")
    model = ARCHITECTURES[arch](num_classes)
    if backbone_weights is not None:
        # "base.backbone.": an hrda_ checkpoint's backbone (e.g. an imported ImageNet start of hrda_daformer_b5)
        state = _strip_prefixes(load_weights_file(backbone_weights), ("base.backbone.", "backbone.", "module."))
        _load_into(model.backbone, state, "backbone", Path(backbone_weights), strict=False)
    if weights is not None:
        state = load_weights_file(weights)
        state = {k: v for k, v in state.items() if not k.endswith(".num_samples") and not k.startswith("aux_")}
        _load_into(model, _strip_prefixes(state, ("module.", "net.")), "model", Path(weights), strict=True)
    return model
