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


def _write_atomically(path: Path, write) -> None:
    """write(file) to a temporary name in the same folder, fsync, rename over `path`, fsync
    the folder: after a crash or power loss `path` holds the old or the new content, whole.
    A failed write (disk full) removes the temporary file and leaves `path` as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            exc.filename = str(path)  # the file the user knows of, not its temporary name
        raise
    _fsync_folder(path.parent)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line (metrics.jsonl, theta.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(_plain(record)) + "\n")


def append_csv_row(path: Path, header: list, row: list) -> None:
    """Append one row to a CSV (its header first if the file is new), on disk at once: a
    file that grows as work completes (trials.csv) and is read back after a crash."""
    import csv

    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename itself is done
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _write_atomically(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save, written atomically: a crash never leaves half a checkpoint. Serialised in
    memory first, so a full disk is the OSError it is, not an error of torch's zip writer."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    _write_atomically(path, lambda f: f.write(buf.getbuffer()))


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

    try:  # is_zipfile says False for a file it cannot open: unreadable is not corrupt
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror}); check its "
                              f"permissions, or {fix}") from None
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
    import torch

    bad = next((k for k, v in state.items() if isinstance(v, torch.Tensor)
                and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # a diverged training: every later number would be NaN
        raise CheckpointError(f"{source}: {bad} holds NaN or infinite values (its training "
                              f"diverged); retrain it, for example with a lower learning rate")
    module.load_state_dict(state)


def check_runs_dir(root: Path) -> None:
    """Refuse a --runs-dir that no run folder can be made in, before any work starts."""
    fix = "give --runs-dir a folder you can write to"
    link = next((p for p in (root, *root.parents) if p.is_symlink() and not p.exists()), None)
    if link is not None:
        raise ConfigError(f"--runs-dir {root}: {link} is a symbolic link to "
                          f"{os.readlink(link)}, which does not exist; create that folder or {fix}")
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


class _LogFile(logging.FileHandler):
    """log.txt. A line that cannot be written (disk full) is dropped without logging's
    traceback on stderr: the command's own next write fails with one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


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
                    if not (root / (name + PARTIAL)).is_dir():  # a file or a dangling link
                        raise ConfigError(f"cannot make run folder {root / (name + PARTIAL)}: "
                                          f"something on its path is not a folder; give "
                                          f"--runs-dir a folder you can write to") from None
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
        self._handler = _LogFile(self.path / "log.txt")
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
            elif issubclass(exc_type, (OSError, KeyboardInterrupt)) and not getattr(
                    exc, "__notes__", None):  # a disk full, a second Ctrl-C: say where
                exc.add_note(f"the run so far is kept in {self.path}")

    def file(self, name: str) -> Path:
        return self.path / name

    def log(self, message: str, *args: Any) -> None:
        self.logger.info(message, *args)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.file("config.yaml"), yaml.safe_dump(_plain(config), sort_keys=False))

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.file(name), json.dumps(_plain(obj), indent=2) + "\n")

    def log_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.file("metrics.jsonl"), record)

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
