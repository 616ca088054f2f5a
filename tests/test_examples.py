"""The shipped examples run as written, small."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _example(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_segmentation_example_names_its_metric_and_meets_its_budget(tmp_path: Path, deterministic_device: None,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    seg = _example("segmentation")
    result = seg.main(["--train-images", "64", "--val-images", "16", "--epochs", "1", "--finetune-epochs", "1",
                       "--latency-ratio", "0.8", "--out", str(tmp_path / "run"), "--profiles", str(tmp_path / "p")])
    rep = result.report
    assert rep["metric"]["name"] == "mIoU" and rep["metric"]["source"] == "evaluate callback"
    assert 0 <= rep["final"]["accuracy"] <= 1 and rep["met_budget"] is True, rep["budget_note"]
    assert rep["final"]["latency_ms"]["quiet"] < rep["baseline"]["latency_ms"]["quiet"]
    assert "mIoU (%)" in (tmp_path / "run" / "report.md").read_text()
    assert "mIoU:" in capsys.readouterr().out


def test_shapes_are_labelled_per_pixel() -> None:
    seg = _example("segmentation")
    x, y = seg.shapes(4, seed=3).tensors
    assert x.shape == (4, 1, 32, 32) and y.shape == (4, 32, 32)
    assert set(y.unique().tolist()) == {0, 1, 2}


@pytest.mark.slow  # about 80 s here (YOLOv8n exports at each measured step); the pieces run in the default suite
def test_detection_example_runs_small_and_names_its_metric(tmp_path: Path, deterministic_device: None,
                                                           quick_target_yaml, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("ultralytics")
    det = _example("detection")
    results = det.main(["--targets", str(quick_target_yaml(8)), "--ratios", "0.8", "--size", "64", "--train-images", "8",
                        "--val-images", "4", "--epochs", "0.5", "--finetune-epochs", "1", "--data", str(tmp_path / "shapes"),
                        "--out", str(tmp_path / "runs"), "--profiles", str(tmp_path / "p")])
    rep = results[0].report
    assert rep["metric"]["name"] == "mAP50-95" and 0 <= rep["final"]["accuracy"] <= 1
    assert rep["met_budget"] is True, rep["budget_note"]
    assert any("head in export mode" in n for n in rep["notes"])
    out = capsys.readouterr().out
    assert "unpruned: mAP50-95" in out and "at 0.8: mAP50-95" in out and "budget MET" in out and "NOT MET" not in out
