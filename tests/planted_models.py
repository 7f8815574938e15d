"""A user model (`tests.planted_models:wide_bn_net`) that plants BN folding's hard case.

Its second conv feeds a BatchNorm whose scales gamma are fixed across three decades, so the
folded weight W * gamma / sigma has per-channel ranges three decades apart: quantized per
tensor, the folded weight loses the small channels that the unfolded W keeps. A fixed
rescale after the BN undoes gamma, so every channel matters to the model: a plan scored on
unfolded weights is then far from the model that gets deployed.
"""

import torch
from torch import nn


class WideBnNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        with torch.no_grad():
            self.bn2.weight.copy_(torch.logspace(-3, 0, 16))
        self.bn2.weight.requires_grad_(False)
        # Undone right after the BN, so every channel matters to what the model computes.
        self.register_buffer("unscale", 1.0 / self.bn2.weight.detach().clone().reshape(1, -1, 1, 1))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(16 * 9, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x))) * self.unscale
        return self.fc(self.pool(x).flatten(1))


def wide_bn_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return WideBnNet(num_classes, in_channels)
