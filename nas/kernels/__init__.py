"""Triton int8 / int4 convolution kernels and 4-bit packing.

`conv2d_int` imports Triton on first use (never at `import nas`). Without CUDA the kernels
run under Triton's CPU interpreter (TRITON_INTERPRET=1, set automatically when no GPU is
present): exact but slow, for tests on tiny shapes.
"""

from nas.kernels.pack import pack_int4, unpack_int4


def conv2d_int(*args, **kwargs):
    from nas.kernels.conv import conv2d_int as _conv2d_int

    return _conv2d_int(*args, **kwargs)


conv2d_int.__doc__ = "See nas.kernels.conv.conv2d_int."

__all__ = ["conv2d_int", "pack_int4", "unpack_int4"]
