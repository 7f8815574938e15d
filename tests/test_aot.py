"""The kernels compiled for the H200 (sm_90) on this CPU-only machine: every kernel and launch
variant a GPU would try compiles, and the machine code has the properties the kernels were
written for. Static facts of the compiled code; nothing here runs on a GPU."""

import json

import pytest

from nas.kernels.aot import KernelFacts
from tests.conftest import nas_in_process

pytestmark = pytest.mark.triton


def facts(**changes) -> KernelFacts:
    base = dict(kernel="k", registers=90, spill_bytes=0, shared_bytes=16384, num_warps=4,
                num_stages=3, maxnreg=None, mma=None, mma_async=False, loop_instructions=None,
                loop_divisions=None, other_instructions=100)
    return KernelFacts(**{**base, **changes})


def test_blocks_per_sm_follow_the_hopper_limits():
    # 90 registers -> 96 per thread (whole 256-register units per warp): 3072 per warp, 12288
    # per 4-warp block, 5 blocks in 65536; shared memory would allow 13.
    assert facts().blocks_per_sm == 5
    assert facts(registers=255, num_warps=8).blocks_per_sm == 1
    assert facts(registers=32, shared_bytes=100 * 1024).blocks_per_sm == 2  # 228 KB per SM
    assert facts(registers=16, shared_bytes=0, num_warps=1).blocks_per_sm == 32  # block cap
    assert facts(shared_bytes=228 * 1024).blocks_per_sm == 0  # over 227 KB: cannot launch


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One `nas bench compile` of fmnist_resnet8 at batch 1 (split-K), W8A8 and W4A4 (packed
    operands): stem
    (flattened walk and im2col), 3x3 with the padding correction, strided 1x1, linear."""
    # In this process (the compiling is a process of its own all the same): what it prints
    # and writes is under test here, not the console script.
    runs = tmp_path_factory.mktemp("runs")
    done = nas_in_process("bench", "compile", "--space", "fmnist_resnet8", "--batch", "1",
                          "--precision", "W8A8", "--precision", "W4A4", "--runs-dir", str(runs))
    assert done.returncode == 0, done.stderr
    (path,) = runs.glob("*/bench_compile.json")
    return done.stdout, json.loads(path.read_text())


def test_every_candidate_kernel_compiles_for_sm90_without_spilling(compiled):
    stdout, result = compiled
    kernels = result["kernels"]
    names = {k["kernel"] for k in kernels}
    assert {"_conv_gemm_kernel", "_im2col_kernel", "_unpack_int4_kernel",
            "_pad_image_kernel"} <= names
    assert [k for k in kernels if k["spill_bytes"]] == []
    assert all(k["blocks_per_sm"] >= 1 for k in kernels)
    uses = {(u["layer"], u["precision"]) for k in kernels for u in k["layers"]}
    assert ("layer1.0.conv1", "W4A4") in uses and ("conv1", "W8A8") in uses
    assert result["summary"]["kernels"] == len(kernels)
    assert "kernels compiled for sm_90" in stdout and "summary" in stdout


def test_gemms_run_on_int8_wgmma_and_the_tap_walk_does_not_divide(compiled):
    gemms = [k for k in compiled[1]["kernels"] if k["kernel"] == "_conv_gemm_kernel"]
    assert gemms and all(k["mma"].startswith("m64n") and k["mma"].endswith("k32.s32.s8.s8")
                         for k in gemms)
    # The tap walk steps (kh, kw, c0) with counters and the stem's kernel-row walk works its
    # columns out before the loop: no integer division per step (the count does see them:
    # the tap walk's took two per step before).
    assert all(k["loop_divisions"] == 0 for k in gemms)
    assert any(k["constants"]["ROW_K"] for k in gemms)  # the stem: 3x3 over 1 channel
    # Layers of 32 and 64 channels with blocks of twice that take two taps per step (int8
    # operands only; the 16-channel ones keep only the smallest tile, 64x32x64, at batch 1)
    pairs = [k["constants"] for k in gemms if k["constants"]["TAP_PAIRS"]]
    assert {c["BLOCK_K"] for c in pairs} == {64, 128}
    assert not any(c["X_PACKED"] or c["W_PACKED"] for c in pairs)


def test_the_padded_image_walk_loads_whole_rows(compiled):
    # The stem's kernel-row walk, per tile and precision: over the padded image (ROW_ALIGN)
    # each row loads as aligned vectors, fewer instructions per step than the masked walk's
    # byte loads (ResNet-18's stem at 128x64x32: 83 against 342, `nas bench compile`), and
    # fewer outside the loop (no padding correction).
    rows = {}
    for k in compiled[1]["kernels"]:
        c = k["constants"]
        if k["kernel"] == "_conv_gemm_kernel" and c["ROW_K"]:
            key = (c["BLOCK_M"], c["BLOCK_N"], c["W_PACKED"], c["SPLIT_K"], k["num_stages"])
            rows.setdefault(key, {})[c["ROW_ALIGN"]] = (k["loop_instructions"],
                                                        k["other_instructions"])
    pairs = [r for r in rows.values() if len(r) == 2]
    assert pairs and all(r[4][0] * 2 < r[0][0] and r[4][1] < r[0][1] for r in pairs), rows


def test_split_k_and_packed_operands_compile(compiled):
    constants = [k["constants"] for k in compiled[1]["kernels"]
                 if k["kernel"] == "_conv_gemm_kernel"]
    assert any(c["SPLIT_K"] > 1 for c in constants)
    assert any(c["X_PACKED"] and c["W_PACKED"] for c in constants)
    assert any(c["PAD_FIX"] for c in constants)
    # split-K's partial sums are added up by the epilogue kernel, its splits unrolled
    assert any(k["kernel"] == "_epilogue_kernel" and k["constants"]["SPLITS"] > 1
               for k in compiled[1]["kernels"])


def test_candidates_offer_im2col_and_the_padded_image_only_where_they_fit():
    from nas.kernels.aot import _candidates
    from nas.spaces import load_space

    stem = load_space("imagenet_resnet18").layers()[0].info  # 7x7 over 3 channels: rows of 160
    assert any(launch.im2col for launch in _candidates(stem, 64, 8, 8))
    # 2000 x 112 x 112 pixels x 160 values pass 2**31
    assert not any(launch.im2col for launch in _candidates(stem, 2000, 8, 8))
    # The padded image too: 64 images of 230 x 232 pixels of 4 bytes fit, 11000 do not.
    assert any(launch.pad_image for launch in _candidates(stem, 64, 8, 8))
    assert not any(launch.pad_image for launch in _candidates(stem, 11000, 8, 8))
    layer1 = load_space("imagenet_resnet18").layers()[1].info  # 64 channels: the tap walk
    assert not any(launch.pad_image for launch in _candidates(layer1, 64, 8, 8))


@pytest.mark.parametrize("args, message", [
    (["--precision", "W8"], "--precision 'W8': write it as W<bits>A<bits>"),
    (["--batch", "0"], "--batch 0: must be a positive whole number"),
    (["--space", "no_such_space"], "no_such_space"),
    (["--space", "fmnist_resnet8", "--precision", "W3A3"], "no integer layer choice among W3A3"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, args, message):
    done = cli("bench", "compile", *args, "--runs-dir", tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_compile_is_given_the_users_space_not_a_shipped_one_of_its_name(tmp_path, monkeypatch,
                                                                       space_file):
    from nas.cli import main
    from nas.kernels import aot

    # A .yaml reusing a shipped name, with another model: ResNet-8 at width 8, not 16.
    path = space_file({"name": "fmnist_resnet8"})
    given = []
    monkeypatch.setattr(aot, "compile_report",
                        lambda space, batch, precisions: given.append(space) or [])
    assert main(["--runs-dir", str(tmp_path / "runs"), "bench", "compile", "--space", str(path),
                 "--precision", "W8A8", "--batch", "1"]) == 0
    # What the compiling process is sent (as JSON) builds the user's layers.
    request = {"space": json.loads(json.dumps(given[0])), "batch": 1, "precisions": ["W8A8"],
               "progress": False}
    stem = next(layer for layer, *_ in aot._candidate_runs(request) if layer.name == "conv1")
    assert stem.info.out_channels == 8


# In a process compiling for sm_90 (no GPU): the autotuned launch of fmnist_resnet8's
# layer3.0.conv2 at W8A8, batch 1, split in two -- the path `nas measure` takes -- compiling
# every tile the autotuner keeps and the epilogue kernel; prints the kernels' hashes.
AUTOTUNED_COMPILE = """
import json, sys
import torch
from nas.cost.measure import make_case
from nas.kernels.aot import _compile_instead_of_launch
from nas.kernels.configs import Launch
from nas.spaces import load_space

compiled = []
_compile_instead_of_launch(lambda k: compiled.extend(k if isinstance(k, list) else [k]))
layer = {l.name: l for l in load_space("fmnist_resnet8").layers()}["layer3.0.conv2"]
make_case(layer.info, 1, 8, 8, torch.device("cpu"), torch.Generator().manual_seed(0),
          launch=Launch(2)).run()
print(json.dumps(sorted({k.hash for k in compiled})))
"""


def two_layer_space(tmp_path):
    """fmnist_resnet8 with only the two layers the assertions below look at, the stem and
    layer3.0.conv2: fewer kernels to compile than the whole space has (each takes seconds)."""
    import yaml

    from nas.spaces import load_space

    raw = {**load_space("fmnist_resnet8").to_dict(), "name": "fmnist_resnet8_two_layers",
           "searchable": ["layer3.0.conv2"], "fixed": {"conv1": {"w_bits": 8, "a_bits": 8}}}
    path = tmp_path / "two_layers.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_compiling_ahead_fills_the_cache_autotuning_reads(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from nas.kernels.aot import compile_report, warm_cache
    from nas.kernels.conv_kernels import AOT_ENV

    space = two_layer_space(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    kernels = warm_cache(space, 1, 2, device="cpu", precisions=["W8A8"])
    cubins = sorted(p.parent.name for p in cache.rglob("*.cubin"))
    report = compile_report(space, 1, ["W8A8"])
    # Two processes, each its share: together every kernel the one-process report compiles,
    # each once (the report then compiled nothing new).
    assert kernels == len(report) == len(cubins) > 10
    assert sorted(p.parent.name for p in cache.rglob("*.cubin")) == cubins
    env = {**os.environ, AOT_ENV: "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", AUTOTUNED_COMPILE], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    tuned = json.loads(done.stdout)
    # The autotuner compiles the same kernels warm_cache made (its four tiles that fit the
    # layer, 64x64x128 taking taps in pairs, and the split's epilogue): every one is already
    # in the cache, nothing new was written.
    assert len(tuned) == 5
    assert sorted(p.parent.name for p in cache.rglob("*.cubin")) == cubins
    # Named layers only, each padded one on a bordered input too (`nas bench kernels` times
    # both): the stem's kernels, as the report lists them for it (all in the cache already),
    # and kernels without the padding correction besides (the only new ones). warm_cache
    # counts the kernels its launches compile, whether or not the cache had them.
    stem = sum(any(u["layer"] == "conv1" for u in k["layers"]) for k in report)
    bordered = warm_cache(space, 1, 1, device="cpu", precisions=["W8A8"], layers=["conv1"],
                          prepadded=True)
    new = len(list(cache.rglob("*.cubin"))) - len(cubins)
    assert bordered - new == stem > 3 and new > 0


@pytest.mark.parametrize("command", [["measure", "--space", "fmnist_resnet8"],
                                     ["bench", "kernels"]])
def test_compile_jobs_must_not_be_negative(command, cli, tmp_path):
    done = cli("--runs-dir", tmp_path, *command, "--compile-jobs", "-1")
    assert done.returncode == 2
    assert done.stderr.strip() == ("nas: error: --compile-jobs -1: give a number of processes, "
                                   "or 0 to compile as timing goes")
    assert list(tmp_path.iterdir()) == []
