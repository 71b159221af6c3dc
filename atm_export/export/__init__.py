"""Exporters: ONNX in two flavours (TokenMerge custom op; standard-op lowering)."""
