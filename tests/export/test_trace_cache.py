"""The trace cache (atm_export.export.trace_cache): a graph stitched from a cached trace is the
graph a fresh trace gives, byte for byte, for another model of the same architecture with other
weights and other merge settings; the key changes with what the trace depends on; a damaged or
unwritable cache costs time, never a wrong graph."""

from __future__ import annotations

import onnx
import pytest
import torch

from atm_export import MergeConfig, patch_model
from atm_export.export.onnx import export_plugin_flavour
from atm_export.export.trace_cache import SUFFIX, TraceCache

from conftest import make_model

FIRST = MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88)
OTHER = MergeConfig(alpha=0.97, beta=0.06, theta_min=0.9, split_layer=4)


def _entries(cache: TraceCache) -> list:
    return sorted(cache.directory.glob(f"*{SUFFIX}"))


@pytest.mark.parametrize("key", ["deit_tiny", "vit_tiny_gap"])  # a class-token head; a last block that merges
def test_a_cached_trace_gives_what_a_fresh_trace_gives(key, flat_images, tmp_path):
    """Trace model A into the cache; model B (other weights, thresholds, split and typical
    counts) exported from it equals B traced afresh: every block's weights and every merge
    node's attributes, the prologue's and the epilogue's included, are B's."""
    cache = TraceCache(tmp_path / "traces")
    a = patch_model(make_model(key, seed=0), FIRST)
    export_plugin_flavour(a, flat_images[:2], typical_tokens=[150.0] * a.depth, trace_cache=cache)
    assert (cache.hits, cache.misses, cache.write_errors) == (0, 1, [])
    [entry] = _entries(cache)

    kept = onnx.load(entry)  # the trace without its parameters' bytes
    params = [t for t in kept.graph.initializer if ".atm." in t.name or t.name.startswith("atm.")]
    assert params and all(not t.raw_data and not t.float_data and list(t.dims) for t in params)
    assert entry.stat().st_size < sum(p.numel() for p in a.parameters()) * 4 / 20

    b = patch_model(make_model(key, seed=1), OTHER)
    assert [s is None for s in b.steps] == [s is None for s in a.steps]  # the same merge pattern
    typical = [100.0 - i for i in range(b.depth)]
    fresh = export_plugin_flavour(b, flat_images[:2], typical_tokens=typical)
    cached = export_plugin_flavour(b, flat_images[:2], typical_tokens=typical, trace_cache=cache)
    assert cache.hits == 1 and _entries(cache) == [entry]
    assert cached.SerializeToString() == fresh.SerializeToString()

    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # cut short, as by a full disk
    again = export_plugin_flavour(b, flat_images[:2], typical_tokens=typical, trace_cache=cache)
    assert (cache.hits, cache.misses) == (1, 2)  # traced anew ...
    assert again.SerializeToString() == fresh.SerializeToString()
    assert onnx.load(entry).graph.node  # ... and the entry replaced


def test_the_key_follows_the_architecture_and_what_was_traced_not_the_weights_or_settings(tmp_path):
    cache = TraceCache(tmp_path)
    key = cache.key(patch_model(make_model("deit_tiny", seed=0), FIRST), opset=18, half=False)
    assert cache.key(patch_model(make_model("deit_tiny", seed=1), OTHER), opset=18, half=False) == key
    assert cache.key(patch_model(make_model("deit_tiny"), FIRST), opset=18, half=True) != key
    assert cache.key(patch_model(make_model("deit_tiny"), FIRST), opset=17, half=False) != key

    import timm

    torch.manual_seed(0)
    six_heads = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_heads=6).eval()
    # the same parameters' names and shapes: only the heads (an attribute) tell them apart
    assert [p.shape for p in six_heads.parameters()] == [p.shape for p in make_model("deit_tiny").parameters()]
    assert cache.key(patch_model(six_heads, FIRST), opset=18, half=False) != key
    eps = make_model("deit_tiny")
    eps.blocks[3].norm2.eps = 1e-5
    assert cache.key(patch_model(eps, FIRST), opset=18, half=False) != key
    distilled = make_model("deit_tiny_distilled")
    assert cache.key(patch_model(distilled, FIRST), opset=18, half=False) != key


def test_the_key_follows_the_source_of_a_model_of_ones_own(tmp_path, monkeypatch):
    """A model class edited between two exports (same names, shapes and attributes) is traced anew."""
    import importlib

    source = tmp_path / "my_vit.py"
    source.write_text("from timm.models.vision_transformer import VisionTransformer\n\n"
                      "class MyViT(VisionTransformer):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("my_vit")
    make = lambda: module.MyViT(embed_dim=192, depth=4, num_heads=3).eval()  # noqa: E731
    cache = TraceCache(tmp_path)
    key = cache.key(patch_model(make(), FIRST), opset=18)
    assert cache.key(patch_model(make(), FIRST), opset=18) == key
    source.write_text(source.read_text() + "    # forward changed here\n")
    assert cache.key(patch_model(make(), FIRST), opset=18) != key


def _tiny_model(outputs=("y",)) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "atm.w"], [outputs[0]])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [2]) for o in outputs],
        [onnx.numpy_helper.from_array(torch.ones(2).numpy(), "atm.w"),
         onnx.numpy_helper.from_array(torch.full((1,), 7.0).numpy(), "shape_constant")])
    return onnx.helper.make_model(graph)


def test_an_entry_keeps_constants_drops_parameter_bytes_and_must_match_its_inputs_and_outputs(tmp_path):
    cache = TraceCache(tmp_path)
    cache.store("k", _tiny_model(), lambda name: name.startswith("atm."))
    loaded = cache.load("k", ["x"], ["y"])
    assert cache.hits == 1
    w, constant = loaded.graph.initializer
    assert (w.name, list(w.dims), w.raw_data) == ("atm.w", [2], b"")
    assert onnx.numpy_helper.to_array(constant).tolist() == [7.0]
    assert cache.load("k", ["x"], ["y", "z"]) is None and cache.load("k", ["images"], ["y"]) is None
    assert cache.load("missing", ["x"], ["y"]) is None
    cache.path("k").write_bytes(b"\x00 not a model")
    assert cache.load("k", ["x"], ["y"]) is None
    assert (cache.hits, cache.misses) == (1, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["k" + SUFFIX]  # no partial file left


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    cache = TraceCache(blocked / "traces")
    cache.store("k", _tiny_model(), lambda name: name.startswith("atm."))
    assert len(cache.write_errors) == 1 and str(blocked) in cache.write_errors[0]
    assert cache.load("k", ["x"], ["y"]) is None
