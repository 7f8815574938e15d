"""The evaluator's weights for a discrete search: given (`--supernet`, `--checkpoint`) or
trained here first (a one-shot supernet with every branch sampled uniformly, or a float
model for PTQ)."""

from __future__ import annotations

from pathlib import Path

from nas.errors import ConfigError
from nas.search.request import SearchRequest


def evaluator_kind(request: SearchRequest) -> str:
    kind = request.options.get("evaluator")
    supernet = request.options.get("supernet")
    if kind == "ptq" and supernet:
        raise ConfigError("--evaluator ptq calibrates a float model, and --supernet gives a "
                          "supernet; give --checkpoint for ptq, or --evaluator oneshot")
    if kind is None:
        kind = "ptq" if request.checkpoint and not supernet else "oneshot"
    if supernet and request.checkpoint:
        raise ConfigError("--supernet and --checkpoint both give the evaluator's weights; give "
                          "one of them")
    return kind


def space_and_weights(request: SearchRequest, kind: str):
    """The space, and the weights file the evaluator loads (None: trained here), with the
    seed those weights were trained with (their held-out split)."""
    from nas.checkpoint import checkpoint_space
    from nas.spaces import SearchSpace, load_space

    supernet = request.options.get("supernet")
    if supernet:
        from nas.search.supernet_file import load_supernet_file, supernet_path

        path = supernet_path(supernet, "--supernet")
        payload = load_supernet_file(path)
        space = SearchSpace.from_dict(payload["space"], source=f"supernet {path}")
        if request.space:
            given = load_space(request.space)
            if given.to_dict() != space.to_dict():
                raise ConfigError(f"--supernet {supernet} was trained on space {space.name}, "
                                  f"not --space {request.space}; leave --space out, or give a "
                                  f"supernet of that space")
        return space, path.resolve(), int(payload.get("seed", 0)), None
    if request.checkpoint:
        from nas.checkpoint import load_model

        ck_space, model, payload = load_model(request.checkpoint)
        space = checkpoint_space(request.space, request.checkpoint, ck_space)
        if kind == "ptq":
            return space, Path(request.checkpoint).resolve(), int(payload.get("seed", 0)), None
        return space, None, request.seed, model  # a supernet trained from these weights
    return load_space(request.space), None, request.seed, None


def train_weights(kind: str, space, splits, model, budget, request: SearchRequest, run_dir,
                   device) -> tuple[Path, list[str]]:
    """Train what the evaluator needs into the run folder; returns its path and warnings."""
    import torch

    from nas.clock import now_iso
    from nas.search.honesty import training_warnings

    batch = int(space.train["batch_size"])
    per_epoch = max(1, len(splits.train) // batch)
    if model is None:
        torch.manual_seed(request.seed)
        model = space.build_model()
    if kind == "oneshot":
        from nas.search import dnas
        from nas.search.supernet_file import supernet_payload
        from nas.supernet import Supernet

        print(f"training the one-shot supernet ({budget}; every branch sampled uniformly)",
              flush=True)
        net = Supernet(model, space, seed=request.seed)
        # warmup 1: weights only, theta stays 0, so each step samples branches uniformly.
        cfg = dnas.DnasConfig(budget=budget, target=None, loss="multiplicative", warmup=1.0,
                              batch_size=batch, seed=request.seed, progress=request.progress)
        state, _, interrupted = dnas.search(net, splits, _size_table(space), cfg, device)
        if interrupted:
            raise KeyboardInterrupt
        path = run_dir.save_checkpoint("supernet.pt", supernet_payload(
            space, net, seed=request.seed, factored=False, created=now_iso(),
            search_state={"step": state.step, "elapsed": state.elapsed, "history": []}))
        return path, training_warnings(state.step, per_epoch, "supernet")
    from nas.checkpoint import CHECKPOINT_FORMAT
    from nas.train import TrainConfig, train

    print(f"training the float model for PTQ ({budget})", flush=True)
    cfg = TrainConfig(budget=budget, batch_size=batch, lr=float(space.train["lr"]),
                      weight_decay=float(space.train["weight_decay"]), seed=request.seed,
                      progress=request.progress)
    result = train(model, splits, cfg, device)
    path = run_dir.save_checkpoint("best.pt", {
        "format": CHECKPOINT_FORMAT, "kind": "fp32", "space": space.to_dict(),
        "state_dict": result.best_state, "metrics": {"val_accuracy": result.best_val_accuracy},
        "seed": request.seed, "created": now_iso()})
    return path, training_warnings(result.steps, per_epoch, "float model")


def _size_table(space):
    from nas.cost import make_cost_model

    return make_cost_model("size").table(space)
