from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.export import export_onnx
from deploy_prune.graph import ModelGraph, keep_ratio_plan
from deploy_prune.models import build_model
from deploy_prune.widths import round_channels

BIG = {"vgg16", "resnet50"}  # large ONNX files: exported in the slow suite only
ALL = ["tiny-cnn", "resnet20", "resnet56", "vgg16_bn", "resnet18", "mobilenet_v2", "mobilenet_v3_large", "resnet50", "vgg16"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in ALL])
def test_prune_30_percent_runs_exports_and_cuts_flops_as_predicted(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, 3)
    graph = ModelGraph(model, (3, 32, 32))
    assert graph.groups(), "every registered model has prunable groups"
    flops0, params0 = graph.flops_params()
    plan = keep_ratio_plan(graph, 0.7)
    predicted = graph.predict_flops(plan)
    kept = graph.prune_by_scores(plan, {g.name: torch.rand(g.channels) for g in graph.groups()})
    flops1, params1 = graph.flops_params()
    assert flops1 == predicted
    assert flops1 < 0.6 * flops0 and params1 < params0
    assert all(g.channels == kept[g.name] for g in graph.groups())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x[:1])
    assert ref.shape == (1, 10)
    rec = export_onnx(model, (3, 32, 32), tmp_path / "m.onnx")
    assert rec["parity_ok"], rec
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": x[:1].numpy()})[0].shape == (1, 10)


def test_output_layer_and_ignored_layers_are_never_pruned() -> None:
    model = build_model("resnet20", 10, 3)
    graph = ModelGraph(model, (3, 32, 32), ignore=["conv1"])
    names = {g.name for g in graph.groups()}
    assert "fc" not in names and "conv1" not in names
    assert all("fc" not in g.out_layers for g in graph.groups())
    graph.prune_by_scores(keep_ratio_plan(graph, 0.5), {g.name: torch.rand(g.channels) for g in graph.groups()})
    assert model.fc.out_features == 10 and model.conv1.out_channels == 16


def test_residual_stage_is_one_group() -> None:
    graph = ModelGraph(build_model("resnet20", 10, 3), (3, 32, 32))
    stage = next(g for g in graph.groups() if "layer2.0.conv2" in g.out_layers)
    assert {"layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2", "layer2.0.shortcut.0"} <= set(stage.out_layers)
    assert stage.channels == 32 and stage.in_hw == (16, 16)


def test_ignore_naming_no_layer() -> None:
    with pytest.raises(UserError, match="--ignore names no layer: layer9"):
        ModelGraph(build_model("resnet20", 10, 3), (3, 32, 32), ignore=["layer9"])


def test_channel_multiple_is_honoured() -> None:
    assert round_channels(21, 64, 8) == 24 and round_channels(3, 64, 8) == 8 and round_channels(64, 64, 8) == 64
    model = build_model("resnet20", 10, 3)
    graph = ModelGraph(model, (3, 32, 32), channel_multiple=8)
    kept = graph.prune_by_scores(keep_ratio_plan(graph, 0.6), {g.name: torch.rand(g.channels) for g in graph.groups()})
    assert all(k % 8 == 0 for k in kept.values())
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, nn.Conv2d))


def test_pruning_keeps_the_highest_scores() -> None:
    model = build_model("tiny-cnn", 10, 1)
    graph = ModelGraph(model, (1, 16, 16))
    first = next(g for g in graph.groups() if "features.0" in g.out_layers)
    w = model.features[0].weight.detach().clone()
    scores = {first.name: torch.arange(first.channels, dtype=torch.float32)}  # the last channels win
    graph.prune_by_scores({first.name: 4}, scores)
    assert torch.equal(model.features[0].weight, w[-4:])


def test_user_model_traced_by_torch_pruning(tmp_path: Path) -> None:
    src = tmp_path / "net.py"
    src.write_text(
        "import torch, torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes=10, in_channels=3):\n"
        "        super().__init__()\n"
        "        self.a = nn.Conv2d(in_channels, 8, 3, padding=1); self.b = nn.Conv2d(in_channels, 8, 3, padding=1)\n"
        "        self.c = nn.Conv2d(16, 12, 3, padding=1); self.fc = nn.Linear(12, num_classes)\n"
        "    def forward(self, x):\n"
        "        x = torch.cat([self.a(x).relu(), self.b(x).relu()], 1)\n"
        "        return self.fc(self.c(x).mean((2, 3)))\n"
        "def make(num_classes=10, in_channels=3):\n"
        "    return Net(num_classes, in_channels)\n"
    )
    model = build_model(f"{src}:make", 10, 3)
    graph = ModelGraph(model, (3, 8, 8))
    graph.prune_by_scores(keep_ratio_plan(graph, 0.5), {g.name: torch.rand(g.channels) for g in graph.groups()})
    assert model.c.in_channels == model.a.out_channels + model.b.out_channels == 8


class _NumpyTanh(nn.Module):
    """A NumPy round trip: fine under ``torch.no_grad()``, untraceable by autograd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.tanh(x.numpy()))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.squash = _NumpyTanh()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.squash(self.conv(x)).mean((2, 3)))


def test_untraceable_model_is_a_user_error_suggesting_ignore() -> None:
    with pytest.raises(UserError, match="--ignore") as info:
        ModelGraph(_Untraceable(), (3, 8, 8))
    assert "cannot trace" in str(info.value)


def test_untraceable_model_error_names_the_module() -> None:
    with pytest.raises(UserError, match="'squash'"):
        ModelGraph(_Untraceable(), (3, 8, 8))
