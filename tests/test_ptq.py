"""Post-training quantization in process (`nas.quant.ptq.prepare_ptq`, `calibrate`) on a
tiny model: which activation ranges calibration sets, and its errors."""

import copy

import pytest
import torch
from torch import nn

from nas.errors import ConfigError
from nas.plan import LayerPrecision, Plan
from nas.quant.bn_fold import fold_bn
from nas.quant.fake import fake_quantize, qparams, quant_range
from nas.quant.modules import QuantConv2d, QuantLinear, calibrate, quant_layers, quantize_model
from nas.quant.ptq import prepare_ptq

# conv1 and conv2 are followed by BN (folded into them, or not); conv2 takes 4-bit symmetric
# activations; fc is weight-float (W32A8); bn2's output reaches fc without a ReLU.
PLAN = {"conv1": LayerPrecision(8, 8), "conv2": LayerPrecision(4, 4, a_symmetric=True),
        "fc": LayerPrecision(32, 8)}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.bn2(self.conv2(x)).flatten(1))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # BN statistics far from the identity: folding changes the weights
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return model.eval()


def plan(layers=PLAN) -> Plan:
    return Plan("tiny", "tiny", "-", dict(layers))


def calibration_batches():
    gen = torch.Generator().manual_seed(1)
    # The third batch is far wider than the others: calibration limited to two must not see it.
    return [(scale * torch.randn(5, 2, 6, 6, generator=gen), None) for scale in (1, 1, 100)]


def observed_inputs(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Every input each PLAN layer of `model` gets over `batches`, flattened."""
    seen = {name: [] for name in PLAN}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0]))
             for n in PLAN]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat([t.flatten() for t in ts]) for n, ts in seen.items()}


def with_quantized_weights(model: nn.Module) -> nn.Module:
    """`model` with each PLAN layer's weight replaced by its fake-quantized value (min/max
    range, per output channel as the precisions say): the weights calibration runs with."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, prec in PLAN.items():
            if prec.w_bits >= 16:
                continue
            w = modules[name].weight
            dims = tuple(range(1, w.ndim))
            scale, zp = qparams(w.amin(dim=dims), w.amax(dim=dims), prec.w_bits, True)
            w.copy_(fake_quantize(w, scale, zp, *quant_range(prec.w_bits, True), axis=0))
    return model


def assert_ranges(qmodel: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """Each quantized layer's input scale and zero point are those of [min, max] of `inputs`."""
    layers = quant_layers(qmodel)
    assert sorted(layers) == sorted(PLAN)
    for name, x in inputs.items():
        q = layers[name].input_quantizer
        assert (q.bits, q.symmetric) == (PLAN[name].a_bits, PLAN[name].a_symmetric)
        scale, zero_point = qparams(x.min(), x.max(), q.bits, q.symmetric)
        assert torch.equal(q.scale, scale), name
        assert torch.equal(q.zero_point, zero_point), name


@pytest.mark.parametrize("fold", [True, False])
def test_minmax_calibration_sets_each_input_range_to_the_inputs_it_saw(fold):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    batches = calibration_batches()
    qmodel = prepare_ptq(model, plan(), batches, 2, method="minmax", fold=fold)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    assert not qmodel.training
    assert isinstance(qmodel.conv1, QuantConv2d) and isinstance(qmodel.fc, QuantLinear)
    # Folded: the BN layers are gone into the convolutions; unfolded they stay, between them.
    assert isinstance(qmodel.bn1, nn.BatchNorm2d) != fold
    # Calibration runs the model with float activations and fake-quantized weights (set by
    # quantize_model); a range is the min/max of what the layer got in the first two batches.
    base = fold_bn(model) if fold else model
    inputs = observed_inputs(with_quantized_weights(base), batches[:2])
    assert_ranges(qmodel, inputs)
    assert inputs["conv1"].min() < 0 and inputs["fc"].min() < 0  # (not only ReLU outputs)
    # conv2's and fc's ranges do depend on the quantized weights (and, for fc, on whether BN
    # was folded before conv2's weights were quantized): the other model's inputs differ.
    other = fold_bn(model) if not fold else model
    for wrong in (observed_inputs(base, batches[:2]),
                  observed_inputs(with_quantized_weights(other), batches[:2])):
        assert not torch.equal(qmodel.fc.input_quantizer.scale,
                               qparams(wrong["fc"].min(), wrong["fc"].max(), 8, False)[0])


def test_calibration_uses_at_most_the_batches_asked_for():
    model = tiny_model()
    batches = calibration_batches()
    qmodel = prepare_ptq(model, plan(), batches, 3, method="minmax")
    assert_ranges(qmodel, observed_inputs(with_quantized_weights(fold_bn(model)), batches))
    # Asking for more batches than the loader has uses them all (the wide third included).
    again = prepare_ptq(model, plan(), batches, 10, method="minmax")
    assert all(torch.equal(a.input_quantizer.scale, b.input_quantizer.scale)
               for a, b in zip(quant_layers(qmodel).values(), quant_layers(again).values()))
    assert calibrate(quantize_model(fold_bn(model), plan()), batches, 2) == 2
    assert calibrate(quantize_model(fold_bn(model), plan()), batches, 10) == 3


def test_calibration_of_an_empty_split_is_an_error():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"^calibration saw no batches: the calibration split "
                                          r"is empty$"):
        prepare_ptq(model, plan(), [], 4, method="minmax")
    qmodel = quantize_model(fold_bn(model), plan())
    with pytest.raises(ConfigError, match="calibration saw no batches"):
        calibrate(qmodel, iter([]), 1)


@pytest.mark.parametrize("method", ["mse", "kl", "percentile"])
def test_sampled_observers_give_the_same_range_whatever_the_global_random_state(method):
    # They keep a random sample of large batches; drawn from torch's global stream, the same
    # calibration gave other ranges run to run (nas ptq's accuracy moved by an image).
    from nas.quant.observers import _SAMPLE_MAX, make_observer

    x = torch.randn(3, _SAMPLE_MAX + 1000, generator=torch.Generator().manual_seed(1)) ** 3
    ranges = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        observer = make_observer(method, 8, False)
        for batch in x:
            observer.update(batch)
        ranges.append(observer.range())
    assert all(torch.equal(a, b) for a, b in zip(*ranges))


@pytest.mark.parametrize("method", ["mse", "kl"])
def test_sampled_observers_keep_a_sample_of_every_batch_however_many(method):
    # Past the eighth batch they used to keep whole batches: memory grew with every one.
    from nas.quant.observers import _SAMPLE_PER_BATCH, make_observer

    observer = make_observer(method, 8, False)
    for _ in range(12):
        observer.update(torch.randn(4, 8, 32, 32))  # 32768 values, twice what a batch keeps
    assert [s.shape for s in observer.samples] == [(1, _SAMPLE_PER_BATCH)] * 12
