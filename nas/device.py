"""--device {auto,cpu,cuda}."""

from __future__ import annotations

from nas.errors import DeviceError


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA device is available; "
                          "use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name!r}: use auto, cpu or cuda")
    return torch.device(name)
