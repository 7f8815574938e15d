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


# A space or plan has hundreds of values; nested aliases ("billion laughs") stand for 10^9
# in a kilobyte, which every later walk over the data (checks, hashing, copies) would visit.
MAX_YAML_NODES = 100_000


def parse_yaml(text: str, what: str) -> Any:
    """YAML, or one line with where it breaks and why. Aliases are allowed as long as the
    document they expand to stays under MAX_YAML_NODES values and refers not to itself."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, what)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from exc
    except RecursionError:
        raise ConfigError(f"{what} nests lists or mappings too deeply to read; write it "
                          f"flatter") from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, what: str) -> None:
    """Count the values the document stands for, each alias as the whole of what it names
    (computed once per node, so a billion laughs is counted, not walked)."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    aliased = False  # without aliases the count is the file's own size, which is no hazard
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            ancestors.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_YAML_NODES and aliased:
                line = node.start_mark.line + 1
                raise ConfigError(f"{what}: the YAML aliases (*name) from line {line} expand to "
                                  f"over {MAX_YAML_NODES} values; write the values out instead "
                                  f"of nesting aliases")
            continue
        if key in sizes:
            aliased = True
            continue
        if key in ancestors:
            line = node.start_mark.line + 1
            raise ConfigError(f"{what}: the YAML anchor at line {line} contains an alias to "
                              f"itself; write the values out instead")
        ancestors.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node))
