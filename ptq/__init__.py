"""ptq: measure what post-training quantization costs and buys on a device, tracked in MLflow."""

__version__ = "0.1.0"
