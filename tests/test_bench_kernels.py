"""`nas bench kernels` on the CPU: which layers it times, how it scores them, its error
without a GPU. The kernels' real speed is measured on a GPU only; a scripted timer stands in."""

import json

import pytest
import torch

from nas.bench.kernels import (goal_layers, padding_pair, run_bench, summarize, tables,
                               warm_targets)
from nas.table import format_table
from nas.cost.device_spec import DeviceSpec
from nas.cost.roofline import roofline_us
from nas.cost.tables import table_key
from nas.spaces import LayerInfo, SearchSpace, load_space
from tests.conftest import SYNTHETIC_SPACE


def geometry(info):
    return (info.in_channels, info.out_channels, tuple(info.kernel), tuple(info.stride))


def test_goal_layers_of_resnet18():
    three, largest = goal_layers(load_space("imagenet_resnet18"), 64)
    assert [geometry(i) for i in three] == [
        (64, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (2, 2)), (128, 128, (3, 3), (1, 1)),
        (128, 256, (3, 3), (2, 2)), (256, 256, (3, 3), (1, 1)), (256, 512, (3, 3), (2, 2)),
        (512, 512, (3, 3), (1, 1))]
    # Within 10 % of the most multiply-adds (the 7x7 stem, 118 M per image): the stem and
    # the stride-1 3x3 convolutions (115.6 M each); not the stride-2 ones (57.8 M).
    assert [geometry(i) for i in largest] == [
        (3, 64, (7, 7), (2, 2)), (64, 64, (3, 3), (1, 1)), (128, 128, (3, 3), (1, 1)),
        (256, 256, (3, 3), (1, 1)), (512, 512, (3, 3), (1, 1))]


def test_bench_compiles_ahead_only_what_it_times():
    # One layer per geometry: the seven 3x3 and the stem at W8A8 at the large batch, the
    # seven 3x3 at W8A8 and W4A8 at the small one (not all 21 layers at both precisions).
    threes = ["layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1",
              "layer3.0.conv2", "layer4.0.conv1", "layer4.0.conv2"]
    # At the large batch each is compiled on a bordered input as well (the padding's cost).
    assert warm_targets(load_space("imagenet_resnet18"), 64, 1) == [
        (64, ["W8A8"], threes + ["conv1"], True), (1, ["W8A8", "W4A8"], threes, False)]


def test_summary_is_met_only_when_the_worst_layer_meets_the_goal():
    assert summarize([2.0, 0.5], 1.0) == {"layers": 2, "geomean": 1.0, "worst": 0.5,
                                          "best": 2.0, "goal": 1.0, "met": False}
    assert summarize([1.5, 1.6], 1.5)["met"] is True
    assert summarize([], 1.5) == {"layers": 0, "goal": 1.5, "met": False}


class ScriptedTimer:
    """measure() times each case's kernel, then its fp16 baseline: 20 us and 30 us; after
    `measured` calls, each padded layer again (20 us) then on its bordered input (16 us)."""

    def __init__(self, measured: int):
        self.calls, self.measured = 0, measured

    def __call__(self, fn):
        self.calls += 1
        if getattr(fn, "__name__", None) == "baseline":  # prepared launches may be objects
            return 30.0
        return 16.0 if self.calls > self.measured and (self.calls - self.measured) % 2 == 0 \
            else 20.0


def test_bench_scores_every_goal_from_one_run():
    space = SearchSpace.from_dict(SYNTHETIC_SPACE)
    spec = DeviceSpec.load("h200")
    three, largest = goal_layers(space, 4)
    large_cases = {geometry(i): i for i in three + largest}
    measured = 2 * (len(large_cases) + 2 * len(goal_layers(space, 1)[0]))
    padded = [i for i in large_cases.values() if any(i.padding)]
    timer = ScriptedTimer(measured)
    # Every case is run once on the CPU (the interpreter): the padded ones in padding_pair,
    # which checks that the kernel's padding and a bordered input agree bit for bit.
    result = run_bench(space, torch.device("cpu"), timer, spec, large=4, small=1,
                       say=lambda s: None)
    assert timer.calls == measured + 2 * len(padded)
    goals = result["goals"]
    assert goals["w8a8_vs_fp16"] == summarize([1.5] * len(three), 1.5)  # 30 us / 20 us
    assert goals["w8a8_vs_fp16"]["met"] is True
    assert goals["w4a8_vs_w8a8"] == summarize([1.0] * len(three), 1.2)  # same time: not met
    by_key = {e["key"]: e for e in result["entries"]}
    assert goals["roofline_fraction"]["layers"] == len(largest)
    for info in largest:  # the cost model's roofline time over the (scripted) 20 us
        assert by_key[table_key(info, 4, 8, 8)]["roofline_fraction"] == pytest.approx(
            roofline_us(info, 8, 8, 4, spec) / 20.0, rel=1e-3)
    # The padded layers (the stem and every 3x3) again on bordered inputs: 20 us / 16 us.
    padding = result["padding"]
    assert [e["key"] for e in padding["entries"]] == [table_key(i, 4, 8, 8) for i in padded]
    assert {(e["us_padding_in_kernel"], e["us_padding_in_layout"],
             e["in_kernel_over_in_layout"], e["speedup_vs_fp16_in_layout"])
            for e in padding["entries"]} == {(20.0, 16.0, 1.25, 1.875)}
    assert padding["in_kernel_over_in_layout"] == {"layers": len(padded), "geomean": 1.25,
                                                   "min": 1.25, "max": 1.25}
    assert padding["w8a8_vs_fp16_3x3_in_layout"] == summarize([1.875] * len(three), 1.5)
    json.dumps(result)  # what the bench writes
    printed = {title: format_table(headers, rows) for title, headers, rows in tables(result)}
    summary = printed["padding (a bordered input is a layout the kernels are not given today)"]
    assert "time padded in the kernel / on a bordered input" in summary


def test_prepadded_geometry_is_the_same_layer_on_a_bordered_input():
    info = {l.name: l.info for l in load_space("imagenet_resnet18").layers()}
    bordered = info["layer2.0.conv1"].prepadded()  # 3x3 stride 2 on 56x56, padding 1
    assert (bordered.in_hw, bordered.padding, bordered.out_hw) == ((58, 58), (0, 0), (28, 28))
    assert bordered.macs == info["layer2.0.conv1"].macs
    assert info["fc"].prepadded() == info["fc"]  # nothing to border


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 4)])
def test_padding_pair_on_uneven_padding_agrees_bit_for_bit(w_bits, a_bits):
    # Padding (2, 1), a 5x3 kernel, strides (2, 1): the border goes on the right axes (with
    # H and W swapped the shapes or values would differ); 4-bit activations packed after it.
    info = LayerInfo("conv", "Conv2d", 6, 10, (5, 3), (2, 1), (2, 1), 1, (7, 5), (4, 5),
                     10 * 6 * 15, 10 * 6 * 15 * 20)
    in_kernel, in_layout = padding_pair(info, 2, w_bits, a_bits, torch.device("cpu"),
                                        torch.Generator().manual_seed(1))
    assert in_layout.info.in_hw == (11, 7)
    assert in_kernel.run().shape == in_layout.run().shape == (2, 4, 5, 10)


def test_padding_pair_refuses_outputs_that_differ(monkeypatch):
    import torch.nn.functional as F

    info = {l.name: l.info for l in SearchSpace.from_dict(SYNTHETIC_SPACE).layers()}
    gen = torch.Generator().manual_seed(0)
    in_kernel, in_layout = padding_pair(info["layer1.0.conv1"], 2, 8, 8, torch.device("cpu"),
                                        gen)
    assert in_layout.info.padding == (0, 0) and in_kernel.info.padding == (1, 1)
    # A border of 0 instead of the zero point (1): a real 0 is not what the border holds.
    pad = F.pad
    monkeypatch.setattr(F, "pad", lambda x, p, value=0: pad(x, p, value=0))
    with pytest.raises(RuntimeError, match="layer1.0.conv1: the kernel's padding and a "
                                           "bordered input give different outputs"):
        padding_pair(info["layer1.0.conv1"], 2, 8, 8, torch.device("cpu"), gen)


def test_bench_kernels_without_cuda_exits_2_and_writes_nothing(cli, no_cuda, tmp_path):
    # CUDA hidden from it: the same error on a machine with a GPU.
    result = cli("bench", "kernels", "--runs-dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        "nas: error: nas bench kernels times kernels on a CUDA GPU and none is available here")
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
