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
    torch.manual_seed(0)
    model = _randomise_bn(create_model(name)).eval()
    assert len(conv_bn_pairs(model)) == pairs
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    # float32 reassociation of (W x) * g / s vs (W * g / s) x over 20-50 layers: a few ulps
    # times depth of the output scale (measured over 66 seeds: at most 8.4e-7 of max|ref| for
    # either model). Relative to each element it is not small: outputs near zero carry the
    # absolute error of the large ones, so rtol=0.
    torch.testing.assert_close(out, ref, rtol=0, atol=3e-6 * ref.abs().max().item())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched


def test_fold_formula_on_one_layer():
    conv = nn.Conv2d(2, 3, 1, bias=True)
    bn = _randomise_bn(nn.Sequential(conv, nn.BatchNorm2d(3)))[1]
    model = nn.Sequential(conv, bn).eval()
    folded = fold_bn(model)
    std = torch.sqrt(bn.running_var + bn.eps)
    # W' = W * (gamma / sigma), b' = beta + (b - mu) * (gamma / sigma): one factor for both,
    # the same float operations as the fold, so bit for bit.
    factor = bn.weight / std
    expected_w = conv.weight * factor.view(-1, 1, 1, 1)
    expected_b = bn.bias + (conv.bias - bn.running_mean) * factor
    assert torch.equal(folded[0].weight, expected_w) and torch.equal(folded[0].bias, expected_b)
    assert not torch.equal(folded[0].weight, conv.weight)
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
    # The fused layer scales W by gamma / sigma and divides it out again for the statistics:
    # a few float32 ulps of values up to ~8 (ulp 4.8e-7) on the outputs, of values up to
    # ~2.5 on the running statistics. Measured over 30 seeds: outputs <= 2.4e-6 while the
    # statistics are live, <= 1.2e-6 frozen and folded; statistics <= 1.2e-7.
    for _ in range(2):  # live batch statistics: the same output and running statistics
        out_ref, out = ref.train()(x), fused.train()(x)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.bn.running_mean, ref[1].running_mean, rtol=0, atol=5e-7)
    torch.testing.assert_close(fused.bn.running_var, ref[1].running_var, rtol=0, atol=5e-7)
    assert fused.frozen and int(fused.bn.num_batches_tracked) == 2
    # Frozen: training mode now uses running statistics, like the deployed folded layer.
    mean, var = fused.bn.running_mean.clone(), fused.bn.running_var.clone()
    frozen_out = fused.train()(x)
    torch.testing.assert_close(frozen_out, ref.eval()(x), rtol=0, atol=5e-6)
    assert torch.equal(fused.bn.running_mean, mean) and torch.equal(fused.bn.running_var, var)
    assert int(fused.bn.num_batches_tracked) == 2  # no more updates
    torch.testing.assert_close(fused.to_folded()(x), ref.eval()(x), rtol=0, atol=5e-6)


def test_qat_convbn_quantizes_the_folded_weight():
    conv, bn = _pair(1)
    wq = FakeQuantizer(4, True, axis=0, dynamic=True)
    fused = ConvBn2d(conv, bn, weight_quantizer=wq, freeze_bn_after=0).eval()
    folded = fused.to_folded()
    x = torch.randn(2, 3, 8, 8)
    expected = nn.functional.conv2d(x, wq(folded.weight), folded.bias, padding=1)
    # The same folded weight through the same quantizer and kernel: bit for bit (30 seeds).
    assert torch.equal(fused(x), expected)
    assert not torch.equal(expected, folded(x))  # the weight really was quantized
    loss = fused.train()(x).pow(2).sum()
    loss.backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None
