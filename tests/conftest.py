"""Shared fixtures: small timm models (random weights, seeded) and inputs that make merging happen."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Tests never reach a model hub; the pipeline's hub path is tested for its error instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Runs keep caches (traces, TensorRT timings) under $XDG_CACHE_HOME: the tests' own, not the user's.
_CACHE_HOME = tempfile.TemporaryDirectory(prefix="atm-export-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME.name
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The three model kinds every test of patching and export runs on.
TINY_MODELS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "vit_tiny_gap": ("vit_tiny_patch16_224", {"global_pool": "avg", "fc_norm": True}),  # MAE-style head
}


def make_model(key: str, seed: int = 0):
    import timm

    name, kwargs = TINY_MODELS[key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture(scope="session")
def tiny_models():
    return {key: make_model(key) for key in TINY_MODELS}


@pytest.fixture(scope="session")
def flat_images():
    """Preprocessed built-in scenes (flat regions and objects): merging happens on these."""
    from atm_export.images import builtin_images, preprocess

    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    return preprocess(builtin_images(8), model)


@pytest.fixture(scope="session")
def noise_batch():
    from atm_export.images import noise_images, preprocess

    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    return preprocess(noise_images(4), model)


def merging_inputs(batch=3, n=21, c=6, d=32, num_protected=1, seed=0, near=(0.02, 0.5)):
    """Token tensors where some A tokens (alternate split) are near copies of a B token, so
    that merging happens.

    Near copies get distinct noise levels, so that their similarities are well separated and
    float32 and float64 rank them alike.
    """
    from atm_export.merge import alternate_starts, max_merges

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=g)
    metric = torch.randn(batch, n, d, generator=g)
    size = torch.randint(1, 5, (batch, n), generator=g).float()
    first_a, first_b = alternate_starts(num_protected)
    a_positions = list(range(first_a, n, 2))
    b_positions = list(range(first_b, n, 2))
    for bi in range(batch):
        for k, a in enumerate(a_positions[: max_merges(n - num_protected) - 1]):
            if k % 3 == 2:
                continue  # leave some tokens unlike everything
            partner = b_positions[(k * 5 + bi) % len(b_positions)]
            scale = near[0] + (near[1] - near[0]) * (k + 1) / len(a_positions)
            metric[bi, a] = metric[bi, partner] + scale * torch.randn(d, generator=g)
    return x, size, metric


def token_merge_model(opset=18, **attrs):
    """A model of one TokenMerge node (inputs x, size, metric; outputs x_out, size_out, num_tokens)."""
    from onnx import TensorProto, helper

    from atm_export import contract
    from atm_export.ops import register_onnx_schema

    register_onnx_schema()
    node = helper.make_node("TokenMerge", ["x", "size", "metric"], ["x_out", "size_out", "num_tokens"],
                            domain=contract.DOMAIN, name=contract.node_name(1), **attrs)
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "one_merge",
        [helper.make_tensor_value_info("x", f, ["B", "N", "C"]), helper.make_tensor_value_info("size", f, ["B", "N"]),
         helper.make_tensor_value_info("metric", f, ["B", "N", "D"])],
        [helper.make_tensor_value_info("x_out", f, ["B", "M", "C"]), helper.make_tensor_value_info("size_out", f, ["B", "M"]),
         helper.make_tensor_value_info("num_tokens", TensorProto.INT64, [])],
    )
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", opset),
                                                                  helper.make_opsetid(contract.DOMAIN, contract.VERSION)])


# ---------------------------------------------------------------- the trained test model

@pytest.fixture(scope="session")
def shapes_vit():
    """The test model (a small ViT trained on generated shapes) with its committed weights."""
    from atm_export.registry import resolve_model
    from atm_export.weights import create_model

    model, _ = create_model(resolve_model("shapes_vit"))
    return model


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """Generated image folders the test model was never trained on (seeds apart from training's):
    ``val`` (labelled, 40 per class), ``calib`` (labelled, 60 per class), ``flat`` (no labels)."""
    from atm_export.testmodel.shapes import write_folder

    root = tmp_path_factory.mktemp("shapes")
    return {"val": write_folder(root / "val", 40, seed=2_000_001),
            "calib": write_folder(root / "calib", 60, seed=2_000_002),
            "flat": write_folder(root / "flat", 4, seed=2_000_003, labelled=False)}


@pytest.fixture(scope="session")
def bundle(flat_images):
    """A DeiT-T export bundle (both ONNX flavours and the unmerged baseline) that merges on the
    flat images, for the runner tests."""
    from atm_export import MergeConfig, patch_model
    from atm_export.export.bundle import Bundle
    from atm_export.export.onnx import export_baseline, export_plugin_flavour, portable_flavour

    atm = patch_model(make_model("deit_tiny"), MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88))
    plugin = export_plugin_flavour(atm, flat_images[:2])
    return Bundle(atm=atm, vit=atm.vit, plugin=plugin, portable=portable_flavour(plugin),
                  baseline=export_baseline(atm.vit, flat_images[:2]))
