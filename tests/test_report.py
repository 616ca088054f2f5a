"""Reports of a compress run (Markdown, HTML, plots) and the CI gate, on a hand-built report.json."""

from __future__ import annotations

import copy
import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from deploy_prune.errors import UserError
from deploy_prune.report import REQUIRED_KEYS, load_report, render_html, render_markdown, write_reports
from deploy_prune.report.gate import format_result, run_gate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOTE = "unstructured zeros do not lower dense latency on onnxruntime"


def make_report() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "run_dir": "runs/r20-half",
        "model": {"spec": "resnet20", "input_shape": [1, 28, 28], "num_classes": 10},
        "data": {"name": "fashion-mnist"},
        "target": {"name": "cpu-ort-1t", "backend": "onnxruntime", "threads": 1},
        "budget": {"kind": "latency_ratio", "value": 0.5, "latency_ms": 1.05},
        "method": {"name": "deeplsp", "settings": {"criterion": "taylor", "amount": 0.05}},
        "baseline": {"accuracy": 0.931, "latency_ms": {"median": 2.1, "p90": 2.3, "round_cv": 0.02, "n": 300},
                     "predicted_latency_ms": 2.0, "flops": 40_000_000, "params": 270_000},
        "final": {"accuracy": 0.923, "latency_ms": {"median": 1.02, "p90": 1.11, "round_cv": 0.01, "n": 300},
                  "predicted_latency_ms": 0.98, "flops": 19_500_000, "params": 131_000, "sparsity": 0.05},
        "met_budget": True,
        "budget_note": "measured 1.02 ms <= budget 1.05 ms",
        "steps": [
            {"step": 1, "stage": "structured", "predicted_latency_ms": 1.5, "measured_latency_ms": {"median": 1.55, "p90": 1.6},
             "accuracy": 0.91, "flops": 30_000_000, "params": 200_000, "seconds": 12.3},
            {"step": 2, "stage": "structured", "predicted_latency_ms": 1.1, "measured_latency_ms": None,
             "accuracy": 0.89, "flops": 21_000_000, "params": 140_000, "seconds": 11.0},
            {"step": 3, "stage": "finetune", "predicted_latency_ms": 0.98, "measured_latency_ms": {"median": 1.02, "p90": 1.11},
             "accuracy": 0.923, "flops": 19_500_000, "params": 131_000, "seconds": 100.0},
        ],
        "layers": [{"group": "conv1", "channels_before": 16, "channels_after": 8},
                   {"group": "layer2.0.conv1", "channels_before": 32, "channels_after": 24}],
        "stage_seconds": {"baseline": 3.2, "sensitivity": 40.1, "structured": 20.0, "finetune": 100.0},
        "notes": [NOTE, "<script>alert(1)</script> & friends"],
        "provenance": {"tool_version": "0.1.0", "date": "2025-01-01T00:00:00+00:00", "git_commit": "abc123", "device": "cpu"},
    }


def write(run_dir: Path, rep: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(rep))
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write(tmp_path / "runs" / "r20-half", make_report())


# ------------------------------------------------------------------ loading


def test_load_report_accepts_dir_and_file(run_dir: Path) -> None:
    assert load_report(run_dir)["method"]["name"] == "deeplsp"
    assert load_report(run_dir / "report.json")["met_budget"] is True


@pytest.mark.parametrize("key", REQUIRED_KEYS[1:])
def test_missing_key_is_user_error(tmp_path: Path, key: str) -> None:
    rep = make_report()
    del rep[key]
    with pytest.raises(UserError, match=f"missing key.*{key}"):
        load_report(write(tmp_path / "r", rep))


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.update(schema_version=3), "schema_version 3, this deploy-prune reads versions 1, 2"),
    (lambda r: r.pop("schema_version"), "missing key.*schema_version"),
    (lambda r: r.update(final=None), "'final' must be an object"),
    (lambda r: r.update(steps={}), "'steps' must be a list"),
    (lambda r: r.update(met_budget="yes"), "'met_budget' must be true or false"),
])
def test_bad_report_is_user_error(tmp_path: Path, mutate: Any, match: str) -> None:
    rep = make_report()
    mutate(rep)
    with pytest.raises(UserError, match=match):
        load_report(write(tmp_path / "r", rep))


def test_unreadable_reports(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="report not found"):
        load_report(tmp_path / "nope")
    with pytest.raises(UserError, match="report not found"):
        load_report(tmp_path)  # a directory without report.json
    (tmp_path / "report.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_report(tmp_path)


# ------------------------------------------------------------------ rendering


def test_write_reports(run_dir: Path) -> None:
    out = write_reports(run_dir)
    assert set(out) == {"markdown", "html", "accuracy_vs_latency", "widths", "predicted_vs_measured"}
    for stem in ("accuracy_vs_latency", "widths", "predicted_vs_measured"):
        assert out[stem] == run_dir / f"{stem}.png"
        assert out[stem].read_bytes().startswith(PNG_MAGIC)
    md = (run_dir / "report.md").read_text()
    for fig in ("93.10", "92.30", "-0.80 pp", "2.100", "1.020", "2.300", "1.110", "0.980", "40.00", "19.50",
                "0.270", "0.131", "5.0", "MET (measured 1.02 ms <= budget 1.05 ms)", "latency <= 50 % of baseline",
                "deeplsp", "criterion", "taylor", "layer2.0.conv1", "finetune", "sensitivity", "40.1", "163.3",
                f"- {NOTE}", "abc123", "resnet20", "fashion-mnist", "cpu-ort-1t", "](widths.png)"):
        assert fig in md, fig
    assert "NOT MET" not in md
    page = (run_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("data:image/png;base64,") == 3
    assert "93.10" in page and "1.020" in page and NOTE in page and "layer2.0.conv1" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; friends" in page
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_not_met_is_plain(tmp_path: Path) -> None:
    rep = make_report()
    rep.update(met_budget=False, budget_note="measured 1.20 ms > budget 1.05 ms")
    md = render_markdown(rep)
    assert "NOT MET: measured 1.20 ms > budget 1.05 ms" in md
    assert "NOT MET" in render_html(rep, {})


def test_minimal_report_skips_absent_plots(tmp_path: Path) -> None:
    full = make_report()
    rep = {k: copy.deepcopy(full[k]) for k in REQUIRED_KEYS}
    rep["baseline"]["latency_ms"] = rep["final"]["latency_ms"] = None
    rep["steps"] = [{"step": 1, "stage": "structured", "predicted_latency_ms": 1.5, "measured_latency_ms": None,
                     "accuracy": 0.9, "flops": 1, "params": 1, "seconds": 1.0}]
    run = write(tmp_path / "min", rep)
    out = write_reports(run)
    assert set(out) == {"markdown", "html"}
    assert not list(run.glob("*.png"))
    md = out["markdown"].read_text()
    assert "## Steps" in md and "## Channels per group" not in md and "## Notes" not in md
    assert "data:image/png" not in out["html"].read_text()


def test_latency_budget_in_ms_and_flops_budget() -> None:
    rep = make_report()
    rep["budget"] = {"kind": "latency_ms", "value": 5.0, "latency_ms": 5.0}
    assert "latency <= 5.000 ms (median on cpu-ort-1t)" in render_markdown(rep)
    rep["budget"] = {"kind": "flops_ratio", "value": 0.5, "latency_ms": None}
    assert "FLOPs <= 50 % of baseline" in render_markdown(rep)


# ------------------------------------------------------------------ gate


def test_gate_default_checks_met_budget(tmp_path: Path, run_dir: Path) -> None:
    res = run_gate(run_dir / "report.json")
    assert res.passed and [c.name for c in res.checks] == ["budget"]
    rep = make_report()
    rep.update(met_budget=False, budget_note="measured 1.20 ms > budget 1.05 ms")
    res = run_gate(write(tmp_path / "bad", rep))
    assert not res.passed
    assert format_result(res) == ["FAIL budget NOT met: measured 1.20 ms > budget 1.05 ms (from the report)"]


def test_gate_checks_pass_and_fail(run_dir: Path) -> None:
    res = run_gate(run_dir, max_latency_ms=5, min_accuracy=0.9, max_accuracy_drop=0.01)
    assert res.passed and [c.name for c in res.checks] == ["latency", "accuracy", "accuracy_drop"]
    lines = format_result(res)
    assert lines[0] == "PASS latency 1.02 ms <= 5.00 ms (median, measured on cpu-ort-1t; p90 1.11 ms)"
    assert lines[1] == "PASS accuracy 92.30 % >= 90.00 % (final, validation)"
    assert lines[2] == "PASS accuracy drop 0.80 pp <= 1.00 pp (93.10 % -> 92.30 %)"

    res = run_gate(run_dir, max_latency_ms=1.0, min_accuracy=0.95, max_accuracy_drop=0.005)
    assert not res.passed and [c.passed for c in res.checks] == [False, False, False]
    assert format_result(res)[0].startswith("FAIL latency 1.02 ms > 1.00 ms")
    assert res.checks[0].value == pytest.approx(1.02) and res.checks[0].limit == 1.0
    assert format_result(res)[2].startswith("FAIL accuracy drop 0.80 pp > 0.50 pp")

    res = run_gate(run_dir, max_latency_ms=1.0195)  # close values print with enough digits to differ
    assert format_result(res)[0].startswith("FAIL latency 1.0200 ms > 1.0195 ms")


def test_gate_accuracy_drop_tolerates_float_noise(tmp_path: Path) -> None:
    rep = make_report()
    rep["baseline"]["accuracy"], rep["final"]["accuracy"] = 0.93, 0.92  # 0.93 - 0.92 = 0.010000000000000009
    assert run_gate(write(tmp_path / "r", rep), max_accuracy_drop=0.01).passed


def test_gate_missing_latency_fails_with_fix(tmp_path: Path) -> None:
    rep = make_report()
    rep["final"]["latency_ms"] = None
    res = run_gate(write(tmp_path / "r", rep), max_latency_ms=5)
    assert not res.passed and "--remeasure" in res.checks[0].message


def test_gate_bad_limits_are_user_errors(run_dir: Path) -> None:
    with pytest.raises(UserError, match="fractions"):
        run_gate(run_dir, min_accuracy=90)
    with pytest.raises(UserError, match="fractions"):
        run_gate(run_dir, max_accuracy_drop=1.5)
    with pytest.raises(UserError, match="> 0"):
        run_gate(run_dir, max_latency_ms=0)
    with pytest.raises(UserError, match="report not found"):
        run_gate(run_dir / "missing.json")


def test_gate_junit(run_dir: Path, tmp_path: Path) -> None:
    xml_path = tmp_path / "ci" / "gate.xml"
    res = run_gate(run_dir, max_latency_ms=5, min_accuracy=0.95, junit=xml_path)
    assert not res.passed
    root = ET.parse(xml_path).getroot()
    assert root.tag == "testsuite" and root.get("name") == "deploy-prune gate"
    assert root.get("tests") == "2" and root.get("failures") == "1"
    cases = {c.get("name"): c for c in root.findall("testcase")}
    assert set(cases) == {"latency", "accuracy"}
    assert cases["latency"].find("failure") is None
    fail = cases["accuracy"].find("failure")
    assert fail is not None and fail.get("message") == res.checks[1].message


def test_gate_remeasure_onnxruntime(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from deploy_prune.export import onnx_bytes

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    rep = make_report()
    rep["final"]["latency_ms"] = {"median": 1e9, "p90": 1e9}  # only a real re-measurement passes
    rep["met_budget"] = False  # as that figure says: a verdict its own figures contradict fails the gate
    run = write(tmp_path / "run", rep)
    model = onnx_bytes(net, (1, 8, 8))
    (run / "model.onnx").write_bytes(model)
    (run / "model.onnx.json").write_text(json.dumps({"onnx_sha256": hashlib.sha256(model).hexdigest()}))  # the export record
    target = tmp_path / "t.yaml"
    target.write_text("name: t\nbackend: onnxruntime\nthreads: 1\nwarmup: 2\nrepeats: 10\nrounds: 2\nmin_time_s: 0\n")

    res = run_gate(run / "report.json", max_latency_ms=1e6, remeasure_target=str(target))
    assert res.passed, format_result(res)
    assert res.remeasured is not None and res.remeasured["target"] == "t" and res.remeasured["n"] >= 10
    assert res.checks[0].value == pytest.approx(res.remeasured["quiet"])
    assert "re-measured on t" in res.checks[0].message

    # No explicit limit: the re-measured median is checked against the report's budget in ms.
    res = run_gate(run, remeasure_target=str(target))
    assert [c.name for c in res.checks] == ["budget"] and res.checks[0].limit == 1.05
    assert "re-measured on t" in res.checks[0].message

    (run / "model.onnx").unlink()
    with pytest.raises(UserError, match="model.onnx"):
        run_gate(run, max_latency_ms=5, remeasure_target=str(target))


def test_time_per_stage_has_one_total_the_run_wall_clock() -> None:
    rep = make_report()
    rep["stage_seconds"] = {**rep["stage_seconds"], "total": 170.0}  # stages sum to 163.3
    md = render_markdown(rep)
    section = md[md.index("## Time per stage"):]
    section = section[:section.index("\n## ")]
    assert section.count("| total |") == 1 and "| total | 170.0 |" in section and "| other | 6.7 |" in section
    del rep["stage_seconds"]["total"]
    assert "| total | 163.3 |" in render_markdown(rep)  # no wall clock recorded: the sum


def test_remove_if_empty_keeps_anything_holding_a_file(tmp_path: Path) -> None:
    from deploy_prune.io import remove_if_empty

    (tmp_path / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.pt").write_bytes(b"x")
    assert remove_if_empty(tmp_path / "a") and not (tmp_path / "a").exists()
    assert not remove_if_empty(tmp_path / "b") and (tmp_path / "b" / "checkpoints" / "last.pt").is_file()


def test_the_sensitivity_heat_map_shows_distinct_widths_and_joins_the_report(run_dir: Path) -> None:
    from deploy_prune.sensitivity import plot_heatmap

    entries = [{"kept_channels": k, "accuracy_drop": d} for k, d in ((16, 0.0), (16, 0.0), (8, 0.02), (8, 0.02))]
    res = {"groups": [{"name": "conv1", "channels": 16, "entries": entries}],
           "config": {"ratios": [0.1, 0.3, 0.5, 0.7], "criterion": "l1"}, "baseline_accuracy": 0.9}
    png = plot_heatmap(res, run_dir / "sensitivity.png")
    assert png.read_bytes().startswith(PNG_MAGIC)
    out = write_reports(run_dir)
    assert out["sensitivity"] == run_dir / "sensitivity.png"
    assert "![Sensitivity: accuracy drop of each group pruned alone](sensitivity.png)" in out["markdown"].read_text()
    assert "Sensitivity: accuracy drop of each group pruned alone" in out["html"].read_text()
