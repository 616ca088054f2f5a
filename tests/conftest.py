"""Shared fixtures: a tiny trained run on digits, reused by export/benchmark tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import fake_device

from deploy_prune.config import Protocol, Target
from deploy_prune.data import DataOptions


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker computes on one thread: ``make test`` runs one worker per core, and
    two workers of two threads each on two cores slowed the suite's model code 2-3x."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-cnn trained for 3 epochs on 600 digits: a real run directory."""
    from deploy_prune.train import train_model

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train_model(out, "tiny-cnn", "digits", DataOptions(train_limit=600), epochs=3, batch_size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run: Path) -> Path:
    from deploy_prune.export import export_run

    export_run(tiny_run)
    return tiny_run / "model.onnx"


@pytest.fixture
def quick_target() -> Target:
    """ONNX Runtime, 1 thread, a protocol short enough for unit tests."""
    return Target(name="quick", backend="onnxruntime", threads=1,
                  protocol=Protocol(warmup=2, repeats=10, rounds=2, min_time_s=0.0))



@pytest.fixture(scope="session")
def quick_target_yaml(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """Makes a target YAML: ONNX Runtime on one thread, channels in ``multiple``s, the shortest protocol
    that still interleaves rounds (tests here check what the pipeline decides, not how fast)."""
    def make(multiple: int) -> Path:
        p = tmp_path_factory.mktemp("targets") / f"quick{multiple}.yaml"
        p.write_text(f"name: quick{multiple}\nbackend: onnxruntime\nthreads: 1\nchannel_multiple: {multiple}\n"
                     "warmup: 2\nrepeats: 10\nrounds: 2\nmin_time_s: 0.0\n")
        return p
    return make


@pytest.fixture
def deterministic_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every local measurement reads 1 us per thousand ONNX weights plus 10 us, the same every
    time: for tests of what the pipeline decides from measurements, which a noisy timer on a
    shared machine would make flaky (the timing itself is tested against real backends)."""
    fake_device(monkeypatch, lambda weights: 0.01 + 1e-6 * sum(w.size for w in weights))


@pytest.fixture
def run(tiny_run: Path, tiny_onnx: Path, tmp_path: Path) -> Path:
    """A private copy of the finished 3-epoch tiny run, exported (model.onnx + model.onnx.json)."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest)
    assert (dest / "model.onnx").is_file() and (dest / "model.onnx.json").is_file()
    return dest
