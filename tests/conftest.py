import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

# CI replays the same examples every run; locally each run explores new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from nas.data import FASHION_MNIST_DIR

# The tests (and the `nas` subprocesses they start) keep the geometry cache to themselves.
if "NAS_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["NAS_CACHE_DIR"] = tempfile.mkdtemp(prefix="nas-test-cache-")

FMNIST = Path(os.environ.get("NAS_DATA_DIR", FASHION_MNIST_DIR))
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FMNIST} (make data)")

SYNTHETIC_SPACE = {
    "name": "synthetic_resnet8",
    "model": {"name": "resnet8", "kwargs": {"width": 8}},
    "data": {"name": "synthetic",
             "kwargs": {"train_size": 640, "test_size": 256, "image_size": 12, "noise": 0.8}},
    "fixed": {"conv1": {"w_bits": 8, "a_bits": 8}, "fc": {"w_bits": 8, "a_bits": 8}},
    "train": {"budget": "2ep", "batch_size": 64, "lr": 0.05},
}


@pytest.fixture
def space_file(tmp_path):
    """Write a search-space YAML (the synthetic one, optionally changed) and return its path."""

    def write(changes: dict | None = None, name: str = "space.yaml") -> Path:
        raw = {**SYNTHETIC_SPACE, **(changes or {})}
        raw = {k: v for k, v in raw.items() if v is not None}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture(scope="session")
def synthetic_space():
    """The synthetic space (SYNTHETIC_SPACE) loaded; shared, so no test may change it."""
    from nas.spaces import SearchSpace

    return SearchSpace.from_dict(SYNTHETIC_SPACE)


@pytest.fixture(scope="session")
def synthetic_data():
    """The synthetic space's data, seed 0 (train, arch and test splits); shared, so no test
    may change it."""
    from nas.data import load_data

    return load_data("synthetic", seed=0, **SYNTHETIC_SPACE["data"]["kwargs"])


NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # env for a `nas` subprocess that sees no GPU, anywhere


@pytest.fixture
def no_cuda(monkeypatch):
    """In this process, CUDA is not available, even on a machine with a GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@dataclass
class Ran:
    """What one `nas` command did, named as subprocess.CompletedProcess names it."""
    returncode: int
    stdout: str
    stderr: str


# A user's Python shows these only for code run as __main__, which `nas` never is.
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@contextlib.contextmanager
def _process_state_kept():
    """Put back what a `nas` command may change in this process: environment, working
    folder, random generators, torch threads, signal handlers, a Ray it started."""
    import numpy as np
    import torch

    ray = sys.modules.get("ray")
    ray_before = ray is not None and ray.is_initialized()
    environ, cwd = dict(os.environ), os.getcwd()
    rngs = random.getstate(), np.random.get_state(), torch.get_rng_state()
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and not ray_before:
            ray.shutdown()  # a command that started Ray in this process
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.set_rng_state(rngs[2])
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _run_main(args, env: dict | None) -> tuple[int, str]:
    """`sys.exit(main(args))` as the console script does: (exit code, the warnings a user
    would see, as stderr lines)."""
    from nas.cli import main

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: a usage error, --help, --version
            code = exc.code
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                    for w in caught if not issubclass(w.category, _HIDDEN_WARNINGS))
    return 0 if code is None else code, shown


@pytest.fixture
def cli(capsys):
    """Run `nas ARGS` in this process as the console script does: its exit code, stdout and
    stderr. A warning a user would see is a line of its stderr, as in a subprocess. What a
    command may change in the process is put back after the test."""

    def run(*args: str, env: dict | None = None) -> Ran:
        """`env`: variables set for this command only, as for a subprocess."""
        capsys.readouterr()  # only this command's output
        code, shown = _run_main(args, env)
        out = capsys.readouterr()
        return Ran(code, out.out, out.err + shown)

    with _process_state_kept():
        yield run


def nas_in_process(*args: str) -> Ran:
    """`nas ARGS` in this process, for fixtures shared by several tests (where `cli`, being
    per test, cannot serve): its exit code and output; the process state is put back."""
    out, err = io.StringIO(), io.StringIO()
    with _process_state_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code, shown = _run_main(args, None)
    return Ran(code, out.getvalue(), err.getvalue() + shown)


def run_nas(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run the real `nas` command in a subprocess, as a user would (for what only a real
    process shows: the console script, its exit status, a closed pipe, a signal)."""
    return subprocess.run([sys.executable, "-m", "nas", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


def _one_run(root: Path, command: str, *args: str) -> tuple[Path, Path]:
    """Run `nas COMMAND` once on the synthetic space under `root`: (space yaml, run folder)."""
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(SYNTHETIC_SPACE))
    runs = root / "runs"
    result = nas_in_process("--runs-dir", str(runs), command, "--space", str(space), *args,
                            "--no-progress")
    assert result.returncode == 0, result.stderr
    (folder,) = runs.iterdir()
    return space, folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One short `nas train` on synthetic data, shared: (space yaml, checkpoint)."""
    space, folder = _one_run(tmp_path_factory.mktemp("trained"), "train", "--budget", "2ep")
    return space, folder / "best.pt"


@pytest.fixture(scope="session")
def ray_address():
    """One Ray instance for the whole test session, in this process (searches run in process
    use it; `nas` subprocesses attach to it with --ray-address): its GCS address."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def supernet_run(tmp_path_factory):
    """A one-epoch DNAS run of the synthetic space: (space yaml, run folder with supernet.pt)."""
    return _one_run(tmp_path_factory.mktemp("supernet"), "search", "--budget", "1ep",
                    "--samples", "0")
