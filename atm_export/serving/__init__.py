"""Serving the exported models: a Triton Inference Server model repository (``triton``).

See docs/serving.md for the repository layout, how to start tritonserver with the TokenMerge
plugin, and how Triton's batching interacts with ATM's batch-adaptive merge counts.
"""
