"""Layers that neither `searchable` nor `fixed` names stay float in the quantized model and
outside the space, so no cost counts them: `nas cost` and `nas search` say so in one note,
and listing them under `fixed:` at W32A32 counts them."""

import copy

import pytest
import yaml
from torch import nn

from nas.cost import make_cost_model
from nas.cost.size import weight_count
from nas.plan import Plan
from nas.quant.modules import QUANT_TYPES, quantize_model
from nas.spaces import SearchSpace
from tests.conftest import SYNTHETIC_SPACE

PARTIAL = {**SYNTHETIC_SPACE, "searchable": ["layer1.*"],
           "fixed": {"conv1": {"w_bits": 8, "a_bits": 8}}}
FLOAT = ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv1",
         "layer3.0.conv2", "layer3.0.downsample.0", "fc"]


@pytest.fixture(scope="module")
def partial():
    return SearchSpace.from_dict(copy.deepcopy(PARTIAL))


def test_unnamed_layers_are_outside_the_space(partial):
    assert [layer.name for layer in partial.layers()] == [
        "conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert partial.unnamed_layers() == FLOAT


def test_quantized_model_keeps_them_float(partial):
    model = partial.build_model()
    quantized = quantize_model(model, Plan.uniform(partial, 4, 8).resolved(partial))
    modules = dict(quantized.named_modules())
    assert all(type(modules[n]) in (nn.Conv2d, nn.Linear) for n in FLOAT)
    assert all(isinstance(modules[n], QUANT_TYPES) for n in ("conv1", "layer1.0.conv1"))


def test_listing_them_fixed_at_float_counts_them(partial):
    fixed = {**PARTIAL["fixed"], **{n: {"w_bits": 32, "a_bits": 32} for n in FLOAT}}
    listed = SearchSpace.from_dict({**copy.deepcopy(PARTIAL), "fixed": fixed})
    assert listed.unnamed_layers() == []
    size = make_cost_model("size")
    infos = {layer.name: layer.info for layer in listed.layers()}
    extra = sum(4 * weight_count(infos[n]) + 4 * infos[n].out_channels for n in FLOAT)
    assert (size.plan_cost(Plan.uniform(listed, 8, 8), listed)
            == size.plan_cost(Plan.uniform(partial, 8, 8), partial) + extra)


def test_cost_command_notes_them(cli, tmp_path):
    """The audit's case: `searchable: 'conv*'` names only the stem; the totals are the
    stem's, and the output says which layers they leave out."""
    space = tmp_path / "conv.yaml"
    space.write_text(yaml.safe_dump({**SYNTHETIC_SPACE, "searchable": "conv*", "fixed": {}}))
    result = cli("cost", "--space", str(space), "--uniform", "W8A8")
    assert result.returncode == 0, result.stderr
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1] == "136"  # the W8A8 stem alone
    assert result.stdout.strip().splitlines()[-1] == (
        "note: 9 Conv2d/Linear layers of resnet8 that space synthetic_resnet8 does not name "
        "(layer1.0.conv1, layer1.0.conv2, layer2.0.conv1, layer2.0.conv2, ...) stay float and "
        "are in none of these costs; list them under fixed: with w_bits: 32, a_bits: 32 to "
        "count them")
