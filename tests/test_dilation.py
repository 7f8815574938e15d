"""Dilated convolutions: recorded in the geometry, never given an undilated layer's measured
latency (the Triton kernels have no dilation), and refused by the commands that run or compile
the kernels."""

import json

import pytest
import yaml

from nas.cli import main
from nas.cost.device_spec import DeviceSpec
from nas.cost.latency import LatencyCost
from nas.cost.tables import LatencyTable, layer_from_key, table_key
from nas.plan import LayerPrecision, layer_hash
from nas.spaces import SearchSpace

MODEL = """
from torch import nn
def net(num_classes=10, in_channels=1, dilation=2):
    # The dilated layer keeps its input size (padding = dilation), and global pooling follows,
    # so dilation 1 and 2 differ in that layer's dilation and output size only.
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=2, dilation=dilation), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""


@pytest.fixture
def dilated_space(tmp_path, monkeypatch):
    """A space file for a user's model whose second conv is dilated (`dilation` 2, or as
    given); data Fashion-MNIST's shape (its files are not read)."""
    (tmp_path / "dilnet.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(dilation: int = 2):
        path = tmp_path / f"d{dilation}.yaml"
        path.write_text(yaml.safe_dump({
            "name": "dilated", "model": {"name": "dilnet:net", "kwargs": {"dilation": dilation}},
            "data": {"name": "fashion_mnist"}, "searchable": ["*"],
            "choices": {"w_bits": [4, 8], "a_bits": [8]}}))
        return path

    return write


def _layers(path):
    return {x.name: x.info for x in SearchSpace.from_yaml(path).layers()}


def test_geometry_records_dilation_and_the_dilated_output(dilated_space):
    layers = _layers(dilated_space())
    assert [(n, i.dilation) for n, i in layers.items()] == [
        ("0", (1, 1)), ("2", (2, 2)), ("6", (1, 1))]
    assert layers["2"].dilated and not layers["0"].dilated
    # 28 + 2*2 - 2*(3-1) = 28 rows and columns out; 3x3 taps of 8 channels, 8 outputs.
    assert layers["2"].out_hw == (28, 28) and layers["2"].macs == 28 * 28 * 8 * 8 * 9
    assert _layers(dilated_space(1))["2"].out_hw == (30, 30)


def test_table_key_names_dilation_only_where_there_is_one(dilated_space):
    layers = _layers(dilated_space())
    # An undilated key is as before, so the committed tables keep matching.
    assert table_key(layers["0"], 1, 8, 8) == "Conv2d:1x8:k3x3:s1x1:p1x1:g1:28x28:b1:w8a8"
    key = table_key(layers["2"], 1, 8, 8)
    assert key == "Conv2d:8x8:k3x3:s1x1:p2x2:d2x2:g1:28x28:b1:w8a8"
    assert layer_from_key(key) is None  # no table entry describes a dilated layer
    undilated = _layers(dilated_space(1))["2"]
    assert table_key(undilated, 1, 8, 8) == key.replace(":d2x2", "")


def test_a_dilated_layer_is_estimated_where_its_undilated_twin_is_measured(dilated_space,
                                                                             tmp_path):
    spec = DeviceSpec.load("h200")
    dilated, undilated = _layers(dilated_space())["2"], _layers(dilated_space(1))["2"]
    (tmp_path / "t.json").write_text(json.dumps({
        "format": "nas-latency/1", "provenance": {"device_spec": "h200"},
        "entries": [{"key": table_key(undilated, 1, 8, 8), "us": 99.0}]}))
    model = LatencyCost(spec, 1, LatencyTable.load_files("h200", [tmp_path / "t.json"]),
                        calibrate=False)
    w8a8 = LayerPrecision(8, 8)
    assert model.layer_cost(undilated, w8a8) == 99.0 and not model.is_estimated(undilated, w8a8)
    assert model.is_estimated(dilated, w8a8)
    assert model.layer_cost(dilated, w8a8) == model.estimate(dilated, w8a8) != 99.0


def test_layer_hash_tells_dilation_apart(dilated_space):
    d1, d2 = (SearchSpace.from_yaml(dilated_space(d)) for d in (1, 2))
    assert layer_hash(d1) != layer_hash(d2)
    # Format 1 hashed names, types and shapes only: these two spaces were one to it.
    assert layer_hash(d1, version=1) == layer_hash(d2, version=1)


@pytest.mark.parametrize("command", [["measure"], ["bench", "compile"], ["bench", "kernels"]])
def test_kernel_commands_refuse_a_dilated_layer_first(dilated_space, tmp_path, capsys, command,
                                                      monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # refused before the GPU
    runs = tmp_path / "runs"
    assert main(["--runs-dir", str(runs), *command, "--space", str(dilated_space())]) == 2
    name = "nas " + " ".join(command)
    assert capsys.readouterr().err == (
        f"nas: error: {name}: layer 2 of space dilated is dilated (2x2), and the Triton kernels "
        f"have no dilation; nas cost gives its latency as a roofline estimate. To run {name} on "
        f"the other layers, leave it out of the space's searchable and fixed globs\n")
    assert not runs.exists()


def test_spaces_show_and_cost_of_a_dilated_space(dilated_space, capsys):
    path = str(dilated_space())
    assert main(["spaces", "show", path]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("2 "))
    assert "3x3 dilation 2x2" in row
    assert main(["cost", "--space", path, "--uniform", "W8A8", "--estimate", "roofline"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("2 "))
    assert row.split()[-1] == "estimated"
