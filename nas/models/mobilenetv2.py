"""MobileNetV2 (Sandler et al. 2018) for small images (28-32 px).

As in the common CIFAR adaptation, the stem and the first stride-2 stage run at stride 1 so
that a 32x32 input still ends at 4x4. ReLU6 throughout, as in the original; the projection
convolution of each block is linear.
"""

from __future__ import annotations

from torch import nn

from nas.models.registry import register_model

# (expansion t, output channels c, repeats n, first stride s); stride 2 -> 1 in row two.
_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 without losing more than 10 % (as in the paper's code)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn_relu(inp: int, out: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers = [] if expand == 1 else [_conv_bn_relu(inp, hidden, 1, 1)]
        layers += [_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2, stem_stride: int = 1):
        super().__init__()
        inp = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        features = [_conv_bn_relu(in_channels, inp, 3, stem_stride)]
        for t, c, n, s in _CONFIG:
            out = _divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
                inp = out
        features.append(_conv_bn_relu(inp, last, 1, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model
def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                dropout: float = 0.2, stem_stride: int = 1) -> nn.Module:
    """`stem_stride=2` quarters the work for a quick CPU run (28 px ends at 2x2)."""
    return MobileNetV2(num_classes, in_channels, width_mult, dropout, stem_stride)
