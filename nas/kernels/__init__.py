"""Triton int8 / int4 convolution kernels and 4-bit packing.

`conv2d_int` imports Triton on first use (never at `import nas`). Without CUDA the kernels
run under Triton's CPU interpreter (TRITON_INTERPRET=1, set automatically when no GPU is
present): exact but slow, for tests on tiny shapes. Importing the package imports neither
torch nor Triton, so torch-free modules such as `nas.kernels.configs` (the launch rules
that the latency estimate shares) stay cheap to import.
"""


def __getattr__(name):
    if name in ("pack_int4", "unpack_int4"):
        from nas.kernels import pack

        return getattr(pack, name)
    raise AttributeError(f"module 'nas.kernels' has no attribute {name!r}")


def conv2d_int(*args, **kwargs):
    from nas.kernels.conv import conv2d_int as _conv2d_int

    return _conv2d_int(*args, **kwargs)


conv2d_int.__doc__ = "See nas.kernels.conv.conv2d_int."

__all__ = ["conv2d_int", "pack_int4", "unpack_int4"]
