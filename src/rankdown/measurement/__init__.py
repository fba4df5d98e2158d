"""Measurement: parameters, MACs and guarded latency (eager, compiled, onnxruntime), and quality
against labels or the dense model."""
