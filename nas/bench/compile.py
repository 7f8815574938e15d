"""`nas bench compile`: every kernel a GPU would try for a space, compiled for the H200
(sm_90) without one, and the static facts that bound its speed (see nas.kernels.aot)."""

from __future__ import annotations

import re
from typing import Any

from nas.errors import ConfigError

FLAGS = ("PAD_FIX", "EVEN_K", "TAP_PAIRS", "SPLIT_K", "X_PACKED", "W_PACKED", "ROW_K",
         "ROW_ALIGN", "FLAT_K")


def parse_precisions(items: list[str], space) -> list[str]:
    """The --precision values, checked against the space's integer choices (all of them
    when none is given)."""
    from nas.spaces import FLOAT_BITS

    for item in items:
        if not re.fullmatch(r"W\d+A\d+", item):
            raise ConfigError(f"--precision {item!r}: write it as W<bits>A<bits>, e.g. W4A8")
    offered = sorted({f"W{c.w_bits}A{c.a_bits}" for layer in space.layers()
                      for c in layer.choices
                      if c.w_bits not in FLOAT_BITS and c.a_bits not in FLOAT_BITS})
    chosen = [p for p in items if p in offered] if items else offered
    if not chosen:
        raise ConfigError(f"{space.name} has no integer layer choice"
                          + (f" among {', '.join(items)}" if items else "")
                          + f": nothing to compile (its choices: {', '.join(offered) or 'none'})")
    return chosen


def _tile(constants: dict) -> str:
    sizes = [str(constants[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_C", "BLOCK_K", "BLOCK")
             if n in constants]
    return "x".join(sizes) or "-"


def _flags(constants: dict) -> str:
    words = []
    for name in FLAGS:
        value = constants.get(name)
        if name in ("SPLIT_K", "ROW_ALIGN"):  # numbers: shown where they change something
            if (value or 0) > 1:
                words.append(f"{name.lower()}={value}")
        elif value:
            words.append(name.lower())
    return " ".join(words) or "-"


def summarize(kernels: list[dict[str, Any]]) -> dict[str, Any]:
    gemm = [k for k in kernels if k["mma"]]
    loops = sorted(k["loop_instructions"] for k in gemm if k["loop_instructions"])
    return {"kernels": len(kernels), "gemm_kernels": len(gemm),
            "spilling": sum(k["spill_bytes"] > 0 for k in kernels),
            "one_block_per_sm": sum(k["blocks_per_sm"] == 1 for k in kernels),
            "cannot_launch": sum(k["blocks_per_sm"] == 0 for k in kernels),
            "async_mma": sum(k["mma_async"] for k in gemm),
            "loop_instructions_median": loops[len(loops) // 2] if loops else None}


def tables(results: dict[str, Any]):
    rows = []
    order = sorted(results["kernels"], key=lambda k: (k["kernel"], -(k["loop_instructions"] or 0)))
    for k in order:
        c = k["constants"]
        tile = _tile(c) + (f" r{k['maxnreg']}" if k.get("maxnreg") else "")
        rows.append([k["kernel"].lstrip("_"), tile, k["num_warps"], k["num_stages"], _flags(c),
                     k["registers"], k["spill_bytes"], round(k["shared_bytes"] / 1024, 1),
                     k["blocks_per_sm"],
                     k["loop_instructions"] or "-", k["other_instructions"], k["mma"] or "-",
                     "yes" if k["mma_async"] else ("no" if k["mma"] else "-"), len(k["layers"])])
    s = results["summary"]
    summary = [[results["space"], results["batch"], s["kernels"], s["spilling"],
                s["one_block_per_sm"], s["cannot_launch"], f"{s['async_mma']}/{s['gemm_kernels']}",
                s["loop_instructions_median"] or "-", results["seconds"]]]
    return [(f"kernels compiled for sm_{results['arch']} (static facts of the machine code, not "
             f"timings)", ["kernel", "tile", "warps", "stages", "flags", "regs", "spill B",
                           "smem KB", "blocks/SM", "instr/iter", "other instr", "MMA",
                           "async MMA", "uses"], rows),
            ("summary", ["space", "batch", "kernels", "spilling", "1 block/SM", "cannot launch",
                         "async MMA", "median instr/iter", "seconds"], summary)]
