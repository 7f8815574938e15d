import pytest
import torch

from nas.budget import Budget
from nas.cost import make_cost_model
from nas.cost.base import CostTable
from nas.cost.targets import Target
from nas.errors import ConfigError
from nas.search.derive import fill, repair
from nas.search.dnas import DnasConfig, SearchState, search
from nas.spaces import Choice, SearchSpace
from nas.supernet import MixedLayer, Supernet, tau_at
from tests.conftest import SYNTHETIC_SPACE


def test_hard_samples_follow_softmax_frequencies(synthetic_space):
    net = Supernet(synthetic_space.build_model(), synthetic_space, seed=0)
    layer = net.mixed()[1]
    with torch.no_grad():
        layer.theta.copy_(torch.tensor([2.0, 0.0, -1.0, 1.0, 0.5, -2.0]))
    probs = layer.probs()
    n = 20000
    counts = torch.zeros(6)
    for _ in range(n):
        counts[int(net._sample(layer.logits()).argmax())] += 1
    # Gumbel-max: argmax(theta + g) ~ softmax(theta) at any tau. Standard error of each
    # frequency <= sqrt(0.25 / 20000) = 0.0035; allow 0.015 (over 4 standard errors).
    assert torch.allclose(counts / n, probs.detach(), atol=0.015)


def test_gradients_reach_theta_and_weights(synthetic_space):
    model = synthetic_space.build_model()
    for mode in ("hard", "soft"):
        net = Supernet(model, synthetic_space, mode=mode, tau=1.0)
        x = torch.randn(4, 1, 12, 12)
        net(x).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.arch_parameters())
        assert net.net.layer1[0].conv1.layer.weight.grad.abs().sum() > 0


def test_hard_mode_estimates_every_branch_gradient_through_batchnorm():
    """Hard mode computes one branch but gives each gate g_j the gradient <dL/dy, y_j>:
    exactly (up to one offset common to all j, which softmax ignores) for branches that share
    w_bits or a_bits with the chosen one. Behind a train-mode BatchNorm the chosen branch's
    own <dL/dy, y_k> is zero (scale invariance), so gating its output would teach theta
    nothing; the estimate still separates the branches."""
    torch.manual_seed(0)
    choices = [Choice(w, a) for w in (2, 4, 8) for a in (4, 8)]
    layer = MixedLayer(torch.nn.Conv2d(3, 5, 3, padding=1), choices)
    bn = torch.nn.BatchNorm2d(5).train()
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    target = torch.randn(4, 5, 6, 6)
    layer.train()
    layer.branch(x, 0)  # records the input range
    layer.eval()
    k = choices.index(Choice(4, 8))
    gates = torch.zeros(len(choices), requires_grad=True)
    y = layer.hard(x, k, gates)
    y.retain_grad()
    (bn(y) * target).sum().backward()
    exact = torch.stack([(y.grad * layer.branch(x, j)).sum() for j in range(6)])
    # Scale invariance: the chosen branch's own signal vanishes (float32 rounding only).
    assert abs(exact[k]) < 1e-4 * exact.abs().max()
    offset = gates.grad[k] - exact[k]
    share = [j for j, c in enumerate(choices) if c.w_bits == 4 or c.a_bits == 8]
    assert len(share) == 4
    torch.testing.assert_close(gates.grad[share] - offset, exact[share], rtol=1e-4, atol=1e-4)
    assert exact[share].std() > 0.1 * exact.abs().max()  # the branches really differ


def test_weights_are_shared_not_copied(synthetic_space):
    model = synthetic_space.build_model()
    net = Supernet(model, synthetic_space)
    model_params = sum(p.numel() for p in model.parameters())
    theta = sum(len(layer.choices) for layer in synthetic_space.layers() if not layer.fixed)
    # No learned quantizer parameters: ranges are running buffers.
    assert sum(p.numel() for p in net.parameters()) == model_params + theta
    factored = Supernet(model, synthetic_space, factored=True)
    assert sum(p.numel() for p in factored.arch_parameters()) == 8 * (3 + 2)


def test_factored_logits_add_the_weight_and_activation_logits(synthetic_space):
    """Factored theta: logit_j = theta_w[w_bits of j] + theta_a[a_bits of j], whatever the order
    of the choices. Each sum below is exact in float32 and names one (w_bits, a_bits) pair."""
    w_logit, a_logit = {2: 0.0, 4: 16.0, 8: 64.0}, {4: 1.0, 8: 3.0}
    scrambled = [Choice(8, 4), Choice(2, 8), Choice(4, 4), Choice(2, 4), Choice(8, 8), Choice(4, 8)]
    layer = MixedLayer(torch.nn.Conv2d(1, 2, 3), scrambled, factored=True)
    net = Supernet(synthetic_space.build_model(), synthetic_space, factored=True)
    searchable = [m for m in net.mixed() if m.searchable]
    assert len(searchable) == 8 and all(not hasattr(m, "theta") for m in searchable)
    for m in [layer, *searchable]:
        with torch.no_grad():  # theta_w / theta_a are indexed by sorted bits
            m.theta_w.copy_(torch.tensor([w_logit[b] for b in sorted(w_logit)]))
            m.theta_a.copy_(torch.tensor([a_logit[b] for b in sorted(a_logit)]))
        expected = torch.tensor([w_logit[c.w_bits] + a_logit[c.a_bits] for c in m.choices])
        assert torch.equal(m.logits(), expected)
        assert torch.equal(m.probs(), torch.softmax(expected, dim=0))
    assert layer.logits().tolist() == [65.0, 3.0, 17.0, 1.0, 67.0, 19.0]
    # One step on theta_w moves every choice with that w_bits, and only those.
    layer.logits()[0].backward()
    assert layer.theta_w.grad.tolist() == [0.0, 0.0, 1.0]
    assert layer.theta_a.grad.tolist() == [1.0, 0.0]
    fixed = [m for m in net.mixed() if not m.searchable]
    assert len(fixed) == 2 and all(torch.equal(m.logits(), torch.zeros(1)) for m in fixed)


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_fixed_branch_matches_the_folded_quantized_model(synthetic_space, granularity):
    """A supernet fixed to one plan computes that plan's fake-quantized network as it is
    deployed: BN folded into the weights that get quantized (the same weight codes)."""
    from nas.quant.bn_fold import fold_bn
    from nas.quant.modules import quantize_model

    torch.manual_seed(0)
    model = synthetic_space.build_model().eval()
    with torch.no_grad():  # BN factors gamma / sigma far from 1 and from each other
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.copy_(torch.logspace(-2, 0, bn.num_features)[torch.randperm(bn.num_features)])
            bn.running_var.uniform_(0.2, 5.0)
            bn.running_mean.uniform_(-1, 1)
            bn.bias.uniform_(-0.5, 0.5)
    space = SearchSpace.from_dict({**SYNTHETIC_SPACE, "quantizer": {"w_granularity": granularity}})
    net = Supernet(model, space).eval()
    x = torch.randn(8, 1, 12, 12)
    for m in net.mixed():
        m.train()  # records the input ranges (first batch: exact min / max); BN stays in eval
    net.fix([0] * len(net.names))
    net(x)
    net.eval()
    plan = net.plan_for([0] * len(net.names))
    assert plan.layers["layer1.0.conv1"].w_bits == 2 and plan.layers["conv1"].w_bits == 8
    q = quantize_model(fold_bn(model), plan.resolved(space), calibration="minmax").eval()
    # Same activation ranges as the supernet recorded (PTQ calibration would observe the
    # float network's activations instead).
    for name, mixed in zip(net.names, net.mixed()):
        q.get_submodule(name).input_quantizer.set_range(mixed.act_lo, mixed.act_hi)
        layer = q.get_submodule(name)
        if mixed.folded_bn is not None:
            # The deployed weight is the supernet's times f: the same codes, up to the two
            # float roundings of dividing by f and multiplying back (relative 2.4e-7).
            with torch.no_grad():
                assert torch.allclose(layer.weight_quantizer(layer.weight),
                                      mixed._quant_weight(plan.layers[name].w_bits)
                                      * mixed._bn_factor(), rtol=1e-6, atol=0)
    with torch.no_grad():
        ref, out = q(x), net(x)
    # The same codes and ranges; the supernet applies f after the conv (BN) where the folded
    # model multiplies it into the weight, so the two differ by float rounding only.
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


class PaddedNet(torch.nn.Module):
    """Convolutions padded each way torch allows: 'same' with an even kernel (an uneven
    border), reflect, and 'valid' with dilation."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels, 4, 4, padding="same")
        self.mid = torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
        self.last = torch.nn.Conv2d(6, 6, 3, padding="valid", dilation=2)
        self.fc = torch.nn.Linear(6, num_classes)

    def forward(self, x):
        x = torch.relu(self.mid(torch.relu(self.stem(x))))
        return self.fc(self.last(x).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_a_supernet_of_a_model_with_any_padding_matches_its_quantized_model():
    from nas.quant.modules import quantize_model

    padded = SearchSpace.from_dict({**SYNTHETIC_SPACE, "name": "padded",
                                    "model": {"name": "tests.test_supernet:PaddedNet"},
                                    "fixed": {"stem": {"w_bits": 8, "a_bits": 8}}})
    info = {x.name: x.info for x in padded.layers()}
    # 'same' counts the larger half of the border (torch puts it right / bottom); 'valid' none.
    assert info["stem"].padding == (2, 2) and info["stem"].out_hw == info["stem"].in_hw == (12, 12)
    assert info["last"].padding == (0, 0) and info["last"].out_hw == (8, 8)
    torch.manual_seed(0)
    model = padded.build_model().eval()
    net = Supernet(model, padded, tau=1.0)
    x = torch.randn(8, 1, 12, 12)
    net.train()
    net(x).sum().backward()  # trains through every padding: theta learns
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.arch_parameters())
    indices = [min(1, len(m.choices) - 1) for m in net.mixed()]  # W2A8; the fixed stem W8A8
    net.fix(indices)
    with torch.no_grad():
        net(x)  # records the input ranges of the plan's branches
    net.eval()
    q = quantize_model(model, net.plan_for(indices).resolved(padded), calibration="minmax").eval()
    for name, mixed in zip(net.names, net.mixed()):
        q.get_submodule(name).input_quantizer.set_range(mixed.act_lo, mixed.act_hi)
    with torch.no_grad():
        # Bit-identical: the supernet pads explicitly exactly as torch does for 'same' with an
        # even kernel and for reflect (measured diff 0.0 over 5 seeds x 3 plans on the CPU).
        assert torch.equal(net(x), q(x))


def test_tau_schedule():
    assert tau_at(0.0) == pytest.approx(5.0) and tau_at(1.0) == pytest.approx(0.2)
    assert tau_at(0.5) == pytest.approx(1.0)  # geometric mean of 5 and 0.2
    assert tau_at(2.0) == pytest.approx(0.2) and tau_at(0.25, 4.0, 1.0) == pytest.approx(4 * 0.25 ** 0.25)


def _table(values):
    return CostTable("size", "bytes", [f"l{i}" for i in range(len(values))],
                     [tuple(Choice(b, 8) for b in (2, 4, 8)[:len(r)]) for r in values], values,
                     [[False] * len(r) for r in values])


def test_repair_gives_up_least_probability_per_cost():
    table = _table([[10.0, 20.0, 40.0], [10.0, 20.0, 40.0]])
    probs = [torch.tensor([0.1, 0.2, 0.7]), torch.tensor([0.3, 0.3, 0.4])]
    target = Target("size", 60.0, "size=60B")
    # From (40, 40) = 80 bytes, the moves and their probability lost per byte saved:
    # layer 0: 8->4 0.5/20 = 0.025, 8->2 0.6/30 = 0.02; layer 1: 8->4 0.1/20 = 0.005,
    # 8->2 0.1/30 = 0.0033. The last is cheapest, and 50 bytes meets the target.
    assert repair([2, 2], probs, table, target) == [2, 0]
    # For 30 bytes, from (40, 10) the cheapest move is layer 0 8->2 (0.02 per byte): 20 bytes.
    assert repair([2, 2], probs, table, Target("size", 30.0, "size=30B")) == [0, 0]
    assert repair([1, 1], probs, table, target) == [1, 1]  # already within: unchanged
    with pytest.raises(ConfigError, match="target size=10B is impossible: the cheapest plan"):
        repair([2, 2], probs, table, Target("size", 10.0, "size=10B"))


def test_fill_spends_the_budget_left_under_the_target():
    table = _table([[10.0, 20.0, 40.0], [10.0, 20.0, 40.0]])
    probs = [torch.tensor([0.1, 0.2, 0.7]), torch.tensor([0.3, 0.3, 0.4])]
    # From (10, 10) = 20 bytes with 60 allowed, the moves and their probability given up per
    # byte added: layer 0: 2->4 -0.1/10, 2->8 -0.6/30 = -0.02 (the best); layer 1: 2->4 0/10,
    # 2->8 -0.1/30. Then (40, 10) = 50 bytes: only layer 1 2->4 (10 bytes) fits.
    assert fill([0, 0], probs, table, Target("size", 60.0, "size=60B")) == [2, 1]
    assert fill([2, 2], probs, table, Target("size", 80.0, "size=80B")) == [2, 2]  # nothing fits
    # Activation bits cost no size: W2A4 becomes W2A8 at once, then the budget is spent.
    choices = [[Choice(2, 4), Choice(2, 8), Choice(8, 8)]]
    free = _table([[10.0, 10.0, 40.0]])
    uniform = [torch.tensor([1 / 3] * 3)]
    assert fill([0], uniform, free, Target("size", 20.0, "size=20B"), choices) == [1]
    assert fill([0], uniform, free, Target("size", 40.0, "size=40B"), choices) == [2]


def _search(space, splits, steps_to_interrupt=None, log_every=5):
    torch.manual_seed(0)
    net = Supernet(space.build_model(), space, seed=3)
    table = make_cost_model("size").table(space)
    cfg = DnasConfig(budget=Budget("epochs", 2), target=Target("size", 4000, "size=4KB"),
                     batch_size=64, warmup=0.25, log_every=log_every, progress=False)

    def stop(entry):
        if steps_to_interrupt and entry["step"] >= steps_to_interrupt:
            raise KeyboardInterrupt

    state, optim, interrupted = search(net, splits, table, cfg, "cpu", on_log=stop)
    return net, state, optim, interrupted, cfg, table


def test_resumed_search_reaches_the_same_theta(synthetic_space, synthetic_data):
    splits = synthetic_data
    straight, state, _, interrupted, _, _ = _search(synthetic_space, splits)
    assert not interrupted and state.step == 2 * (len(splits.train) // 64)
    first, state1, optim1, interrupted1, cfg, table = _search(synthetic_space, splits,
                                                              steps_to_interrupt=10)
    assert interrupted1 and state1.step == 10
    saved = {"supernet": {k: v.clone() for k, v in first.state_dict().items()},
             "gumbel": first.generator.get_state()}
    torch.manual_seed(0)
    resumed = Supernet(synthetic_space.build_model(), synthetic_space, seed=3)
    resumed.load_state_dict(saved["supernet"])
    resumed.generator.set_state(saved["gumbel"])
    state2, _, interrupted2 = search(resumed, splits, table, cfg, "cpu",
                                     SearchState(step=state1.step, elapsed=state1.elapsed), optim1)
    assert not interrupted2 and state2.step == state.step
    # Bit-identical on the CPU: the same batches, Gumbel noise and optimizer state in the same
    # order (measured diff 0.0), for theta and for every other tensor of the supernet.
    for a, b in zip(straight.arch_parameters(), resumed.arch_parameters()):
        assert torch.equal(a, b)
    ours, theirs = straight.state_dict(), resumed.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(p.abs().sum() > 0 for p in resumed.arch_parameters())  # theta did move


def test_search_moves_toward_the_target(synthetic_space, synthetic_data):
    splits = synthetic_data
    net, state, _, _, _, table = _search(synthetic_space, splits)
    expected = table.expected([p.detach() for p in net.probs()]).item()
    uniform = table.expected([torch.full((len(r),), 1 / len(r)) for r in table.values]).item()
    # A 4 KB target is below the uniform mix: the penalty must have pulled E[cost] down.
    assert expected < uniform


def test_soft_mode_pads_a_reflect_padded_input_once_for_all_its_branches(monkeypatch):
    # Each padded copy is kept for the backward pass: one per activation precision would
    # multiply the layer's activation memory.
    from nas.quant import qinput

    calls = []
    pad = qinput.F.pad
    monkeypatch.setattr(qinput.F, "pad", lambda *a, **k: calls.append(1) or pad(*a, **k))
    choices = [Choice(w, a) for w in (2, 4, 8) for a in (4, 8)]
    layer = MixedLayer(torch.nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), choices)
    layer.train()
    layer.soft(torch.randn(2, 3, 6, 6), torch.full((6,), 1 / 6))
    assert len(layer.a_groups) == 2 and len(calls) == 1
