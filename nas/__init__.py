"""nas: mixed-precision architecture search for quantized convolutional networks.

`import nas` stays light: heavy parts (torch models, data) load on first use, and triton
only where a command needs it.
"""

from nas.errors import NasError

__version__ = "0.1.0"

_LAZY = {
    "SearchSpace": "nas.spaces", "load_space": "nas.spaces", "list_spaces": "nas.spaces",
    "create_model": "nas.models", "list_models": "nas.models", "register_model": "nas.models",
    "load_data": "nas.data", "parse_budget": "nas.budget",
    "Plan": "nas.plan", "LayerPrecision": "nas.plan", "quantize_model": "nas.quant",
    "fold_bn": "nas.quant", "calibrate": "nas.quant", "prepare_qat": "nas.quant",
    "convert": "nas.quant",
}

__all__ = ["NasError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nas' has no attribute {name!r}")
