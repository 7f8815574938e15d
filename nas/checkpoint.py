"""The float checkpoint: what `nas train` writes (a space's model in fp32 with the space
itself, so that it rebuilds without the space file) and every command that starts from a
trained model reads."""

from __future__ import annotations

from typing import Any

from nas.clock import now_iso

CHECKPOINT_FORMAT = "nas-checkpoint/1"
FLOAT_KIND = "fp32"


def float_checkpoint(space, state_dict: dict, metrics: dict[str, Any],
                     seed: int) -> dict[str, Any]:
    """The payload of a float checkpoint of `space`'s model (for `RunDir.save_checkpoint`)."""
    return {"format": CHECKPOINT_FORMAT, "kind": FLOAT_KIND, "space": space.to_dict(),
            "state_dict": state_dict, "metrics": metrics, "seed": seed, "created": now_iso()}


def load_model(checkpoint: str):
    """(space, model with the checkpoint's weights, payload) of a float checkpoint: the
    space and model rebuilt as it was trained."""
    from nas.runs import load_checkpoint, load_state
    from nas.spaces import SearchSpace

    payload = load_checkpoint(checkpoint, expect={"format": CHECKPOINT_FORMAT,
                                                  "kind": FLOAT_KIND})
    space = SearchSpace.from_dict(payload["space"], source=f"checkpoint {checkpoint}")
    model = space.build_model()
    load_state(model, payload["state_dict"], f"checkpoint {checkpoint}", f"model {space.model}")
    return space, model, payload


def checkpoint_space(space_flag: str | None, checkpoint: str, ck_space):
    """The space to run a checkpoint's model in: `space_flag` (a space name or path) where
    given, so long as its model is the checkpoint's (the weights must fit), else the space it
    was trained for."""
    from nas.errors import CheckpointError
    from nas.spaces import load_space

    if space_flag is None:
        return ck_space
    space = load_space(space_flag)
    if (space.model, space.model_kwargs) != (ck_space.model, ck_space.model_kwargs):
        raise CheckpointError(f"checkpoint {checkpoint} was trained for space {ck_space.name} "
                              f"({_model(ck_space)}), but space {space.name} uses "
                              f"{_model(space)}; leave --space out to use {ck_space.name}, or "
                              f"give a space of the same model")
    # The same model for other data can still differ in its first and last layers.
    have, want = space.data_info(), ck_space.data_info()
    if (have.num_classes, have.in_channels) != (want.num_classes, want.in_channels):
        raise CheckpointError(f"checkpoint {checkpoint} was trained for {_data(want)} (space "
                              f"{ck_space.name}), but space {space.name} has {_data(have)}; "
                              f"leave --space out to use {ck_space.name}, or give a space with "
                              f"the checkpoint's data")
    return space


def _data(info) -> str:
    return (f"{info.num_classes} classes and {info.in_channels} input "
            f"channel{'s' if info.in_channels != 1 else ''}")


def _model(space) -> str:
    return f"{space.model} {space.model_kwargs}" if space.model_kwargs else space.model
