"""One-line notes shown beside costs: layers a partial space leaves out of them, and the
command that re-measures a space's latency tables."""

from __future__ import annotations

import shlex


def unnamed_note(space) -> str | None:
    """One line naming the layers a partial space leaves float and out of every cost (None
    when it names them all)."""
    names = space.unnamed_layers()
    if not names:
        return None
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return (f"note: {len(names)} Conv2d/Linear layer{'s' if len(names) > 1 else ''} of "
            f"{space.model} that space {space.name} does not name ({shown}) stay float and "
            f"are in none of these costs; list them under fixed: with w_bits: 32, a_bits: 32 "
            f"to count them")


def remeasure_command(space, batch: int) -> str:
    """The `nas measure` line that re-measures `space`: by the path it was loaded from where it
    came from a file (its name alone would not load)."""
    return f"nas measure --space {shlex.quote(space.origin or space.name)} --batch {batch}"
