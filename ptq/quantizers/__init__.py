"""Quantizers (techniques): FP32 ONNX + calibration batches -> a QDQ ONNX and its record; backends run the result.

Importing this package costs neither torch nor ONNX Runtime: each quantizer imports its toolkit where it runs.
"""
