"""supernet.pt: a DNAS run's supernet, what `--resume` continues and what the one-shot
evaluator of a discrete search loads (`--supernet RUN`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nas.errors import ConfigError

SUPERNET_FORMAT = "nas-supernet/1"
FIX = "pass the run folder of an earlier 'nas search'"


def supernet_path(run: str | Path, flag: str) -> Path:
    """The supernet.pt of a run folder given to `flag` (--resume, --supernet)."""
    folder = Path(run)
    if not folder.is_dir():
        raise ConfigError(f"{flag} {folder} " + ("is a file" if folder.exists() else
                                                 "does not exist") + f"; {FIX}")
    if not (folder / "supernet.pt").exists():
        raise ConfigError(f"{flag} {folder} holds no supernet.pt; {FIX} (dnas, or a discrete "
                          f"search that trained its own supernet)")
    return folder / "supernet.pt"


def load_supernet_file(path: str | Path) -> dict[str, Any]:
    from nas.runs import load_checkpoint

    return load_checkpoint(path, ("supernet", "space"), FIX, expect={"format": SUPERNET_FORMAT})


def is_factored(payload: dict[str, Any]) -> bool:
    # Files before the key was saved: a factored supernet has theta_w and theta_a per layer.
    return payload.get("factored", any(k.endswith(".theta_w") for k in payload["supernet"]))


def supernet_payload(space, supernet, *, seed: int, factored: bool, created: str,
                     optimizers=None, search_state=None, target=None, latency=None) -> dict:
    return {"format": SUPERNET_FORMAT, "space": space.to_dict(),
            "supernet": supernet.state_dict(), "gumbel_state": supernet.generator.get_state(),
            "optimizers": optimizers, "search_state": search_state, "target": target,
            "latency": latency, "factored": factored, "seed": seed, "created": created}


def rebuild_supernet(payload: dict[str, Any], source: str):
    """The Supernet a payload holds, with its weights, theta and Gumbel state."""
    import torch

    from nas.runs import load_state
    from nas.spaces import SearchSpace
    from nas.supernet import Supernet

    space = SearchSpace.from_dict(payload["space"], source=source)
    torch.manual_seed(payload.get("seed", 0))
    net = Supernet(space.build_model(), space, factored=is_factored(payload),
                   seed=payload.get("seed", 0))
    load_state(net, payload["supernet"], source, "this space's supernet")
    if payload.get("gumbel_state") is not None:
        net.generator.set_state(payload["gumbel_state"])
    return space, net


# One-shot evaluation's BN re-estimation (nas.search.dnas.one_shot_accuracy's defaults).
BN_BATCHES = 4
ONE_SHOT_BATCH = 256


def plan_model(supernet, plan, space, splits, device):
    """(float model for the plan, its input ranges): the supernet's `.net` with each
    MixedLayer back to its layer, BN statistics re-estimated with the plan's branches fixed,
    exactly as one-shot evaluation does, and each layer's running input range after that.
    Quantized with BN folded, it is the network the search scored."""
    import copy

    import torch

    from nas.data import make_loader
    from nas.search.encoding import PlanEncoding
    from nas.supernet import recalibrate_bn

    supernet.to(device, memory_format=torch.channels_last)  # as the search evaluated it
    supernet.fix(PlanEncoding(space).indices(plan))
    try:
        recalibrate_bn(supernet, make_loader(splits.train, ONE_SHOT_BATCH, shuffle=True, seed=0),
                       BN_BATCHES, device)
        ranges = {n: (m.act_lo.clone(), m.act_hi.clone())
                  for n, m in zip(supernet.names, supernet.mixed())}
        # The MixedLayers' sampler is bound to the supernet: share it, do not copy it.
        net = copy.deepcopy(supernet.net, memo={id(supernet): supernet})
    finally:
        supernet.fix(None)
    for name in supernet.names:
        net.set_submodule(name, net.get_submodule(name).layer)
    return net.eval(), ranges
