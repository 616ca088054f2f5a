"""Backend per-node counters attributed to the model's layers (ORT, OpenVINO, torch naming)."""

from __future__ import annotations

import onnx
import pytest
import torch

from deploy_prune.export import onnx_bytes
from deploy_prune.latency.counters import OTHER, attribute, compare, node_to_layer
from deploy_prune.latency.measure import LocalMeasurer
from deploy_prune.models import build_model
from deploy_prune.target import load_target


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, bytes]:
    torch.manual_seed(0)
    m = build_model("resnet20", 10, 1).eval()
    return m, onnx_bytes(m, (1, 16, 16), 1)


def _layers(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


@pytest.mark.parametrize("target", ["cpu-ort-1t", "cpu-openvino-1t", "cpu-torch-1t"])
def test_every_layer_gets_its_counters(resnet: tuple[torch.nn.Module, bytes], target: str) -> None:
    model, blob = resnet
    t = load_target(target)
    pytest.importorskip({"onnxruntime": "onnxruntime", "openvino": "openvino", "torch": "onnx2torch"}[t.backend])
    counters = LocalMeasurer(t).layer_times({"m": blob}, runs=3)["m"]
    names = node_to_layer(onnx.load_from_string(blob), model, torch.zeros(1, 1, 16, 16))
    by_layer = attribute(counters, names)
    assert _layers(model) <= set(by_layer)  # each conv and the head, under whichever name the backend ran it
    assert sum(by_layer.values()) == pytest.approx(sum(counters.values()))
    assert by_layer.get(OTHER, 0.0) < 0.5 * sum(counters.values())


def test_attribution_follows_fused_chains_and_compare() -> None:
    names = {"node_Conv_1": "conv1", "relu_3": "layer1.0.conv2"}
    got = attribute({"node_Conv_1": 1.0, "relu_3_nchwc": 2.0, "ReorderOutput": 0.5}, names)
    assert got == {"conv1": 1.0, "layer1.0.conv2": 2.0, OTHER: 0.5}
    c = compare({"a": 2.0, "b": 4.0, "c": 1.0}, {"a": 1.0, "b": 2.0, "c": 0.5})
    assert c["median_ratio"] == pytest.approx(2.0) and c["spearman"] == pytest.approx(1.0) and c["layers_compared"] == 3
