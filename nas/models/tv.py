"""torchvision's ImageNet models, randomly initialised (no weights are ever downloaded),
with the input channels and classes adapted to the data."""

from __future__ import annotations

from torch import nn

from nas.models.registry import register_model


def _replace_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, bias=conv.bias is not None)


@register_model
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    from torchvision.models import resnet18 as build

    model = build(weights=None, num_classes=num_classes)
    model.conv1 = _replace_stem(model.conv1, in_channels)
    return model


@register_model
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0) -> nn.Module:
    from torchvision.models import mobilenet_v2 as build

    model = build(weights=None, num_classes=num_classes, width_mult=width_mult)
    model.features[0][0] = _replace_stem(model.features[0][0], in_channels)
    return model
