"""Export: a quantized model (or a plan alone) for other runtimes and toolkits.

`spec.py` says how each quantizer is exported (integer types per bit width, scales and zero
points) and writes the plan document for `--format json|yaml`; `to_onnx.py` turns the
fake-quantized model into an ONNX graph of QuantizeLinear / DequantizeLinear pairs with
torch's exporter; `check.py` runs that graph in onnxruntime against the torch model.
Importing this package imports no torch, onnx or onnxruntime: the modules do, when used.
"""
