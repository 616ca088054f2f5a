"""Models from the ecosystem: ``timm:NAME`` and ``torchvision:NAME`` specs (random init, weights
from a local file, never a download), profiled and compressed like the registered ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import deploy_prune as dp
from deploy_prune.data import load_data
from deploy_prune.errors import UserError
from deploy_prune.models import build_model
from deploy_prune.models.checkpoint import load_model

timm = pytest.importorskip("timm")


@pytest.mark.slow  # 20-33 s on 2 cores; make test-all runs it
def test_a_timm_model_is_profiled_and_compressed(tmp_path: Path, quick_target_yaml: Callable[[int], Path],
                                                 deterministic_device: None) -> None:
    torch.manual_seed(0)
    model = build_model("timm:resnet10t", 10, 1)
    assert isinstance(model, timm.models.ResNet)
    data = load_data("synthetic:1x32x32")
    example = torch.zeros(1, 1, 32, 32)
    target = str(quick_target_yaml(8))
    table = dp.profile(model, example, target, profiles=tmp_path / "p")
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(convs) <= set(table.data["layers"]) and table.fingerprint
    assert table.predict(model)["calibrated_ms"] > 0
    result = dp.compress(model, example, target=target, budget=dp.LatencyRatio(0.8), method="uniform", train=data.train,
                         val=data.val, out=tmp_path / "run", profiles=tmp_path / "p", epochs=0, steps=1, batch_size=64)
    rep = result.report
    assert rep["met_budget"] is True, rep["budget_note"]
    assert rep["final"]["params"] < rep["baseline"]["params"]
    assert rep["model"]["spec"].startswith("timm.models.resnet.ResNet@")
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(dp.load(result.out, model=build_model("timm:resnet10t", 10, 1)).eval()(x),
                               result.model.eval()(x))


def test_torchvision_by_name_with_a_local_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_model("torchvision:shufflenet_v2_x0_5", 10, 3)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    again, meta = load_model(tmp_path / "weights.pt", "torchvision:shufflenet_v2_x0_5", num_classes=10, in_channels=3)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(again.eval()(x), net.eval()(x))
    assert meta == {}


@pytest.mark.parametrize("spec, message", [
    ("timm:no_such_net_xyz", "timm has no model 'no_such_net_xyz'"),
    ("torchvision:no_such_net", "torchvision has no classification model 'no_such_net'"),
])
def test_unknown_ecosystem_names(spec: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        build_model(spec, 10, 1)
    assert str(e.value).startswith(message)
