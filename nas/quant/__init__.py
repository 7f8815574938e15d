"""Quantization core: fake quantizers (STE, stochastic rounding, LSQ, PACT), observers and
calibration, BN folding, quantized modules, `quantize_model(model, plan)` and QAT
(`prepare_qat`, `convert`).

Loaded lazily so that the CLI can list choices without importing torch.
"""

METHODS = ("minmax", "ema", "percentile", "mse", "kl")

_LAZY = {
    "ConvBn2d": "nas.quant.bn_fold", "fold_bn": "nas.quant.bn_fold",
    "fake_quantize": "nas.quant.fake", "qparams": "nas.quant.fake",
    "quant_range": "nas.quant.fake", "sqnr_db": "nas.quant.fake",
    "QuantConv2d": "nas.quant.modules", "QuantLinear": "nas.quant.modules",
    # quantize_model: the qat module's, which also takes a plan given as a dict.
    "calibrate": "nas.quant.modules", "quantize_model": "nas.quant.qat",
    "prepare_qat": "nas.quant.qat", "convert": "nas.quant.qat", "load_qat": "nas.quant.qat",
    "make_observer": "nas.quant.observers", "FakeQuantizer": "nas.quant.quantizer",
}

__all__ = ["METHODS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nas.quant' has no attribute {name!r}")
