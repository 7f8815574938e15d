"""CIFAR-style ResNets (He et al. 2016, section 4.2): three stages of 16/32/64 channels.

Depth = 6n + 2. Downsampling shortcuts are 1x1 convolutions with BN (option B), so every
path through the network is a Conv2d a plan can quantize.
"""

from __future__ import annotations

from torch import nn

from nas.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 and at least 8, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes, layers = width, []
        for stage, mult in enumerate((1, 2, 4)):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(planes, width * mult, stride))
                planes = width * mult
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@register_model
def resnet8(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    return CifarResNet(8, num_classes, in_channels, width)


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels, width)


@register_model
def resnet32(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    return CifarResNet(32, num_classes, in_channels, width)


@register_model
def resnet56(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels, width)
