"""The process-wide cache of ONNX exports for timing: one export per architecture, never one
shared between graphs that differ."""

from __future__ import annotations

from typing import Any

import onnx
import pytest
import torch
from torch import nn

from deploy_prune.export import timing
from deploy_prune.export.timing import architecture_key, timing_onnx


class Net(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.ReLU, width: int = 4, scale: float = 1.0) -> None:
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(1, width, 3), act(), nn.Linear(width, 3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)) * self.scale)


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """Every model that reaches the exporter, with an empty cache to start from."""
    monkeypatch.setattr(timing, "_cache", type(timing._cache)())
    monkeypatch.setattr(timing, "_held", 0)
    made: list[nn.Module] = []
    real = timing.onnx_bytes

    def counted(model: nn.Module, *args: Any) -> bytes:
        made.append(model)
        return real(model, *args)

    monkeypatch.setattr(timing, "onnx_bytes", counted)
    return made


def test_the_same_architecture_is_exported_once_whatever_its_weights(exports: list[nn.Module]) -> None:
    torch.manual_seed(0)
    a, b = Net(), Net()
    assert not torch.equal(a.conv.weight, b.conv.weight)
    first = timing_onnx(a, (1, 8, 8))
    assert timing_onnx(b, (1, 8, 8)) is first and len(exports) == 1
    assert [d.dim_value for d in onnx.load_from_string(first).graph.input[0].type.tensor_type.shape.dim] == [1, 1, 8, 8]
    assert a.training, "the caller's model keeps its mode: a copy is exported"
    assert exports[0] is not a


@pytest.mark.parametrize("other", [
    lambda: Net(act=nn.GELU),          # no parameters differ, the operator does
    lambda: Net(width=8),              # shapes differ
    lambda: Net(scale=2.0),            # a plain attribute the forward reads
])
def test_models_whose_graphs_differ_are_exported_apart(exports: list[nn.Module], other: Any) -> None:
    torch.manual_seed(0)
    assert timing_onnx(Net(), (1, 8, 8)) is not timing_onnx(other(), (1, 8, 8))
    assert len(exports) == 2


def test_another_input_shape_or_batch_is_another_export(exports: list[nn.Module]) -> None:
    net = Net()
    blobs = {id(timing_onnx(net, (1, 8, 8))), id(timing_onnx(net, (1, 9, 9))), id(timing_onnx(net, (1, 8, 8), batch=2))}
    assert len(blobs) == 3 and len(exports) == 3


def test_a_model_with_a_forward_hook_is_exported_every_time(exports: list[nn.Module]) -> None:
    net = Net()
    net.act.register_forward_hook(lambda m, i, o: o * 0)
    assert architecture_key(net, (1, 1, 8, 8)) is None
    timing_onnx(net, (1, 8, 8))
    timing_onnx(net, (1, 8, 8))
    assert len(exports) == 2


def test_fx_graph_modules_match_by_their_code(exports: list[nn.Module]) -> None:
    traced = [torch.fx.symbolic_trace(Net()) for _ in range(2)]
    assert type(traced[0]) is not type(traced[1])  # fx makes a class per instance
    timing_onnx(traced[0], (1, 8, 8))
    timing_onnx(traced[1], (1, 8, 8))
    assert len(exports) == 1
    timing_onnx(torch.fx.symbolic_trace(Net(act=nn.Sigmoid)), (1, 8, 8))
    assert len(exports) == 2


def test_the_cache_holds_at_most_its_byte_budget(exports: list[nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    one = len(timing_onnx(Net(width=4), (1, 8, 8)))
    monkeypatch.setattr(timing, "CACHE_BYTES", int(2.5 * one))
    for w in (5, 6, 7):
        timing_onnx(Net(width=w), (1, 8, 8))
    assert timing._held <= timing.CACHE_BYTES and len(timing._cache) == 2
    timing_onnx(Net(width=4), (1, 8, 8))  # the oldest went first
    assert len(exports) == 5
