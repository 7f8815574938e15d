"""`nas bench kernels` on the CPU: which layers it times, how it scores them, its error
without a GPU. The kernels' real speed is measured on a GPU only; a scripted timer stands in."""

import json

import pytest
import torch

from nas.bench.kernels import goal_layers, run_bench, summarize, warm_targets
from nas.cost.latency import DeviceSpec, roofline_us, table_key
from nas.spaces import SearchSpace, load_space
from tests.conftest import SYNTHETIC_SPACE, run_nas


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
    assert warm_targets(load_space("imagenet_resnet18"), 64, 1) == [
        (64, ["W8A8"], threes + ["conv1"]), (1, ["W8A8", "W4A8"], threes)]


def test_summary_is_met_only_when_the_worst_layer_meets_the_goal():
    assert summarize([2.0, 0.5], 1.0) == {"layers": 2, "geomean": 1.0, "worst": 0.5,
                                          "best": 2.0, "goal": 1.0, "met": False}
    assert summarize([1.5, 1.6], 1.5)["met"] is True
    assert summarize([], 1.5) == {"layers": 0, "goal": 1.5, "met": False}


class ScriptedTimer:
    """measure() times each case's kernel, then its fp16 baseline: 20 us and 30 us."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        return 20.0 if self.calls % 2 else 30.0


def test_bench_scores_every_goal_from_one_run():
    space = SearchSpace.from_dict(SYNTHETIC_SPACE)
    spec = DeviceSpec.load("h200")
    timer = ScriptedTimer()
    result = run_bench(space, torch.device("cpu"), timer, spec, large=4, small=1,
                       say=lambda s: None)
    three, largest = goal_layers(space, 4)
    large_cases = {geometry(i) for i in three + largest}
    assert timer.calls == 2 * (len(large_cases) + 2 * len(goal_layers(space, 1)[0]))
    goals = result["goals"]
    assert goals["w8a8_vs_fp16"] == summarize([1.5] * len(three), 1.5)  # 30 us / 20 us
    assert goals["w8a8_vs_fp16"]["met"] is True
    assert goals["w4a8_vs_w8a8"] == summarize([1.0] * len(three), 1.2)  # same time: not met
    by_key = {e["key"]: e for e in result["entries"]}
    assert goals["roofline_fraction"]["layers"] == len(largest)
    for info in largest:  # the cost model's roofline time over the (scripted) 20 us
        assert by_key[table_key(info, 4, 8, 8)]["roofline_fraction"] == pytest.approx(
            roofline_us(info, 8, 8, 4, spec) / 20.0, rel=1e-3)
    json.dumps(result)  # what the bench writes


def test_bench_kernels_without_cuda_exits_2_and_writes_nothing(tmp_path):
    result = run_nas("bench", "kernels", "--runs-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        "nas: error: nas bench kernels times kernels on a CUDA GPU and none is available here")
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
