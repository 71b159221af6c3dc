"""Weights: local checkpoints (safetensors, torch, nested), random init, and the hub's error."""

from __future__ import annotations

import pytest
import torch

from atm_export.errors import UserError
from atm_export.registry import resolve_model
from atm_export.weights import create_model


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A deit_tiny with weights unlike the seeded random ones, saved in several formats."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1234)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    d = tmp_path_factory.mktemp("weights")
    save_file(state, str(d / "w.safetensors"))
    torch.save(state, d / "w.pth")
    torch.save({"model": state, "epoch": 3}, d / "nested.pth")
    return model, d


@pytest.mark.parametrize("filename", ["w.safetensors", "w.pth", "nested.pth"])
def test_local_checkpoint_loads_exactly(trained_like, filename):
    model, d = trained_like
    loaded, info = create_model(resolve_model("deit_t"), weights=str(d / filename))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert info.source == "file" and len(info.sha256) == 64


def test_checkpoint_for_another_model_is_refused(trained_like):
    _, d = trained_like
    with pytest.raises(UserError, match="does not match"):
        create_model(resolve_model("deit_s"), weights=str(d / "w.safetensors"))


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights"):
        create_model(resolve_model("deit_t"), weights=str(bad))
    with pytest.raises(UserError, match="not found"):
        create_model(resolve_model("deit_t"), weights=str(tmp_path / "nope.pth"))


def test_pickled_objects_are_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": object()}, path)
    with pytest.raises(UserError, match="cannot read weights"):
        create_model(resolve_model("deit_t"), weights=str(path))


def test_random_init_is_seeded_and_flagged():
    a, info = create_model(resolve_model("deit_t"), random_init=True)
    b, _ = create_model(resolve_model("deit_t"), random_init=True)
    assert info.random and "RANDOM WEIGHTS" in info.to_dict()["warning"]
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_hub_unreachable_names_both_ways_out(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr("atm_export.weights.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserError) as err:
        create_model(resolve_model("deit_t"))
    message = str(err.value)
    assert "--weights PATH" in message and "--random-init" in message and "\n" not in message


def test_model_without_hub_classifier_says_where_to_get_weights():
    with pytest.raises(UserError, match="mae_finetuned_vit_base"):
        create_model(resolve_model("mae_b"))


def test_weights_and_random_init_together_is_an_error():
    with pytest.raises(UserError, match="not both"):
        create_model(resolve_model("deit_t"), weights="x.pth", random_init=True)
