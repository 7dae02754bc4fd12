"""DeepLabV2 (Chen et al., 2017) on torchvision's ResNet-101: ``deeplabv2_resnet101``.

The encoder is torchvision's ResNet-101 with its last two stages dilated instead of
strided (output stride 8), its classification layers left out, so its state-dict keys
are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...) and an ImageNet ResNet file
loads into it as it is. The classifier, which torchvision does not ship, is DeepLabV2's
ASPP: four parallel 3x3 convolutions straight to class logits at dilations 6, 12, 18 and
24, summed; it has no BN, so all BN layers of this model are in the backbone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from common.models.segmenter import Segmenter
from common.options.registry import NoOptions

__all__ = ["ASPPClassifier", "DeepLabV2", "build_deeplabv2"]

ASPP_DILATIONS = (6, 12, 18, 24)
RESNET_CHANNELS = 2048
_CLASSIFICATION_LAYERS = ("avgpool", "fc")


class ASPPClassifier(nn.Module):
    """The sum of parallel dilated 3x3 convolutions, each predicting every class."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.aspp = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations)
        for conv in self.aspp:  # DeepLabV2 starts its classifier near zero
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return sum((branch(x) for branch in self.aspp[1:]), self.aspp[0](x))


def _dilated_resnet101() -> nn.Sequential:
    from torchvision.models import resnet101

    net = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    return nn.Sequential(OrderedDict((n, m) for n, m in net.named_children() if n not in _CLASSIFICATION_LAYERS))


class DeepLabV2(Segmenter):
    """Dilated ResNet-101 features at 1/8 and the ASPP classifier."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.backbone = _dilated_resnet101()
        self.classifier = ASPPClassifier(RESNET_CHANNELS, num_classes)

    @property
    def feature_channels(self) -> int:
        return RESNET_CHANNELS

    def _features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def decode(self, feats: Tensor) -> Tensor:
        return self.classifier(feats)


def build_deeplabv2(num_classes: int, options: NoOptions) -> DeepLabV2:
    return DeepLabV2(num_classes)
