"""Small helpers the test modules share (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError


class UserNet(nn.Module):
    """A model the tool has never heard of: two convs (16 and 32 channels) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


OPTS = DataOptions(train_limit=600)  # what the tiny_run fixture was trained with (3 epochs, batch 32)


def one_line(e: pytest.ExceptionInfo[UserError]) -> str:
    """The error's message, asserted to be one line."""
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory under ``d``: equal snapshots, untouched directory."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def fake_device(monkeypatch: pytest.MonkeyPatch, ms: Callable[[list[np.ndarray]], float]) -> None:
    """Every local measurement reads ``ms(the ONNX model's initializers)``, the same every time:
    for tests of what the pipeline decides from measurements."""
    import onnx
    from onnx import numpy_helper

    from deploy_prune.latency.measure import LocalMeasurer
    from deploy_prune.latency.timing import summarize

    def read(model: object) -> float:
        m = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        return ms([numpy_helper.to_array(t) for t in m.graph.initializer])

    def time(self: LocalMeasurer, models: dict, protocol: object = None, on_round: object = None) -> dict:
        return {k: summarize([[read(src)] * 3] * 3) for k, src in models.items()}

    monkeypatch.setattr(LocalMeasurer, "time", time)
