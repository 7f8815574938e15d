"""Layers that neither `searchable` nor `fixed` names stay float in the quantized model, so
every cost counts them as float: a space holds them fixed at W32A32 (nas.spaces.UNMATCHED)."""

import copy

import pytest
import torch
from torch import nn

from nas.cost import make_cost_model
from nas.cost.size import weight_count
from nas.plan import Plan
from nas.quant.modules import QUANT_TYPES, quantize_model
from nas.spaces import UNMATCHED, Choice, SearchSpace
from tests.conftest import SYNTHETIC_SPACE, run_nas

PARTIAL = {**SYNTHETIC_SPACE, "searchable": ["layer1.*"],
           "fixed": {"conv1": {"w_bits": 8, "a_bits": 8}}}
FLOAT = ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv1",
         "layer3.0.conv2", "layer3.0.downsample.0", "fc"]


@pytest.fixture(scope="module")
def partial():
    return SearchSpace.from_dict(copy.deepcopy(PARTIAL))


def test_unnamed_layers_are_fixed_at_float(partial):
    layers = {layer.name: layer for layer in partial.layers()}
    assert len(layers) == 10  # every Conv2d and Linear of resnet8
    assert [n for n, x in layers.items() if x.choices == (UNMATCHED,)] == FLOAT
    assert all(layers[n].fixed for n in FLOAT) and layers["conv1"].choices == (Choice(8, 8),)
    assert not layers["layer1.0.conv1"].fixed


def test_costs_count_float_layers_at_32_bits(partial):
    plan = Plan.uniform(partial, 8, 8)
    assert {n: str(plan.layers[n]) for n in FLOAT} == {n: "W32A32" for n in FLOAT}
    infos = {layer.name: layer.info for layer in partial.layers()}
    size = make_cost_model("size")
    for name in FLOAT:  # float32 weights, float32 biases, no scales
        info = infos[name]
        expected = 4 * weight_count(info) + 4 * info.out_channels
        assert size.layer_cost(info, plan.layers[name]) == expected
    bitops = make_cost_model("bitops")
    assert bitops.plan_cost(plan, partial) == sum(
        infos[n].macs * (32 * 32 if n in FLOAT else 8 * 8) for n in infos)
    # The float layers hold most of this model: the audit's 536 B was a fraction of it.
    assert size.plan_cost(plan, partial) > 4 * sum(weight_count(infos[n]) for n in FLOAT)


def test_same_costs_as_listing_them_fixed_at_float(partial):
    """Leaving a layer out is the same space as fixing it at W32A32, for every cost model."""
    fixed = {**PARTIAL["fixed"], **{n: {"w_bits": 32, "a_bits": 32} for n in FLOAT}}
    listed = SearchSpace.from_dict({**copy.deepcopy(PARTIAL), "fixed": fixed})
    for cost in ("size", "bitops", "latency"):
        model = make_cost_model(cost)
        assert model.table(partial).values == model.table(listed).values, cost


def test_quantized_model_keeps_them_float(partial):
    model = partial.build_model()
    quantized = quantize_model(model, Plan.uniform(partial, 4, 8).resolved(partial))
    modules = dict(quantized.named_modules())
    assert all(type(modules[n]) in (nn.Conv2d, nn.Linear) for n in FLOAT)
    assert all(isinstance(modules[n], QUANT_TYPES) for n in ("conv1", "layer1.0.conv1"))


def test_supernet_runs_them_as_one_float_branch(partial):
    from nas.supernet import Supernet

    supernet = Supernet(partial.build_model(), partial, mode="soft")
    # theta only where there is a choice: layer1's two convolutions
    assert len(supernet.arch_parameters()) == 2
    supernet(torch.randn(4, 1, 12, 12)).sum().backward()


def test_cost_command_counts_them(tmp_path):
    """The audit's case: `searchable: 'conv*'` matches only the stem."""
    import yaml

    space = tmp_path / "conv.yaml"
    raw = {**SYNTHETIC_SPACE, "searchable": "conv*", "fixed": {}}
    space.write_text(yaml.safe_dump(raw))
    loaded = SearchSpace.from_dict(raw)
    expected = make_cost_model("size").plan_cost(Plan.uniform(loaded, 8, 8), loaded)
    assert expected == 78384  # 136 B for the W8A8 stem, the rest float32
    result = run_nas("cost", "--space", str(space), "--uniform", "W8A8")
    assert result.returncode == 0, result.stderr
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1] == "78384"
