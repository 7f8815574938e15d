"""DNAS derivation: candidate plans, one-shot evaluation, BN recalibration and the theta loss."""

import copy
import math

import pytest
import torch
from torch import nn

from nas.budget import Budget
from nas.cost.base import CostTable
from nas.cost.targets import Target
from nas.data import make_loader
from nas.errors import ConfigError
from nas.search import dnas
from nas.search.dnas import DnasConfig, candidates, cost_penalty, derive, one_shot_accuracy
from nas.spaces import Choice, SearchSpace
from nas.supernet import Supernet, recalibrate_bn
from nas.train import evaluate
from tests.conftest import SYNTHETIC_SPACE


class TwoLayer(nn.Module):
    """Two searchable layers: a conv (with BatchNorm) and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


W_BITS = (2, 4, 8)
# W2A8, W4A8, W8A8 in both layers; the same costs as test_supernet's repair / fill tests.
COSTS = [[10.0, 20.0, 40.0], [10.0, 20.0, 40.0]]


def two_layer_net(p0, p1) -> Supernet:
    """A two-layer supernet whose choice probabilities are p0 and p1 (theta = log p)."""
    space = SearchSpace.from_dict({**SYNTHETIC_SPACE, "name": "two_layer", "fixed": {},
                                   "model": {"name": "tests.test_derive:TwoLayer"},
                                   "choices": {"w_bits": list(W_BITS), "a_bits": [8]}})
    torch.manual_seed(0)
    net = Supernet(space.build_model(), space, seed=0)
    assert [m.choices for m in net.mixed()] == [tuple(Choice(w, 8) for w in W_BITS)] * 2
    with torch.no_grad():
        for m, p in zip(net.mixed(), (p0, p1)):
            m.theta.copy_(torch.tensor(p).log())
    return net


def cost_table() -> CostTable:
    return CostTable("size", "bytes", ["conv", "fc"], [tuple(Choice(w, 8) for w in W_BITS)] * 2,
                     COSTS, [[False] * 3] * 2)


def plans(cands):
    return [(c.name, c.indices, c.cost, c.meets_target) for c in cands]


def test_candidates_start_with_the_argmax_then_its_repair_then_the_fill():
    net, table = two_layer_net([0.1, 0.2, 0.7], [0.3, 0.3, 0.4]), cost_table()
    target = Target("size", 60.0, "size=60B")
    cands = candidates(net, table, target, samples=40, seed=0)
    # Argmax (8, 8) = 80 B is over 60 B; the cheapest repair (see test_supernet's repair test)
    # is layer 1 8->2 (50 B); the 10 B left buy layer 1 2->4: exactly 60 B, within the target.
    assert plans(cands[:3]) == [("argmax", [2, 2], 80.0, False),
                                ("argmax-repaired", [2, 0], 50.0, True),
                                ("argmax-repaired-filled", [2, 1], 60.0, True)]
    samples = cands[3:]
    assert samples and all(c.name.startswith("sample-") for c in samples)
    draws = [int(c.name.removeprefix("sample-")) for c in samples]
    assert draws == sorted(set(draws)) and 1 <= draws[0] and draws[-1] <= 40
    # De-duplicated: 40 draws from 9 plans, each plan listed once (the first three included).
    assert len({tuple(c.indices) for c in cands}) == len(cands) <= 9
    for c in samples:
        assert c.cost == table.index_cost(c.indices) and c.meets_target == (c.cost <= 60.0)
    # The draws come from the seed alone, not from torch's global generator.
    torch.manual_seed(123)
    assert plans(candidates(net, table, target, samples=40, seed=0)) == plans(cands)


def test_candidates_sample_only_plans_theta_allows():
    # Layer 0 can only be W8; layer 1 only W2 or W4: the samples are (2, 0) and (2, 1) alone.
    net = two_layer_net([0.0, 0.0, 1.0], [0.5, 0.5, 0.0])
    cands = candidates(net, cost_table(), None, samples=30, seed=1)
    # No target: nothing to repair or fill, and every plan meets it. Argmax takes the first of
    # the tied W2 / W4; the 30 draws add (2, 1) once.
    assert [(c.name[:7], c.indices, c.meets_target) for c in cands] == [
        ("argmax", [2, 0], True), ("sample-", [2, 1], True)]


def test_candidates_fill_an_argmax_already_within_the_target():
    net, table = two_layer_net([0.5, 0.3, 0.2], [0.2, 0.5, 0.3]), cost_table()
    # Argmax (2, 4) = 30 B; 15 B spare: only layer 0 2->4 (10 B) fits, then nothing.
    cands = candidates(net, table, Target("size", 45.0, "size=45B"), samples=0, seed=0)
    assert plans(cands) == [("argmax", [0, 1], 30.0, True), ("argmax-filled", [1, 1], 40.0, True)]
    # Nothing fits under 35 B: the argmax alone.
    cands = candidates(net, table, Target("size", 35.0, "size=35B"), samples=0, seed=0)
    assert plans(cands) == [("argmax", [0, 1], 30.0, True)]


def test_candidates_name_an_impossible_target():
    net = two_layer_net([0.1, 0.2, 0.7], [0.3, 0.3, 0.4])
    with pytest.raises(ConfigError, match=r"target size=10B is impossible: the cheapest plan in "
                                          r"this space costs 20"):
        candidates(net, cost_table(), Target("size", 10.0, "size=10B"), samples=5, seed=0)


def test_derive_picks_the_most_accurate_plan_within_the_target(monkeypatch):
    net, table = two_layer_net([0.1, 0.2, 0.7], [0.3, 0.3, 0.4]), cost_table()
    target = Target("size", 60.0, "size=60B")
    accuracy = {(2, 2): 90.0, (2, 0): 70.0, (2, 1): 60.0}  # the argmax is best, but over 60 B
    seen = []

    def fake(supernet, indices, splits, device, eval_batches=None):
        seen.append(tuple(indices))
        return accuracy.get(tuple(indices), 10.0 + len(seen))

    monkeypatch.setattr(dnas, "one_shot_accuracy", fake)
    cands, best = derive(net, table, target, None, "cpu", samples=0, seed=0)
    assert seen == [(2, 2), (2, 0), (2, 1)] and [c.accuracy for c in cands] == [90.0, 70.0, 60.0]
    assert best.name == "argmax-repaired" and best.meets_target
    # Past the deadline the samples are skipped; the argmax, repair and fill still count.
    seen.clear()
    cands, best = derive(net, table, target, None, "cpu", samples=40, seed=0, deadline=0.0)
    assert seen == [(2, 2), (2, 0), (2, 1)] and len(cands) > 3
    assert all(math.isnan(c.accuracy) for c in cands[3:]) and best.name == "argmax-repaired"
    # Without a target every plan is eligible: the argmax wins.
    _, best = derive(net, table, None, None, "cpu", samples=0, seed=0)
    assert best.name == "argmax" and best.accuracy == 90.0


def _bns(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _trained_supernet(splits):
    """A supernet whose BN statistics, input ranges and theta are no longer their defaults."""
    space = SearchSpace.from_dict(SYNTHETIC_SPACE)
    torch.manual_seed(0)
    net = Supernet(space.build_model(), space, seed=0)
    with torch.no_grad():
        for m in net.mixed():
            if m.searchable:
                m.theta.normal_()
        net.train()
        for b in range(2):
            net(splits.train.batch(torch.arange(64 * b, 64 * b + 64))[0])
    bns = _bns(net)
    bns[0].momentum, bns[1].momentum = 0.3, None
    return net


@pytest.mark.parametrize("training", [True, False])
def test_one_shot_accuracy_restores_the_supernet(synthetic_data, training, monkeypatch):
    net = _trained_supernet(synthetic_data)
    net.train(training)
    indices = [len(m.choices) - 1 - i % 2 for i, m in enumerate(net.mixed())]
    before = copy.deepcopy(net.state_dict())
    momenta = [m.momentum for m in _bns(net)]
    gumbel = net.generator.get_state()
    evaluated = {}

    def spy(model, loader, device):  # what the supernet looks like when it is evaluated
        evaluated.update(fixed=[m.fixed_index for m in model.mixed()],
                         state=copy.deepcopy(model.state_dict()),
                         batches=[(x.clone(), y.clone()) for x, y in loader])
        return evaluate(model, loader, device)

    monkeypatch.setattr(dnas, "evaluate", spy)
    acc = one_shot_accuracy(net, indices, synthetic_data, "cpu", bn_batches=2, eval_batches=1,
                            batch_size=64)
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert all(m.training == training for m in net.modules())
    assert [m.momentum for m in _bns(net)] == momenta == [0.3, None] + [0.1] * (len(momenta) - 2)
    assert all(m.fixed_index is None for m in net.mixed())
    assert torch.equal(net.generator.get_state(), gumbel)
    # It evaluated that plan, on BN statistics re-estimated for it from the first 2 train
    # batches, over the first eval batch of the arch split: the same steps by hand (same ops
    # on the same batches) give the very same tensors.
    ref = copy.deepcopy(net)
    ref.fix(indices)
    recalibrate_bn(ref, make_loader(synthetic_data.train, 64, shuffle=True, seed=0), 2, "cpu")
    assert evaluated["fixed"] == indices
    mine, theirs = evaluated["state"], ref.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert any(not torch.equal(mine[k], before[k]) for k in mine if "running_mean" in k)
    (x, y), = evaluated["batches"]
    first = synthetic_data.arch.batch(torch.arange(64))
    assert torch.equal(x, first[0]) and torch.equal(y, first[1])
    assert acc == evaluate(ref, [first], "cpu")["accuracy"]


def test_one_shot_accuracy_restores_the_supernet_when_evaluation_fails(synthetic_data):
    net = _trained_supernet(synthetic_data)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(AttributeError, match="no_such_split"):
        one_shot_accuracy(net, [0] * len(net.names), synthetic_data, "cpu", bn_batches=1,
                          split="no_such_split", batch_size=64)
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after)
    assert all(m.fixed_index is None for m in net.mixed())


@pytest.mark.parametrize("training", [True, False])
def test_recalibrate_bn_averages_the_first_batches_and_restores_momentum(training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, momentum=None)).train(training)
    model[0].momentum = 0.3
    with torch.no_grad():  # as if already trained: recalibration must start afresh
        for bn in model:
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(7.0)
            bn.num_batches_tracked.fill_(10)
    batches = [(torch.randn(4, 3, 5, 5) * (i + 1) + i, torch.zeros(4)) for i in range(5)]
    recalibrate_bn(model, batches, 3, "cpu")
    xs = [x for x, _ in batches[:3]]
    mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    var = torch.stack([x.var((0, 2, 3)) for x in xs]).mean(0)  # unbiased, as BN keeps it
    # model[1] sees model[0]'s train-mode output, normalised per batch: mean 0, variance
    # n / (n - 1) (biased variance 1 up to eps) in every batch.
    n = 4 * 5 * 5
    # Float32 running averages of O(1)-O(10) values: rounding well under 1e-5 relative.
    torch.testing.assert_close(model[0].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[0].running_var, var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_mean, torch.zeros(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, torch.full((3,), n / (n - 1)),
                               rtol=1e-4, atol=0)  # eps = 1e-5 in BN's normalisation
    assert [int(bn.num_batches_tracked) for bn in model] == [3, 3]
    assert [bn.momentum for bn in model] == [0.3, None]
    assert all(m.training == training for m in model.modules())


def _cfg(loss, target=4000.0):
    return DnasConfig(budget=Budget("epochs", 1), target=Target("size", target, "size=4KB")
                      if target else None, loss=loss, lam=2.0, beta=0.5, gamma=0.6)


def test_recalibrate_bn_restores_each_module_mode_and_momentum_even_when_interrupted():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(2, momentum=0.3)
    frozen = nn.BatchNorm2d(2)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), bn, frozen).train()
    frozen.eval()  # a BatchNorm held in eval inside a model in train
    recalibrate_bn(net, [(torch.randn(4, 1, 3, 3), None)], 1, "cpu")
    assert [m.training for m in net] == [True, True, False]

    def interrupted():
        yield torch.randn(4, 1, 3, 3), None
        raise KeyboardInterrupt

    net.eval()
    with pytest.raises(KeyboardInterrupt):
        recalibrate_bn(net, interrupted(), 5, "cpu")
    assert bn.momentum == 0.3 and frozen.momentum == 0.1
    assert not any(m.training for m in net.modules())


def test_additive_penalty_is_zero_within_the_target_and_linear_above():
    ce = torch.tensor(1.5)
    cfg = _cfg("additive")
    for cost, loss in ((3000.0, 1.5), (4000.0, 1.5), (5000.0, 2.0), (6000.0, 2.5)):
        # ce + 2 * max(0, cost / 4000 - 1): every number here is exact in binary.
        expected = torch.tensor(cost, dtype=torch.float64, requires_grad=True)
        out = cost_penalty(ce, expected, cfg)
        assert out.item() == loss
        (grad,) = torch.autograd.grad(out, expected)
        assert grad.item() == (0.0 if cost <= 4000 else 2.0 / 4000)


def test_multiplicative_penalty_scales_the_cross_entropy():
    ce = torch.tensor(1.5, dtype=torch.float64)
    for cost in (20.0, 4000.0, 1e6):
        expected = torch.tensor(cost, dtype=torch.float64, requires_grad=True)
        # ce * beta * log(cost) ** gamma; the target plays no part.
        outs = [cost_penalty(ce, expected, _cfg("multiplicative", t)) for t in (4000.0, 10.0, None)]
        assert outs[0].item() == outs[1].item() == outs[2].item()
        # float64 log / pow in torch and in math may differ by an ulp: rel 1e-14.
        assert outs[0].item() == pytest.approx(1.5 * 0.5 * math.log(cost) ** 0.6, rel=1e-14)
        (grad,) = torch.autograd.grad(outs[0], expected)
        assert grad.item() == pytest.approx(1.5 * 0.5 * 0.6 * math.log(cost) ** -0.4 / cost,
                                            rel=1e-14)
