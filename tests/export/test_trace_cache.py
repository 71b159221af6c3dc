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
from atm_export.export.blockwise import REFILLED
from atm_export.export.trace_cache import DIGEST_KEY, SUFFIX, TraceCache, Uncacheable

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


def _key(cache: TraceCache, atm, **traced) -> str:
    return cache.key(atm, refilled=REFILLED, **traced)


def test_the_key_follows_the_architecture_and_what_was_traced_not_the_weights_or_settings(tmp_path):
    cache = TraceCache(tmp_path)
    ran = patch_model(make_model("deit_tiny", seed=0), FIRST)
    key = _key(cache, ran, opset=18, half=False)
    with torch.no_grad():
        ran(torch.zeros(1, 3, 224, 224))  # its last_stats (refilled, like its settings) do not count
    assert _key(cache, ran, opset=18, half=False) == key
    assert _key(cache, patch_model(make_model("deit_tiny", seed=1), OTHER), opset=18, half=False) == key
    assert _key(cache, patch_model(make_model("deit_tiny"), FIRST), opset=18, half=True) != key
    assert _key(cache, patch_model(make_model("deit_tiny"), FIRST), opset=17, half=False) != key

    import timm

    torch.manual_seed(0)
    six_heads = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_heads=6).eval()
    # the same parameters' names and shapes: only the heads (an attribute) tell them apart
    assert [p.shape for p in six_heads.parameters()] == [p.shape for p in make_model("deit_tiny").parameters()]
    assert _key(cache, patch_model(six_heads, FIRST), opset=18, half=False) != key
    eps = make_model("deit_tiny")
    eps.blocks[3].norm2.eps = 1e-5
    assert _key(cache, patch_model(eps, FIRST), opset=18, half=False) != key
    distilled = make_model("deit_tiny_distilled")
    assert _key(cache, patch_model(distilled, FIRST), opset=18, half=False) != key


def test_a_model_the_key_cannot_follow_is_not_cached(tmp_path):
    """Hooks, functions among a module's attributes and classes without source could change the
    trace unseen: such a model is traced every time."""
    cache = TraceCache(tmp_path)
    hooked = patch_model(make_model("deit_tiny"), FIRST)
    hooked.vit.blocks[2].mlp.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(Uncacheable, match="hooks"):
        _key(cache, hooked, opset=18)
    patched = patch_model(make_model("deit_tiny"), FIRST)
    patched.vit.blocks[2].attn.forward = lambda x: x  # a forward of its own, on one instance
    with pytest.raises(Uncacheable, match="Attention.forward is a function"):
        _key(cache, patched, opset=18)
    with pytest.raises(Uncacheable, match="ATMVisionTransformer.config"):  # settings count unless refilled
        cache.key(patch_model(make_model("deit_tiny"), FIRST), opset=18)
    namespace = {}
    exec("from timm.models.vision_transformer import VisionTransformer\n"
         "class Typed(VisionTransformer):\n    pass\n", namespace)  # as typed at a prompt: no source to read
    with pytest.raises(Uncacheable, match="source of Typed"):
        _key(cache, patch_model(namespace["Typed"](embed_dim=192, depth=4, num_heads=3).eval(), FIRST), opset=18)


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
    key = _key(cache, patch_model(make(), FIRST), opset=18)
    assert _key(cache, patch_model(make(), FIRST), opset=18) == key
    source.write_text(source.read_text() + "    # forward changed here\n")
    assert _key(cache, patch_model(make(), FIRST), opset=18) != key


def _tiny_model(outputs=("y",)) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "atm.w"], [outputs[0]])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [2]) for o in outputs],
        [onnx.numpy_helper.from_array(torch.ones(2).numpy(), "atm.w"),
         onnx.numpy_helper.from_array(torch.full((1,), 7.0).numpy(), "shape_constant")])
    return onnx.helper.make_model(graph)


def test_an_entry_keeps_constants_drops_parameter_bytes_and_must_be_what_was_written(tmp_path):
    import os

    cache = TraceCache(tmp_path)
    original = _tiny_model()
    cache.store("k", original, lambda name: name.startswith("atm."))
    assert onnx.numpy_helper.to_array(original.graph.initializer[0]).tolist() == [1.0, 1.0]  # the caller's, intact
    loaded = cache.load("k", ["x"], ["y"])
    w, constant = loaded.graph.initializer
    assert (w.name, list(w.dims), w.raw_data) == ("atm.w", [2], b"")
    assert onnx.numpy_helper.to_array(constant).tolist() == [7.0]
    assert [p.key for p in loaded.metadata_props] == []  # the digest is the cache's, not the trace's
    mask = os.umask(0)
    os.umask(mask)
    assert cache.path("k").stat().st_mode & 0o777 == 0o666 & ~mask
    assert cache.load("k", ["x"], ["y", "z"]) is None and cache.load("k", ["images"], ["y"]) is None
    assert cache.load("missing", ["x"], ["y"]) is None
    edited = onnx.load(cache.path("k"))  # parses, but is not what was written
    edited.graph.node[0].op_type = "Sub"
    assert any(p.key == DIGEST_KEY for p in edited.metadata_props)
    cache.path("k").write_bytes(edited.SerializeToString())
    assert cache.load("k", ["x"], ["y"]) is None
    cache.path("k").write_bytes(b"\x00 not a model")
    assert cache.load("k", ["x"], ["y"]) is None
    assert (cache.hits, cache.misses) == (0, 5)  # a hit is counted by the export, once the trace served
    assert [p.name for p in tmp_path.iterdir()] == ["k" + SUFFIX]  # no partial file left


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    cache = TraceCache(blocked / "traces")
    cache.store("k", _tiny_model(), lambda name: name.startswith("atm."))
    assert len(cache.write_errors) == 1 and str(blocked) in cache.write_errors[0]
    assert cache.load("k", ["x"], ["y"]) is None
