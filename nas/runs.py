"""Run folders: one per command, `runs/<UTC timestamp>-<space>-<command>/`.

A folder is written as `<name>.partial/` and renamed when the command finishes, so a folder
without the suffix is always complete. Every file inside is written to a temporary name and
renamed, so an interrupted write never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from nas.errors import CheckpointError, ConfigError

PARTIAL = ".partial"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves half a checkpoint."""
    import torch

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, keys: tuple[str, ...] = ("state_dict", "space"),
                    fix: str = "pass the best.pt of a 'nas train' run folder",
                    expect: dict[str, str] | None = None) -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint is tensors and plain data, never code.

    `keys` must be present and the entries in `expect` have the values given there (format
    and kind: another nas file has the keys too); `fix` tells the user what to pass instead.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file; {fix}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {fix}")
    import zipfile

    if not zipfile.is_zipfile(path):  # what torch.save writes; torch's own error would advise
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint (a zip file); it is "
                              f"corrupt or not a nas checkpoint; {fix}")  # weights_only=False
    try:
        with warnings.catch_warnings():  # torch warns on odd files: the error says it in one line
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file can fail anywhere in unpickling
        first = _load_error(exc)
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({first}); it is corrupt or "
                              f"not a nas checkpoint; {fix}") from exc
    expect = expect or {}
    wrong = [k for k, v in expect.items() if isinstance(payload, dict) and "format" in payload
             and payload.get(k) != v]
    if wrong:  # a nas file of another kind, or of a format this version does not read
        k = wrong[0]
        raise CheckpointError(f"checkpoint {path} has {k} {payload.get(k)!r} where "
                              f"{expect[k]!r} is expected; {fix}")
    if not isinstance(payload, dict) or any(k not in payload for k in (*keys, *expect)):
        raise CheckpointError(f"checkpoint {path} is not a nas checkpoint (no "
                              f"{'/'.join((*keys, *expect))}); {fix}")
    return payload


def _load_error(exc: Exception) -> str:
    """What torch.load's error says is wrong, without its advice to load with
    weights_only=False (which would run the file's code)."""
    text = str(exc).strip()
    _, marker, after = text.partition("WeightsUnpickler error:")
    if marker:
        reason = after.strip().splitlines()[0] if after.strip() else "unreadable"
        match = re.match(r"Unsupported global: GLOBAL (\S+)", reason)
        if match:
            return f"it holds a Python object, {match.group(1)}, not only tensors and plain data"
        return _first_sentence(reason)
    if text.startswith("Weights only load failed"):
        return "torch cannot read it as tensors and plain data"
    return _first_sentence(text.splitlines()[0]) if text else type(exc).__name__


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[a-z0-9])\. ", text)[0]


def load_state(module, state: dict[str, Any], source: str, target: str) -> None:
    """module.load_state_dict(state), refused first with one line naming the first key the
    two lack or disagree on (torch's own error lists them all, over many lines). `source`
    and `target` name the two for the message."""
    own = module.state_dict()
    problem = next((f"it lacks {k}" for k in own if k not in state), None)
    problem = problem or next((f"it has {k}, which the model lacks" for k in state
                               if k not in own), None)
    problem = problem or next((f"{k} is {tuple(state[k].shape)} in it but "
                               f"{tuple(own[k].shape)} in the model" for k in own
                               if hasattr(state[k], "shape") and state[k].shape != own[k].shape),
                              None)
    if problem:
        raise CheckpointError(f"{source} does not fit {target}: {problem}")
    module.load_state_dict(state)


def check_runs_dir(root: Path) -> None:
    """Refuse a --runs-dir that no run folder can be made in, before any work starts."""
    fix = "give --runs-dir a folder you can write to"
    if root.exists():
        if not root.is_dir():
            raise ConfigError(f"--runs-dir {root} is a file, not a folder; {fix}")
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(f"--runs-dir {root} is not writable; {fix}")
        return
    parent = next(p for p in root.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"--runs-dir {root} cannot be made: {parent} is a file; {fix}")
    try:  # root may write anywhere by os.access, yet /proc refuses it: try a real folder
        os.rmdir(tempfile.mkdtemp(prefix=".nas-probe-", dir=parent))
    except OSError as exc:
        raise ConfigError(f"--runs-dir {root} cannot be made in {parent} ({exc.strerror}); "
                          f"{fix}") from None


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _plain(value: Any) -> Any:
    """Make tuples and numpy/torch scalars safe for yaml.safe_dump and json."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# What a run folder holds before its command has made anything (ray.log: what Ray printed
# while it started).
_SET_UP = {"config.yaml", "log.txt", "ray.log"}


class RunDir:
    """One command's output folder. Use as a context manager around the command's work."""

    def __init__(self, runs_dir: str | Path, space: str, command: str):
        root = Path(runs_dir)
        base = f"{utc_stamp()}-{Path(space).stem}-{command}"
        name, n = base, 1
        while True:
            if not (root / name).exists():
                try:  # another run started in the same second may take the name first
                    (root / (name + PARTIAL)).mkdir(parents=True)
                    break
                except FileExistsError:
                    pass
                except OSError as exc:  # the CLI checked root; this it could not foresee
                    raise ConfigError(f"cannot make run folder {root / (name + PARTIAL)} "
                                      f"({exc.strerror}); give --runs-dir a folder you can "
                                      f"write to") from None
            n += 1
            name = f"{base}-{n}"
        self.final = root / name
        self.path = root / (name + PARTIAL)
        self.logger = logging.getLogger(f"nas.run.{name}")
        self.logger.setLevel(logging.INFO)
        self._handler = logging.FileHandler(self.path / "log.txt")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger.addHandler(self._handler)
        self.logger.propagate = False
        self.finished = False

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from nas.errors import NasError

        if exc_type is None and not self.finished:
            self.finish({})
        elif exc_type is not None and not self.finished:
            self.logger.error("stopped: %s: %s", exc_type.__name__, exc)
            self._close_log()
            if issubclass(exc_type, NasError):
                made = [p for p in self.path.iterdir() if p.name not in _SET_UP]
                if not made:
                    shutil.rmtree(self.path, ignore_errors=True)  # bad input: nothing behind
                else:  # found mid-run (an unreadable image): keep checkpoints and metrics
                    exc.args = (f"{exc} (the run so far is kept in {self.path})",)

    def file(self, name: str) -> Path:
        return self.path / name

    def log(self, message: str, *args: Any) -> None:
        self.logger.info(message, *args)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.file("config.yaml"), yaml.safe_dump(_plain(config), sort_keys=False))

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.file(name), json.dumps(_plain(obj), indent=2) + "\n")

    def log_metrics(self, record: dict[str, Any]) -> None:
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(_plain(record)) + "\n")

    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.file(name)
        save_checkpoint(path, payload)
        return path

    def finish(self, summary: dict[str, Any]) -> Path:
        """Write summary.json and rename the folder to its final name."""
        self.write_json("summary.json", summary)
        self.log("finished")
        self._close_log()
        os.replace(self.path, self.final)
        self.path = self.final
        self.finished = True
        return self.final

    def _close_log(self) -> None:
        self.logger.removeHandler(self._handler)
        self._handler.close()
