"""`nas search --method dnas --workers N`: DNAS data-parallel on Ray Train workers."""

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests.conftest import SYNTHETIC_SPACE, nas_in_process


def plain_net(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """No BatchNorm: what a layer computes does not depend on how the batch is split."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


# Float activations: a quantizer's input range (the min and max of a worker's share of the
# batch) is then never used, so one worker and two compute the same maths; only the order
# of floating-point sums differs. Weight precisions are searched (and the Gumbel noise picks
# them), so theta steps and hard-mode weight steps both run.
EXACT_SPACE = {
    "name": "plain_float_acts",
    "model": {"name": "tests.test_dnas_train:plain_net"},
    "data": SYNTHETIC_SPACE["data"],
    "choices": ["W2A32", "W4A32", "W8A32"],
    "train": SYNTHETIC_SPACE["train"],
}
SEARCH = ("--budget", "2ep", "--batch-size", "64", "--warmup", "0", "--samples", "0",
          "--target", "size=2KB", "--no-progress")
# float32 sums in another order (two half-batch means averaged by gloo instead of one mean)
# differ by ~1e-7 relative per step; over the run's steps they stay far below this.
TOLERANCE = 1e-5


def _nas(*args: str) -> None:
    """`nas ARGS` in this process, which must succeed."""
    result = nas_in_process(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def _search(root: Path, space: dict, *args: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    runs = root / "runs"
    _nas("--runs-dir", runs, "search", "--space", path, *args)
    (folder,) = runs.iterdir()
    return folder


def _resume(folder: Path, *args: str) -> Path:
    runs = folder.parent
    before = set(runs.iterdir())
    _nas("--runs-dir", runs, "search", "--resume", folder, *args)
    (new,) = set(runs.iterdir()) - before
    return new


def _supernet(folder: Path) -> dict[str, torch.Tensor]:
    """Weights and theta (buffers left out: the input ranges are each worker's own)."""
    payload = torch.load(folder / "supernet.pt", weights_only=True)
    state = payload["supernet"]
    return {k: v for k, v in state.items()
            if not k.endswith(("act_lo", "act_hi", "act_seen"))}


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=TOLERANCE), \
            f"{k}: differs by {(a[k] - b[k]).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, ray_address):
    """The same search, one worker in process and two on the session's Ray (both started
    from this process): run folders."""
    root = tmp_path_factory.mktemp("dnas_train")
    one = _search(root / "one", EXACT_SPACE, *SEARCH)
    two = _search(root / "two", EXACT_SPACE, *SEARCH, "--workers", "2",
                  "--ray-address", ray_address)
    return one, two


@pytest.mark.slow
def test_two_workers_reach_one_workers_theta_and_weights(one_and_two):
    one, two = one_and_two
    a, b = _supernet(one), _supernet(two)
    assert any(k.endswith(".theta") for k in a)
    _close(a, b)
    # The input ranges (unused: activations are float) are rank 0's share's, not the whole
    # batch's as with one worker: each worker did step on its half.
    r1, r2 = (torch.load(f / "supernet.pt", weights_only=True)["supernet"] for f in (one, two))
    assert not torch.equal(r1["net.0.act_hi"], r2["net.0.act_hi"])
    theta_moved = max(a[k].abs().max().item()
                      for k in a if k.endswith(".theta"))
    assert theta_moved > 100 * TOLERANCE  # the comparison is of a theta that was trained
    s1, s2 = (json.loads((f / "summary.json").read_text()) for f in (one, two))
    assert s1["steps"] == s2["steps"] == 2 * 8  # 2 epochs of 512 train images, batch 64
    assert (s1["workers"], s2["workers"]) == (1, 2)
    # The log is the one worker's: the steps, tau and the losses of the global batch.
    l1, l2 = ([json.loads(line) for line in (f / "theta.jsonl").read_text().splitlines()]
              for f in (one, two))
    assert [e["step"] for e in l1] == [e["step"] for e in l2]
    for e1, e2 in zip(l1, l2):
        assert e1["tau"] == e2["tau"]
        for key in ("train_ce", "arch_ce", "expected_cost"):
            # relative too: the expected size is in bytes (~1e3)
            assert e1[key] == pytest.approx(e2[key], rel=TOLERANCE, abs=TOLERANCE), key
    assert (two / "ray.log").exists() and not (one / "ray.log").exists()


@pytest.mark.slow
def test_resume_a_two_worker_run_with_one_worker(one_and_two):
    """A two-worker run's supernet.pt goes on with one worker exactly as a one-worker run's."""
    one, two = one_and_two
    resumed = {f: _resume(f, "--budget", "3ep", "--no-progress") for f in (one, two)}
    for f in resumed.values():
        summary = json.loads((f / "summary.json").read_text())
        assert summary["steps"] == 3 * 8 and summary["workers"] == 1
    _close(_supernet(resumed[one]), _supernet(resumed[two]))


def test_gpu_workers_fold_with_their_sync_batchnorm():
    """On GPUs the BNs become SyncBatchNorm; each layer must then quantize with the folding
    factor of the module that replaced its BN, and supernet.pt keeps its keys."""
    from nas.search.dnas_parallel import _sync_batchnorm
    from nas.spaces import SearchSpace
    from nas.supernet import Supernet

    space = SearchSpace.from_dict(SYNTHETIC_SPACE, source="test")
    net = Supernet(space.build_model(), space)
    keys = list(net.state_dict())
    folded = [m for m in net.mixed() if m.folded_bn is not None]
    assert folded
    _sync_batchnorm(net)
    modules = {id(m) for m in net.modules()}
    for m in folded:
        assert isinstance(m.folded_bn, nn.SyncBatchNorm) and id(m.folded_bn) in modules
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert list(net.state_dict()) == keys


@pytest.mark.parametrize("args, message", [
    (("--workers", "0"), "--workers 0: must be a positive whole number"),
    (("--workers", "2", "--batch-size", "63"),
     "--batch-size 63 does not split evenly among 2 workers; give a batch size that is a "
     "multiple of --workers"),
    (("--cpus-per-worker", "2",),
     "--cpus-per-worker places Ray workers, and one worker runs in this process without Ray; "
     "give --workers 2 or more, or drop it"),
    (("--method", "random", "--gpus-per-worker", "1"),
     "--gpus-per-worker applies to --method dnas only; drop it for --method random"),
])
def test_bad_worker_flags(cli, space_file, tmp_path, args, message):
    runs = tmp_path / "runs"
    result = cli("--runs-dir", runs, "search", "--space", space_file(), *args)
    assert result.returncode == 2
    assert result.stderr == f"nas: error: {message}\n"
    assert not runs.exists()


@pytest.mark.parametrize("args, message", [
    (("--workers", "2", "--gpus-per-worker", "1"),
     "--gpus-per-worker 1: the Ray cluster has no GPU; leave --gpus-per-worker out to run on "
     "CPUs"),
    (("--workers", "4"),
     "--workers 4: the Ray cluster (1 node, 2 CPUs) can place only 2 workers of 1 CPU; give "
     "--workers 2 or fewer, or smaller --cpus-per-worker"),
    (("--workers", "2", "--cpus-per-worker", "2"),
     "--workers 2: the Ray cluster (1 node, 2 CPUs) can place only 1 worker of 2 CPUs; give "
     "--workers 1 or fewer, or smaller --cpus-per-worker"),
])
def test_workers_the_cluster_cannot_place(cli, space_file, tmp_path, ray_address, args,
                                          message):
    runs = tmp_path / "runs"
    started = time.monotonic()
    result = cli("--runs-dir", runs, "search", "--space", space_file(), "--ray-address",
                 ray_address, "--no-progress", *args)
    assert time.monotonic() - started < 60  # one line, not Ray waiting for resources
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"nas: error: {message}\n"
    assert list(runs.iterdir()) == []  # the run folder made for it is gone again


@pytest.mark.slow
def test_workers_a_busy_cluster_cannot_start(cli, space_file, tmp_path, ray_address):
    """The cluster could hold both workers, but one of its 2 CPUs is taken: one line once
    the workers' start timeout (Ray Train's variable, set short here; 20 s by default) has
    passed, not a wait for the CPU to come free."""
    import ray

    from nas.search.dnas_train import START_TIMEOUT_ENV

    @ray.remote(num_cpus=1)
    class Busy:
        def ping(self):
            return 1

    busy = Busy.remote()
    ray.get(busy.ping.remote(), timeout=60)
    runs = tmp_path / "runs"
    try:
        started = time.monotonic()
        result = cli("--runs-dir", runs, "search", "--space", space_file(), "--ray-address",
                     ray_address, "--no-progress", "--workers", "2",
                     env={START_TIMEOUT_ENV: "3"})
        seconds = time.monotonic() - started
    finally:
        ray.kill(busy)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "nas: error: --workers 2: Ray could not start 2 workers of 1 CPU within 3 s: the "
        "cluster's resources are taken by other work; try again later or give fewer "
        "--workers\n")
    assert seconds < 60
    assert list(runs.iterdir()) == []


@pytest.mark.slow
def test_bench_dnas_scaling_table(cli, space_file, tmp_path, ray_address):
    """The benchmark's scaling rows come from real runs (speed itself is not asserted); its
    workers run on the session's Ray."""
    runs = tmp_path / "runs"
    result = cli("--runs-dir", runs, "bench", "dnas", "--space", space_file(), "--scaling-only",
                 "--workers", "2", "--scaling-steps", "3", "--batch-size", "64")
    assert result.returncode == 0, result.stderr
    (folder,) = runs.iterdir()
    data = json.loads((folder / "bench_dnas.json").read_text())["scaling"]
    one, two = data["rows"]
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["steps"] == two["steps"] == 3
    assert two["allreduce_s"] > 0 and two["broadcast_s"] > 0
    # The all-reduced values: every weight and theta of the synthetic space's supernet.
    from nas.spaces import load_space
    from nas.supernet import Supernet

    space = load_space(str(space_file()))
    net = Supernet(space.build_model(), space)
    assert two["gradient_values"] == sum(p.numel() for p in net.parameters())
    assert two["speedup"] == pytest.approx(two["steps_per_s"] / one["steps_per_s"])
    assert "Data-parallel scaling (global batch 64, 3 steps" in result.stdout
