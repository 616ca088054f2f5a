"""A finished run recorded in TensorBoard and MLflow (real event files and a local MLflow store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.errors import UserError
from deploy_prune.report.tracking import parse_trackers, record

REPORT = {
    "schema_version": 1, "run_dir": "runs/r20", "metric": {"name": "top1"},
    "target": {"name": "cpu-ort-1t", "precision": "fp32"}, "budget": {"kind": "latency_ratio", "value": 0.5},
    "method": {"name": "deeplsp"}, "met_budget": True,
    "baseline": {"accuracy": 0.93, "latency_ms": {"median": 2.0, "quiet": 1.9}, "flops": 4e7, "params": 2.7e5},
    "final": {"accuracy": 0.91, "latency_ms": {"median": 1.0, "quiet": 0.95}, "flops": 2e7, "params": 1.3e5},
    "steps": [{"step": 1, "measured_latency_ms": {"median": 1.5, "quiet": 1.4}, "accuracy": 0.90, "flops": 3e7},
              {"step": 2, "measured_latency_ms": {"median": 1.1, "quiet": 1.0}, "accuracy": 0.89, "flops": 2e7}],
    "layers": [{"group": "conv1", "channels_before": 16, "channels_after": 8}],
    "provenance": {"tool_version": "0.1.0", "date": "2026-12-02T00:00:00+00:00"},
}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "r20"
    d.mkdir()
    (d / "report.json").write_text(json.dumps(REPORT))
    (d / "report.md").write_text("# report\n")
    return d


def test_tensorboard_gets_the_steps_widths_and_report(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = record(parse_trackers([f"tensorboard:{tmp_path / 'tb'}"]), REPORT, run_dir)
    assert lines == [f"tensorboard: {tmp_path / 'tb' / 'r20'}"]
    acc = EventAccumulator(str(tmp_path / "tb" / "r20"))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("steps/latency_ms")] == [(1, 1.4), (2, 1.0)]
    assert [round(e.value, 4) for e in acc.Scalars("steps/top1")] == [0.9, 0.89]
    assert acc.Scalars("widths/conv1")[0].value == 8.0 and acc.Scalars("final/latency_ms")[0].value == pytest.approx(0.95)


def test_mlflow_records_a_run_in_a_local_store(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    [line] = record(parse_trackers([f"mlflow:{uri}"]), REPORT, run_dir)
    run_id = line.split()[2]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params["method"] == "deeplsp" and run.data.metrics["final_top1"] == pytest.approx(0.91)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "step_latency_ms")] == [(1, 1.4), (2, 1.0)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"report.json", "report.md"}


@pytest.mark.parametrize("spec, message", [("wandb", "unknown tracker 'wandb'"), ("tensorboard", "give the directory")])
def test_a_bad_log_is_refused_before_anything_runs(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_trackers([spec])


def test_report_verb_records_an_existing_run(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    res = CliRunner().invoke(app, ["report", str(run_dir), "--log", f"tensorboard:{tmp_path / 'tb'}"])
    assert res.exit_code == 0, res.output
    assert f"recorded in tensorboard: {tmp_path / 'tb' / 'r20'}" in res.output
    assert list((tmp_path / "tb" / "r20").glob("events.out.tfevents.*"))
