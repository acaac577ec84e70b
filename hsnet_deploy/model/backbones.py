"""VGG16 and ResNet-50/101 written with torchvision's parameter names, so the authors' checkpoints
(which embed torchvision's IMAGENET1K_V1 backbones) load with strict=True and no torchvision install.

Each backbone exposes `hypercolumns(img)`: the list of feature maps HSNet correlates, in backbone order
(shallow to deep), and `stage_sizes`: how many of those maps belong to each of the three stages,
deepest stage first (the order of the learner's input channels: C4, C3, C2).
"""

from __future__ import annotations

import torch
from torch import nn

# torchvision's VGG16 "D" configuration; "M" is a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Indices into vgg16.features whose outputs HSNet taps (authors' hsnet.py): conv4_1..3, conv5_1..3
# (pre-ReLU, because the authors clone before the in-place ReLU) and pool5.
VGG16_TAPS = (17, 19, 21, 24, 26, 28, 30)
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
BACKBONES = ("vgg16", "resnet50", "resnet101")


class VGG16(nn.Module):
    stage_sizes = (1, 3, 3)  # pool5 | conv5_1..3 | conv4_1..3

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(  # unused, kept so the authors' keys load strictly
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 1000),
        )

    def hypercolumns(self, img: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = img
        for idx, module in enumerate(self.features[: VGG16_TAPS[-1] + 1]):
            if isinstance(module, nn.ReLU):
                x = torch.relu(x)  # out of place: the tapped pre-ReLU map must survive
            else:
                x = module(x)
            if idx in VGG16_TAPS:
                feats.append(x)
        return feats


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def pre_relu(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output after the residual addition and BEFORE its final ReLU: HSNet's tap."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_relu(x))


class ResNet(nn.Module):
    stage_sizes: tuple[int, int, int]

    def __init__(self, name: str) -> None:
        super().__init__()
        blocks = RESNET_BLOCKS[name]
        # Taps: every bottleneck of layer2, layer3, layer4; deepest stage first.
        self.stage_sizes = (blocks[3], blocks[2], blocks[1])
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = 64
        for stage, (n_blocks, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            stride = 1 if stage == 1 else 2
            downsample = nn.Sequential(
                nn.Conv2d(in_ch, width * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(width * 4)
            )
            layer = [Bottleneck(in_ch, width, stride, downsample)]
            in_ch = width * 4
            layer += [Bottleneck(in_ch, width) for _ in range(n_blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, 1000)  # unused, kept so the authors' keys load strictly

    def hypercolumns(self, img: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(img))))
        x = self.layer1(x)
        feats = []
        for layer in (self.layer2, self.layer3, self.layer4):
            for block in layer:
                pre = block.pre_relu(x)
                feats.append(pre)
                x = torch.relu(pre)
        return feats


def build_backbone(name: str) -> VGG16 | ResNet:
    if name == "vgg16":
        return VGG16()
    if name in RESNET_BLOCKS:
        return ResNet(name)
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")


def feature_sizes(name: str, size: int) -> tuple[int, int, int]:
    """Spatial side of the C2, C3, C4 feature maps for an input side `size`.

    ResNet halves with rounding up (padded strided convs and pools): ceil(size / 8, 16, 32).
    VGG's 2x2 pools round down: floor(size / 8, 16, 32).
    """
    if name == "vgg16":
        return size // 8, size // 16, size // 32
    return tuple(-(-size // d) for d in (8, 16, 32))  # type: ignore[return-value]
