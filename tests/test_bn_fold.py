import copy

import pytest
import torch
from torch import nn

from nas.errors import ModelError
from nas.models import create_model
from nas.quant.bn_fold import ConvBn2d, conv_bn_pairs, fold_bn
from nas.quant.quantizer import FakeQuantizer


def _randomise_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen))
    return model


@pytest.mark.parametrize("name, pairs", [("resnet20", 21), ("mobilenetv2", 52)])
def test_folded_model_equals_eval_model(name, pairs):
    model = _randomise_bn(create_model(name)).eval()
    assert len(conv_bn_pairs(model)) == pairs
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    # float32 reassociation of (W x) * g / s vs (W * g / s) x over ~20 layers: relative error
    # stays at a few ulps times depth, far below 1e-4 of the output scale.
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched


def test_fold_formula_on_one_layer():
    conv = nn.Conv2d(2, 3, 1, bias=True)
    bn = _randomise_bn(nn.Sequential(conv, nn.BatchNorm2d(3)))[1]
    model = nn.Sequential(conv, bn).eval()
    folded = fold_bn(model)
    std = torch.sqrt(bn.running_var + bn.eps)
    expected_w = conv.weight * (bn.weight / std).view(-1, 1, 1, 1)
    expected_b = bn.bias + (conv.bias - bn.running_mean) * bn.weight / std
    assert torch.allclose(folded[0].weight, expected_w) and torch.allclose(folded[0].bias, expected_b)
    assert isinstance(folded[1], nn.Identity)


def test_conv_feeding_two_users_is_not_folded():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert conv_bn_pairs(Branchy()) == []


def test_untraceable_model_is_a_clear_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ModelError, match="cannot trace Dynamic with torch.fx"):
        fold_bn(Dynamic())


def _pair(seed=0):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
    _randomise_bn(nn.Sequential(conv, bn), seed)
    return conv, bn


def test_qat_convbn_matches_conv_bn_in_training_and_eval():
    conv, bn = _pair()
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn))
    fused = ConvBn2d(copy.deepcopy(conv), copy.deepcopy(bn), freeze_bn_after=2)
    x = torch.randn(6, 3, 8, 8)
    for _ in range(2):  # live batch statistics: identical output and running statistics
        out_ref, out = ref.train()(x), fused.train()(x)
        assert torch.allclose(out, out_ref, atol=1e-5)
    assert torch.allclose(fused.bn.running_mean, ref[1].running_mean, atol=1e-6)
    assert torch.allclose(fused.bn.running_var, ref[1].running_var, atol=1e-6)
    assert fused.frozen
    # Frozen: training mode now uses running statistics, like the deployed folded layer.
    frozen_out = fused.train()(x)
    assert torch.allclose(frozen_out, ref.eval()(x), atol=1e-5)
    assert torch.allclose(fused.bn.running_mean, ref[1].running_mean)  # no more updates
    assert torch.allclose(fused.to_folded()(x), ref.eval()(x), atol=1e-5)


def test_qat_convbn_quantizes_the_folded_weight():
    conv, bn = _pair(1)
    wq = FakeQuantizer(4, True, axis=0, dynamic=True)
    fused = ConvBn2d(conv, bn, weight_quantizer=wq, freeze_bn_after=0).eval()
    folded = fused.to_folded()
    x = torch.randn(2, 3, 8, 8)
    expected = nn.functional.conv2d(x, wq(folded.weight), folded.bias, padding=1)
    assert torch.allclose(fused(x), expected, atol=1e-5)
    loss = fused.train()(x).pow(2).sum()
    loss.backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None
