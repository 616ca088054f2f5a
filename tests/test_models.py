from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from deploy_prune.errors import UserError
from deploy_prune.models import MODELS, build_model, check_runs_on
from deploy_prune.models.checkpoint import load_model, save_checkpoint

SMALL = ["tiny-cnn", "resnet20", "resnet56", "vgg16_bn"]
TORCHVISION = ["resnet18", "resnet50", "vgg16", "mobilenet_v2", "mobilenet_v3_large"]


def test_registry_lists_every_required_model() -> None:
    assert set(SMALL + TORCHVISION) <= set(MODELS.names())


@pytest.mark.parametrize("name", SMALL + TORCHVISION)
def test_models_adapt_channels_and_classes(name: str) -> None:
    model = build_model(name, num_classes=7, in_channels=1).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1
    size = 32
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)


def test_cifar_models_run_on_fashion_mnist_size() -> None:
    for name in ("resnet20", "vgg16_bn"):
        check_runs_on(build_model(name, 10, 1), (1, 28, 28), 10)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UserError, match="valid names: .*resnet20"):
        build_model("resnet21", 10, 3)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="cannot run on inputs of shape"):
        check_runs_on(build_model("vgg16", 10, 3), (3, 8, 8), 10)


def _write_user_model(tmp_path: Path) -> Path:
    src = tmp_path / "mynet.py"
    src.write_text(
        "import torch.nn as nn\n"
        "def make(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))\n"
    )
    return src


def test_user_model_file_and_checkpoint_roundtrip(tmp_path: Path) -> None:
    spec = f"{_write_user_model(tmp_path)}:make"
    model = build_model(spec, num_classes=5, in_channels=1)  # factory lacks in_channels: stem adapted
    assert next(model.modules())[0].in_channels == 1
    meta = {"model": {"spec": spec, "num_classes": 5, "in_channels": 1}, "input_shape": [1, 16, 16]}
    save_checkpoint(tmp_path / "ck.pt", model, meta)
    loaded, got_meta = load_model(tmp_path / "ck.pt")
    assert got_meta["input_shape"] == [1, 16, 16]
    x = torch.randn(1, 1, 16, 16)
    assert torch.allclose(model(x), loaded(x))


def test_missing_user_factory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no callable 'nope'"):
        build_model(f"{_write_user_model(tmp_path)}:nope", 10, 3)


def test_pickled_model_needs_trust(tmp_path: Path) -> None:
    model = build_model("tiny-cnn", 10, 1)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UserError, match="--trust-checkpoint"):
        load_model(tmp_path / "whole.pt")
    loaded, meta = load_model(tmp_path / "whole.pt", trust=True)
    assert isinstance(loaded, torch.nn.Module) and meta == {}


def test_corrupt_and_missing_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt or not a torch file"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "absent.pt")
    with pytest.raises(UserError, match="has no model.pt"):
        load_model(tmp_path)


def test_checkpoint_for_wrong_architecture(tmp_path: Path) -> None:
    meta = {"model": {"spec": "tiny-cnn", "num_classes": 10, "in_channels": 1}}
    save_checkpoint(tmp_path / "ck.pt", build_model("tiny-cnn", 10, 1), meta)
    with pytest.raises(UserError, match="does not fit model 'resnet20'"):
        load_model(tmp_path / "ck.pt", "resnet20")


def test_checkpoint_contains_no_pickled_code(tmp_path: Path) -> None:
    meta = {"model": {"spec": "tiny-cnn", "num_classes": 10, "in_channels": 1}}
    save_checkpoint(tmp_path / "ck.pt", build_model("tiny-cnn", 10, 1), meta)
    obj = torch.load(tmp_path / "ck.pt", weights_only=True)  # raises if anything but tensors/primitives
    assert obj["format"] == "deploy-prune/checkpoint"
    assert not isinstance(obj, pickle.PickleError)
