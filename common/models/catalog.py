"""Every architecture fedmerge builds, by name: the registry every ``--arch`` and run-config ``arch`` reads.

Declared without importing torch, so a configuration names a wrong architecture and is
told at once. Each name fixes its family's options (a U-Net's width and depth, the MiT
encoder and head width of a SegFormer); the builder named by ``target`` takes
``(num_classes, options)``. ``hrda_<name>`` wraps any of them in HRDA's multi-resolution
model (``common.models.factory``).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.options.registry import Registry

__all__ = ["ARCHITECTURES", "HRDA_PREFIX", "MiTOptions", "TorchvisionOptions", "UNetOptions", "check_arch"]

ARCHITECTURES = Registry("architecture")
HRDA_PREFIX = "hrda_"  # hrda_<base>: the base architecture inside HRDA's multi-resolution wrapper


def check_arch(name: str) -> str:
    """``name`` if a model can be built by it (a registered architecture, or ``hrda_`` and one), else one error."""
    ARCHITECTURES.get(name.removeprefix(HRDA_PREFIX))
    return name


@dataclass(frozen=True)
class UNetOptions:
    width: int = 16  # channels at full resolution, doubled at each level
    depth: int = 4  # levels, the first at full resolution


@dataclass(frozen=True)
class TorchvisionOptions:
    builder: str  # the torchvision.models.segmentation function
    feature_channels: int  # channels of the backbone output the head reads


@dataclass(frozen=True)
class MiTOptions:
    encoder: str  # segmentation-models-pytorch's MiT encoder name
    head_width: int = 256  # the decode head's embedding width


def _unet(name: str, summary: str, width: int, depth: int) -> None:
    ARCHITECTURES.add(name, target="common.models.unet:build_small_unet", summary=summary, options=UNetOptions,
                      defaults={"width": width, "depth": depth})  # fmt: skip


def _torchvision(name: str, feature_channels: int) -> None:
    ARCHITECTURES.add(name, target="common.models.torchvision_nets:build_torchvision", options=TorchvisionOptions,
                      summary=f"torchvision's {name}", defaults={"builder": name,
                      "feature_channels": feature_channels})  # fmt: skip


_unet("small_unet", "a small BN U-Net (CPU demos and CamVid)", 16, 4)
_unet("tiny_unet", "the smallest BN U-Net (tests)", 8, 3)
# One more level (1/16 scale, 256 channels): a wider view for telling sky from building in dim light.
_unet("small_unet_d5", "small_unet with a fifth level", 16, 5)
_unet("small_unet_w12d5", "small_unet_d5 at width 12", 12, 5)
for _name, _channels in (("deeplabv3_resnet50", 2048), ("deeplabv3_resnet101", 2048),
                         ("deeplabv3_mobilenet_v3_large", 960), ("lraspp_mobilenet_v3_large", 960),
                         ("fcn_resnet50", 2048)):  # fmt: skip
    _torchvision(_name, _channels)
# The field's networks (MiT encoders with LayerNorm: BN only in their heads), built without weights;
# `fedmerge import-weights` turns the published files into a start. SegFormer's released heads are 256
# wide for B0/B1 and 768 for B2-B5.
for _i in range(6):
    ARCHITECTURES.add(f"segformer_b{_i}", target="common.models.segformer:build_segformer", options=MiTOptions,
                      summary=f"SegFormer: MiT-B{_i} and the all-MLP head",
                      defaults={"encoder": f"mit_b{_i}", "head_width": 256 if _i < 2 else 768})  # fmt: skip
ARCHITECTURES.add(
    "daformer_b5",
    target="common.models.daformer:build_daformer",
    options=MiTOptions,
    summary="DAFormer: MiT-B5 and the context-aware fusion head",
    defaults={"encoder": "mit_b5"},
)
ARCHITECTURES.add(
    "deeplabv2_resnet101",
    target="common.models.deeplabv2:build_deeplabv2",
    summary="DeepLabV2: dilated ResNet-101 and the ASPP classifier",
)
