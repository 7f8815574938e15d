"""4-bit packing: two signed values in [-8, 7] per byte along one axis.

Element 2i goes to the low nibble and element 2i+1 to the high nibble of byte i (two's
complement nibbles), the layout the Triton kernels unpack in registers.
"""

from __future__ import annotations

import torch

from nas.errors import ConfigError


def pack_int4(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """int8 tensor of values in [-8, 7] -> uint8 tensor half as long along `dim`."""
    if t.dtype != torch.int8:
        raise ConfigError(f"pack_int4 takes an int8 tensor, got {t.dtype}")
    dim = dim % t.ndim
    if t.shape[dim] % 2:
        raise ConfigError(f"pack_int4: dimension {dim} has odd size {t.shape[dim]}; pad it to an "
                          f"even size first")
    if t.numel() and (t.min() < -8 or t.max() > 7):
        raise ConfigError("pack_int4: values must lie in [-8, 7] (signed 4-bit)")
    t = t.movedim(dim, -1)
    low = t[..., 0::2].to(torch.int16) & 0xF
    high = t[..., 1::2].to(torch.int16) & 0xF
    return (low | (high << 4)).to(torch.uint8).movedim(-1, dim).contiguous()


def unpack_int4(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """uint8 tensor of packed nibbles -> int8 tensor of values in [-8, 7], twice as long."""
    if t.dtype != torch.uint8:
        raise ConfigError(f"unpack_int4 takes a uint8 tensor of packed nibbles, got {t.dtype}")
    dim = dim % t.ndim
    t = t.movedim(dim, -1).to(torch.int16)
    low, high = t & 0xF, (t >> 4) & 0xF
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    out = torch.stack([low, high], dim=-1).flatten(-2).to(torch.int8)
    return out.movedim(-1, dim).contiguous()
