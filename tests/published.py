"""Stand-ins for published weight files: random tensors under the key names and shapes of the releases.

Written from the released layouts, not from fedmerge's models, so that a strict load
into a fedmerge model checks the model against the release rather than against itself:
the ImageNet MiT files of SegFormer (``mit_b0.pth`` ... ``mit_b5.pth``), torchvision's
ImageNet ResNet-101, and DAFormer's/HRDA's mmsegmentation UDA checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

MIT_DIMS = {"b0": (32, 64, 160, 256), **{f"b{i}": (64, 128, 320, 512) for i in range(1, 6)}}
MIT_DEPTHS = {"b0": (2, 2, 2, 2), "b1": (2, 2, 2, 2), "b2": (3, 4, 6, 3), "b3": (3, 4, 18, 3),
              "b4": (3, 8, 27, 3), "b5": (3, 6, 40, 3)}  # fmt: skip
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
IMAGENET_CLASSES = 1000


def _mit_shapes(variant: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    dims, depths = MIT_DIMS[variant], MIT_DEPTHS[variant]
    cin = 3
    for s, (dim, depth, sr) in enumerate(zip(dims, depths, SR_RATIOS, strict=True), start=1):
        kernel = 7 if s == 1 else 3
        yield f"patch_embed{s}.proj.weight", (dim, cin, kernel, kernel)
        yield f"patch_embed{s}.proj.bias", (dim,)
        yield f"patch_embed{s}.norm.weight", (dim,)
        yield f"patch_embed{s}.norm.bias", (dim,)
        hidden = dim * MLP_RATIO
        for b in range(depth):
            p = f"block{s}.{b}."
            yield from ((p + n, (dim,)) for n in ("norm1.weight", "norm1.bias"))
            yield p + "attn.q.weight", (dim, dim)
            yield p + "attn.q.bias", (dim,)
            yield p + "attn.kv.weight", (2 * dim, dim)
            yield p + "attn.kv.bias", (2 * dim,)
            yield p + "attn.proj.weight", (dim, dim)
            yield p + "attn.proj.bias", (dim,)
            if sr > 1:
                yield p + "attn.sr.weight", (dim, dim, sr, sr)
                yield p + "attn.sr.bias", (dim,)
                yield p + "attn.norm.weight", (dim,)
                yield p + "attn.norm.bias", (dim,)
            yield from ((p + n, (dim,)) for n in ("norm2.weight", "norm2.bias"))
            yield p + "mlp.fc1.weight", (hidden, dim)
            yield p + "mlp.fc1.bias", (hidden,)
            yield p + "mlp.dwconv.dwconv.weight", (hidden, 1, 3, 3)
            yield p + "mlp.dwconv.dwconv.bias", (hidden,)
            yield p + "mlp.fc2.weight", (dim, hidden)
            yield p + "mlp.fc2.bias", (dim,)
        yield f"norm{s}.weight", (dim,)
        yield f"norm{s}.bias", (dim,)
        cin = dim


def _bn(prefix: str, channels: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        yield f"{prefix}.{leaf}", (channels,)
    yield f"{prefix}.num_batches_tracked", ()


def _daformer_head_shapes(num_classes: int, width: int = 256) -> Iterator[tuple[str, tuple[int, ...]]]:
    for i, c in enumerate(MIT_DIMS["b5"]):
        yield f"embed_layers.{i}.proj.weight", (width, c)
        yield f"embed_layers.{i}.proj.bias", (width,)
    fused = 4 * width
    yield "fuse_layer.aspp_modules.0.conv.weight", (width, fused, 1, 1)
    yield from _bn("fuse_layer.aspp_modules.0.bn", width)
    for j in (1, 2, 3):
        p = f"fuse_layer.aspp_modules.{j}"
        yield f"{p}.depthwise_conv.conv.weight", (fused, 1, 3, 3)
        yield from _bn(f"{p}.depthwise_conv.bn", fused)
        yield f"{p}.pointwise_conv.conv.weight", (width, fused, 1, 1)
        yield from _bn(f"{p}.pointwise_conv.bn", width)
    yield "fuse_layer.bottleneck.conv.weight", (width, 4 * width, 3, 3)
    yield from _bn("fuse_layer.bottleneck.bn", width)
    yield "conv_seg.weight", (num_classes, width, 1, 1)
    yield "conv_seg.bias", (num_classes,)


def _tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.tensor(40000)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    return torch.randn(shape, generator=gen) * 0.02


def _random(shapes: Iterator[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {key: _tensor(key, shape, gen) for key, shape in shapes}


def mit_imagenet(variant: str, seed: int = 0) -> dict[str, Tensor]:
    """An ImageNet MiT file: the encoder and its ImageNet classifier ``head``."""
    state = _random(_mit_shapes(variant), seed)
    state["head.weight"] = torch.randn(IMAGENET_CLASSES, MIT_DIMS[variant][-1]) * 0.02
    state["head.bias"] = torch.zeros(IMAGENET_CLASSES)
    return state


def _resnet101_shapes() -> Iterator[tuple[str, tuple[int, ...]]]:
    yield "conv1.weight", (64, 3, 7, 7)
    yield from _bn("bn1", 64)
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 23, 3), (64, 128, 256, 512), strict=True), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            yield f"{p}.conv1.weight", (width, cin, 1, 1)
            yield from _bn(f"{p}.bn1", width)
            yield f"{p}.conv2.weight", (width, width, 3, 3)
            yield from _bn(f"{p}.bn2", width)
            yield f"{p}.conv3.weight", (4 * width, width, 1, 1)
            yield from _bn(f"{p}.bn3", 4 * width)
            if b == 0:
                yield f"{p}.downsample.0.weight", (4 * width, cin, 1, 1)
                yield from _bn(f"{p}.downsample.1", 4 * width)
            cin = 4 * width
    yield "fc.weight", (IMAGENET_CLASSES, 2048)
    yield "fc.bias", (IMAGENET_CLASSES,)


def resnet101_imagenet(seed: int = 0, counters: bool = True) -> dict[str, Tensor]:
    """torchvision's ImageNet ResNet-101; ``counters=False``: without ``num_batches_tracked``, as older files."""
    state = _random(_resnet101_shapes(), seed)
    return state if counters else {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def uda_checkpoint(num_classes: int = 19, hrda: bool = False, seed: int = 0) -> dict[str, object]:
    """A DAFormer (or HRDA) UDA checkpoint of MiT-B5: student, EMA teacher and ImageNet copy.

    The student shares the teacher's tensors (as torch.save stores a shared tensor once,
    the file stays one model large) except its classifier, so a test can tell which was taken.
    """
    backbone = _random(_mit_shapes("b5"), seed)
    head = _random(_daformer_head_shapes(num_classes), seed + 1)
    head_key = "decode_head.head." if hrda else "decode_head."
    state: dict[str, Tensor] = {}
    for branch in ("model", "ema_model"):
        state.update({f"{branch}.backbone.{k}": v for k, v in backbone.items()})
        state.update({f"{branch}.{head_key}{k}": v for k, v in head.items()})
        if hrda:
            attention = _random(_daformer_head_shapes(num_classes), seed + 2)  # shapes close enough to stand in
            state.update({f"{branch}.decode_head.scale_attention.{k}": v for k, v in attention.items()})
    state[f"model.{head_key}conv_seg.weight"] = torch.randn(num_classes, 256, 1, 1)
    state.update({f"imnet_model.backbone.{k}": v for k, v in backbone.items()})
    return {"meta": {"CLASSES": [f"c{i}" for i in range(num_classes)], "iter": 40000}, "state_dict": state}
