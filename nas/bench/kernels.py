"""`nas bench kernels`: the integer kernels' speed goals, measured in one run on a CUDA GPU.

Three ratios, each over the space's layer geometries (each geometry once), timed like
`nas measure` (CUDA graphs; the fp16 baseline is torch channels_last cuDNN):
- W8A8 speed-up over fp16 cuDNN on the dense 3x3 convolutions at the large batch;
- fraction of the INT8 roofline (the cost model's roofline time / measured time) on the
  largest layers (within 10 % of the most multiply-adds) at the large batch;
- W4A8 speed-up over W8A8 (W8A8 time / W4A8 time) on the dense 3x3 convolutions at the small
  batch.
Each is summarised by its geometric mean and its worst layer; a goal is met when the worst
layer meets it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from nas.cost.latency import table_key
from nas.cost.measure import make_case, measure, ops

GOALS = {"w8a8_vs_fp16": 1.5, "roofline_fraction": 0.6, "w4a8_vs_w8a8": 1.2}
LARGEST_WITHIN = 0.10


def _unique(infos, batch: int):
    seen, out = set(), []
    for info in infos:
        key = table_key(info, batch, 8, 8)
        if key not in seen:
            seen.add(key)
            out.append(info)
    return out


def goal_layers(space, batch: int) -> tuple[list, list]:
    """(dense 3x3 convolutions, largest dense convolutions), one per geometry."""
    convs = [layer.info for layer in space.layers()
             if layer.info.type == "Conv2d" and layer.info.groups == 1]
    three = _unique([i for i in convs if tuple(i.kernel) == (3, 3)], batch)
    most = max((ops(i, batch) for i in convs), default=0.0)
    largest = _unique([i for i in convs if ops(i, batch) >= (1 - LARGEST_WITHIN) * most], batch)
    return three, largest


def _timed_layers(space, large: int, small: int) -> tuple[list, list, list, list]:
    """(3x3 and largest layers at the large batch, both timed there at W8A8, one per
    geometry; the 3x3 at the small batch, timed at W8A8 and W4A8)."""
    three, largest = goal_layers(space, large)
    return three, largest, _unique(three + largest, large), goal_layers(space, small)[0]


def warm_targets(space, large: int, small: int) -> list[tuple[int, list[str], list[str]]]:
    """What `run_bench` times, as (batch, precisions, layer names) for compiling ahead: one
    layer per geometry (the kernels depend on nothing else)."""
    _, _, big, three_small = _timed_layers(space, large, small)
    return [(large, ["W8A8"], [i.name for i in big]),
            (small, ["W8A8", "W4A8"], [i.name for i in three_small])]


def summarize(values: list[float], goal: float) -> dict[str, Any]:
    """Geometric mean and worst of per-layer ratios against a goal."""
    if not values:
        return {"layers": 0, "goal": goal, "met": False}
    geomean = math.exp(sum(math.log(v) for v in values) / len(values))
    return {"layers": len(values), "geomean": round(geomean, 4), "worst": round(min(values), 4),
            "best": round(max(values), 4), "goal": goal, "met": min(values) >= goal}


def run_bench(space, device, timer, spec, large: int, small: int, seed: int = 0,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    three, largest, big, three_small = _timed_layers(space, large, small)
    if not three:
        from nas.errors import ConfigError

        raise ConfigError(f"space {space.name} has no dense 3x3 convolution to benchmark; "
                          f"choose a convolutional space such as imagenet_resnet18")
    say(f"{space.name}: {len(big)} layer geometries at batch {large} (W8A8), "
        f"{len(three_small)} at batch {small} (W8A8, W4A8)")
    entries_large = measure([make_case(i, large, 8, 8, device, gen) for i in big], large, timer,
                            spec, say=say)
    small_cases = [make_case(i, small, w, 8, device, gen) for i in three_small for w in (8, 4)]
    entries_small = measure(small_cases, small, timer, spec, say=say)
    by_key = {e["key"]: e for e in entries_large + entries_small}
    speedup = [by_key[table_key(i, large, 8, 8)]["speedup_vs_fp16"] for i in three]
    roofline = [by_key[table_key(i, large, 8, 8)]["roofline_fraction"] for i in largest]
    w4 = [by_key[table_key(i, small, 8, 8)]["us"] / by_key[table_key(i, small, 4, 8)]["us"]
          for i in three_small]
    return {"space": space.name, "large_batch": large, "small_batch": small,
            "entries": entries_large + entries_small,
            "goals": {"w8a8_vs_fp16": summarize(speedup, GOALS["w8a8_vs_fp16"]),
                      "roofline_fraction": summarize(roofline, GOALS["roofline_fraction"]),
                      "w4a8_vs_w8a8": summarize(w4, GOALS["w4a8_vs_w8a8"])}}


def tables(results: dict[str, Any]):
    large, small = results["large_batch"], results["small_batch"]
    rows = [[e["key"], e["us"], e["fp16_cudnn_us"], e["speedup_vs_fp16"],
             f"{e['roofline_fraction'] * 100:.1f} %", e.get("kernel_config", "-")]
            for e in results["entries"]]
    names = {"w8a8_vs_fp16": f"W8A8 speed-up over fp16 cuDNN, 3x3 convs, batch {large}",
             "roofline_fraction": f"fraction of INT8 roofline, largest layers, batch {large}",
             "w4a8_vs_w8a8": f"W4A8 speed-up over W8A8, 3x3 convs, batch {small}"}
    goals = [[names[k], g["layers"], g.get("geomean", "-"), g.get("worst", "-"),
              g.get("best", "-"), f">= {g['goal']}", "met" if g["met"] else "NOT met"]
             for k, g in results["goals"].items()]
    return [("layers (measured)", ["layer geometry and precision", "us", "fp16 cuDNN us",
                                   "speed-up", "of roofline", "kernel"], rows),
            ("goals (ratio per layer; met when the worst layer meets it)",
             ["ratio", "layers", "geomean", "worst", "best", "goal", ""], goals)]
