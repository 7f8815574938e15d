"""The text files users write and edit (search spaces, plans, device specs): each way one can
fail to read gives one line that names the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nas.errors import ConfigError


def read_text(path: Path, what: str, directory_fix: str, utf8_fix: str) -> str:
    """The file's UTF-8 text. `what` names it in messages ("plan p.yaml"); the fixes say what
    to give instead of a directory and of text that is not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"{what} is a directory; {directory_fix}")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} is not UTF-8 text (byte {exc.start}); {utf8_fix}") from exc


def parse_yaml(text: str, what: str) -> Any:
    """YAML, or one line with where it breaks and why."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from exc
