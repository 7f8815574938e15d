"""`nas measure` on the CPU: its errors, and everything but the GPU clock (the Triton
interpreter runs the kernels; a fake or wall-clock timer stands in for CUDA graphs)."""

import json
import os

import pytest
import torch

from nas.cost.device_spec import DeviceSpec
from nas.cost.latency import LatencyCost
from nas.cost.measure import layer_cases, measure, provenance, table_document, validate
from nas.cost.tables import LatencyTable, table_key
from nas.errors import ConfigError
from nas.kernels.timing import CudaGraphTimer, WallTimer, calls_per_graph
from nas.plan import LayerPrecision
from nas.spaces import SearchSpace
from nas.stats import kendall_tau
from tests.conftest import SYNTHETIC_SPACE

TINY = {**SYNTHETIC_SPACE, "searchable": ["layer1.0.conv1"],
        "choices": {"w_bits": [4, 8], "a_bits": [8]}}


def test_measure_without_cuda_exits_2_and_writes_nothing(cli, no_cuda, tmp_path):
    out = tmp_path / "table.json"
    result = cli("measure", "--output", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "nas: error: nas measure times kernels on a CUDA GPU and none is available here "
        "(torch.cuda.is_available() is False); run it on a machine with one")
    assert "Traceback" not in result.stderr and not out.exists()


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # 6 pairs: 5 concordant, 1 discordant -> (5 - 1) / 6.
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)


@pytest.fixture(scope="module")
def tiny_cases():
    space = SearchSpace.from_dict(TINY)
    return space, layer_cases(space, 1, torch.device("cpu"))


def test_one_case_per_layer_geometry_and_precision(tiny_cases):
    space, cases = tiny_cases
    expected = {table_key(layer.info, 1, c.w_bits, c.a_bits)
                for layer in space.layers() for c in layer.choices}
    assert sorted(c.key for c in cases) == sorted(expected)
    assert any(c.w_bits == 4 for c in cases)  # the searchable layer's W4A8 branch
    # A case's launch runs the Triton kernel into its preallocated output: NHWC fp16.
    case = next(c for c in cases if c.w_bits == 4)
    out = case.run()
    ho, wo = case.info.out_hw
    assert out.shape == (1, ho, wo, case.info.out_channels) and out.dtype == torch.float16
    assert case.run() is out  # the same buffer every launch: nothing allocated per call


def test_table_written_by_measure_is_read_by_the_latency_cost(tiny_cases, tmp_path):
    space, cases = tiny_cases
    spec = DeviceSpec.load("h200")
    entries = measure(cases[:2], 1, WallTimer(reps=1), spec, say=lambda s: None)
    assert [e["key"] for e in entries] == [c.key for c in cases[:2]]
    for e in entries:
        assert e["us"] > 0 and e["fp16_cudnn_us"] > 0
        assert e["speedup_vs_fp16"] == pytest.approx(e["fp16_cudnn_us"] / e["us"], rel=1e-2)
    prov = provenance(torch.device("cpu"), spec, 1, WallTimer(reps=1).method)
    assert prov["device"].endswith("not a GPU") and prov["device_spec"] == "h200"
    (tmp_path / "t.json").write_text(json.dumps(table_document(entries, prov)))
    table = LatencyTable.load_dir("h200", tmp_path)
    assert table.entries == {e["key"]: e["us"] for e in entries}
    assert table.stale(["t.json"]) == []  # measured with this checkout's kernels
    cost = LatencyCost(spec, batch=1, table=table)
    case = cases[0]
    prec = LayerPrecision(case.w_bits, case.a_bits)
    assert cost.layer_cost(case.info, prec) == entries[0]["us"]
    assert not cost.is_estimated(case.info, prec)


def test_validate_compares_table_sums_with_end_to_end_times(tiny_cases):
    space, cases = tiny_cases
    layers = space.layers()
    table = {c.key: 10.0 for c in cases}
    plans = [{layer.name: layer.choices[i % len(layer.choices)] for layer in layers}
             for i in range(2)]
    # A fake clock: 40 us for any network. The table predicts 10 us per layer.
    result = validate(space, plans, table, 1, torch.device("cpu"), lambda fn: (fn(), 40.0)[1],
                      say=lambda s: None)
    n = len(layers)
    assert [r["predicted_us"] for r in result["plans"]] == [10.0 * n] * 2
    assert result["mape_percent"] == pytest.approx(abs(10.0 * n - 40) / 40 * 100)
    # Two passes, the second in reverse order: a clock reading 40, 44 (first pass), then 46
    # (plan 2), 42 (plan 1) times plan 1 at 40 and 42, plan 2 at 44 and 46.
    readings = iter([40.0, 44.0, 46.0, 42.0])
    result = validate(space, plans, table, 1, torch.device("cpu"),
                      lambda fn: (fn(), next(readings))[1], say=lambda s: None)
    assert [r["passes_us"] for r in result["plans"]] == [[40.0, 42.0], [44.0, 46.0]]
    assert [r["measured_us"] for r in result["plans"]] == [41.0, 45.0]
    assert result["passes_kendall_tau"] == 1.0
    assert result["passes_difference_percent"] == pytest.approx((2 / 41 + 2 / 45) / 2 * 100,
                                                                abs=0.005)
    assert result["plans_range_percent"] == pytest.approx(4 / 41 * 100, abs=0.005)
    first = plans[0][layers[0].name]
    key = table_key(layers[0].info, 1, first.w_bits, first.a_bits)
    with pytest.raises(ConfigError, match=f"the latency table has no entry for {key}; measure "
                                          "the space at batch 1 first"):
        validate(space, plans[:1], {}, 1, torch.device("cpu"), lambda fn: 1.0, say=lambda s: None)


def test_calls_per_graph_reach_the_minimum_replay_time():
    assert calls_per_graph(9.0, 100.0, 20) == 12    # short kernels: 12 x 9 us >= 100 us
    assert calls_per_graph(3.0, 100.0, 20) == 20    # capped
    assert calls_per_graph(250.0, 100.0, 20) == 1   # long enough alone
    assert calls_per_graph(0.0, 100.0, 20) == 20    # a zero reading cannot divide by zero


class ScriptedGraphs(CudaGraphTimer):
    """Replays of a graph of `calls` calls take `launch` + 3 us per call (no GPU)."""

    def __init__(self, launch: float, **kwargs):
        super().__init__(**kwargs)
        self.launch, self.graphs = launch, []

    def _replay_us(self, fn, calls, reps):
        self.graphs.append(calls)
        return self.launch + 3.0 * calls


def test_marginal_timing_leaves_the_graph_launch_out():
    # A 3 us call: 12 calls per graph reach 100 us (the one-call probe reads 3 + 6 us).
    plain = ScriptedGraphs(6.0)
    assert plain._per_call_us(None) == pytest.approx(3.5) and plain.graphs == [1, 12]
    marginal = ScriptedGraphs(6.0, marginal=True)
    assert marginal._per_call_us(None) == pytest.approx(3.0) and marginal.graphs == [1, 12, 24]
    assert "(median replay of 2N calls - median replay of N calls) / N" in marginal.method
    assert "divided by the calls per graph" in plain.method
    # Noise that leaves the longer graph no slower: the plain per-call time stands.
    noisy = ScriptedGraphs(6.0, marginal=True)
    noisy._replay_us = lambda fn, calls, reps: 9.0 if calls == 1 else 42.0
    assert noisy._per_call_us(None) == pytest.approx(3.5)


def test_timing_is_replay_or_marginal(cli, tmp_path):
    done = cli("measure", "--timing", "median", "--runs-dir", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--timing: invalid choice: 'median' (choose from" in done.stderr



def test_validations_of_each_plan_mix(tiny_cases):
    from nas.cost.measure import validations
    from nas.spaces import random_plans

    space, cases = tiny_cases
    table = {c.key: 10.0 + 2 ** i for i, c in enumerate(cases)}  # every plan its own sum
    clock = lambda fn: (fn(), 40.0)[1]  # noqa: E731
    done = list(validations(space, table, 1, torch.device("cpu"), clock,
                            {"uniform": 2, "mixed": 3}, seed=5, say=lambda s: None))
    assert [(field, r["plan_mix"], len(r["plans"])) for field, r in done] == [
        ("validation", "uniform", 2), ("validation_mixed", "mixed", 3)]
    # The plans timed are random_plans' with the run's seed: their table sums say which.
    for (_, result), mix in zip(done, ("uniform", "mixed")):
        sums = [sum(table[table_key(layer.info, 1, p[layer.name].w_bits, p[layer.name].a_bits)]
                    for layer in space.layers()) for p in random_plans(space, 3, 5, mix)]
        assert [r["predicted_us"] for r in result["plans"]] == sums[:len(result["plans"])]
    assert list(validations(space, table, 1, torch.device("cpu"), clock, {"uniform": 0},
                            say=lambda s: None)) == []


def test_validate_mixed_counts_are_checked(cli, tmp_path):
    done = cli("measure", "--validate-mixed", "-3", "--runs-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == "nas: error: --validate-mixed -3: give a number of plans, 0 or more"


@pytest.mark.parametrize("args, message", [
    (["--reps", "0"], "--reps 0: must be a positive whole number"),
    (["--batch", "-1"], "--batch -1: must be a positive whole number"),
    (["--validate", "1"], "--validate 1: give 2 or more plans (Kendall's tau ranks pairs), or 0 "
                          "for none"),
    (["--compile-jobs", "-1"], "--compile-jobs -1: give a number of processes, or 0 to compile "
                               "as timing goes"),
    (["--output", "{tmp}"], "--output {tmp} is a directory; give a file path, such as "
                            "{tmp}/table.json"),
    (["--output", "{tmp}/f/t.json"], "--output {tmp}/f/t.json: {tmp}/f is a file, not a "
                                     "folder; give another path"),
])
def test_measure_refuses_bad_flags_before_it_needs_a_gpu(tmp_path, capsys, no_cuda, args,
                                                         message):
    # Without CUDA the command stops at the GPU check: these errors coming out instead
    # show they are checked before it, and so before any compiling and timing on a GPU.
    from nas.cli import main

    (tmp_path / "f").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["--runs-dir", str(tmp_path / "runs"), "measure", *argv]) == 2
    out = capsys.readouterr()
    assert out.err == f"nas: error: {message.replace('{tmp}', str(tmp_path))}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # nothing written


def test_measure_output_in_a_folder_still_to_make_passes_the_checks(tmp_path, capsys, no_cuda):
    # The folder is made when the table is written; here the run stops at the GPU check.
    from nas.cli import main

    assert main(["measure", "--output", str(tmp_path / "new" / "t.json")]) == 2
    assert capsys.readouterr().err.startswith("nas: error: nas measure times kernels on a CUDA")
    assert list(tmp_path.iterdir()) == []


def test_measure_refuses_an_output_folder_it_cannot_write(tmp_path, capsys, monkeypatch,
                                                         no_cuda):
    # Root may write in any folder, so a chmod alone proves nothing where the tests run as
    # root: the permission check itself answers "no" for this one folder.
    from nas.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    asked = []

    def no_write_in_locked(path, mode, *args, **kwargs):
        if os.path.abspath(path) == str(locked) and mode & os.W_OK:
            asked.append(path)
            return False
        return access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", no_write_in_locked)
    assert main(["measure", "--output", str(locked / "t.json")]) == 2
    assert capsys.readouterr().err == (f"nas: error: --output {locked / 't.json'}: folder "
                                       f"{locked} is not writable; give another path\n")
    assert asked and list(locked.iterdir()) == []
