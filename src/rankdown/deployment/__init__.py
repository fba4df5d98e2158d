"""Deployment: folds that keep stock modules (batch norm, channel gathers, pointwise merges) and
parity-checked export (ONNX, TorchScript, exported programs, onnxruntime sessions)."""
