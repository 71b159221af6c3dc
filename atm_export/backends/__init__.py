"""Backends that run exported models: ONNX Runtime and TensorRT (imported lazily)."""
