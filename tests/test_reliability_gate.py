"""The CI gate trusts nothing it reads: ``--remeasure`` times only the model the export record
fingerprints; the report is validated and its budget verdict recomputed from its figures; bad
input (string latencies, deep nesting, a --junit that is a directory or a file of the run) is
one line and exit 2, with nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import snapshot
from onnx import TensorProto, helper
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.errors import UserError
from deploy_prune.latency.timing import quiet_estimate
from deploy_prune.report.gate import LATENCY_TOLERANCE, RUN_DIRS, RUN_FILES, budget_verdict, run_gate, validate_report

runner = CliRunner()
TARGET = "name: t\nbackend: onnxruntime\nthreads: 1\nwarmup: 2\nrepeats: 10\nrounds: 2\nmin_time_s: 0\n"
INCONSISTENT = "the report is damaged or was edited: rerun deploy-prune compress, or gate --remeasure"


def make_report(kind: str = "latency_ms") -> dict[str, Any]:
    """A report as compress writes one (the keys the gate reads, consistent with each other), met."""
    budgets = {
        "latency_ms": {"kind": "latency_ms", "value": 1.0, "latency_ms": 1.0, "cost_model": "latency", "cost_budget": 0.9},
        "latency_ratio": {"kind": "latency_ratio", "value": 0.5, "latency_ms": 1.0, "cost_model": "latency", "cost_budget": 0.9},
        "flops_ratio": {"kind": "flops_ratio", "value": 0.5, "latency_ms": None, "cost_model": "flops", "cost_budget": 2e6},
        "params_ratio": {"kind": "params_ratio", "value": 0.5, "latency_ms": None, "cost_model": "params", "cost_budget": 16000},
        "keep_ratio": {"kind": "keep_ratio", "value": 0.5, "latency_ms": None, "cost_model": "channels", "cost_budget": 48},
        "sparsity": {"kind": "sparsity", "value": 0.6, "latency_ms": None, "cost_model": "flops", "cost_budget": 0.6},
    }
    stats = {"median": 0.9, "p90": 1.0, "quiet": 0.85, "round_medians": [0.85, 0.86, 0.9], "n": 30, "rounds": 3}
    return {
        "schema_version": 1,
        "target": {"name": "quick", "backend": "onnxruntime"},
        "budget": budgets[kind],
        "method": {"name": "deeplsp", "settings": {}},
        "metric": {"name": "accuracy", "higher_is_better": True, "source": "top-1 accuracy on the validation split"},
        "baseline": {"accuracy": 0.93, "latency_ms": {**stats, "median": 2.0, "quiet": 2.0, "round_medians": [2.0, 2.1]},
                     "predicted_latency_ms": 1.9, "flops": 4e6, "params": 33000, "sparsity": 0.0},
        "final": {"accuracy": 0.92, "latency_ms": stats, "predicted_latency_ms": 0.8, "flops": 1.9e6, "params": 15900,
                  "sparsity": 0.6 if kind == "sparsity" else 0.0, "baseline_same_session_ms": 2.0},
        "met_budget": True,
        "budget_note": "within budget",
        "steps": [{"step": 1, "stage": "structured", "accuracy": 0.9, "flops": 2e6, "params": 16000}],
        "layers": [{"group": "a", "channels_before": 64, "channels_after": 32},
                   {"group": "b", "channels_before": 32, "channels_after": 16}],
        "config": {"ignore": []},
        "provenance": {"tool_version": "0.1.0"},
    }


def with_verdict(rep: dict[str, Any], cand: list[list[float]], base: list[list[float]] | None = None) -> dict[str, Any]:
    """``rep`` as schema 2 writes it: ``final.verdict`` pooling the round medians of both final
    measurements (``cand``; ``base`` for a ratio budget), the last of them in ``final.latency_ms``."""
    ratio = rep["budget"]["kind"] == "latency_ratio"
    pooled = quiet_estimate([v for m in cand for v in m])
    if ratio:
        assert base is not None
        pooled /= quiet_estimate([v for m in base for v in m])
    rep["schema_version"] = 2
    rep["final"]["latency_ms"] = {"median": float(np.median(cand[-1])), "quiet": quiet_estimate(cand[-1]),
                                  "round_medians": list(cand[-1])}
    rep["final"]["verdict"] = {"pooled": pooled, "limit": rep["budget"]["value" if ratio else "latency_ms"],
                               "candidate_round_medians": cand, "baseline_round_medians": base if ratio else None}
    return rep


def write(d: Path, rep: dict[str, Any] | str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "report.json").write_text(rep if isinstance(rep, str) else json.dumps(rep))
    return d / "report.json"


def error_line(r: Any) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback)."""
    out = r.output
    assert r.exit_code == 2 and "Traceback" not in out and not isinstance(r.exception, (RecursionError, OSError)), out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


# ---------------------------------------------------------------- 1. --remeasure times the recorded model only


def _relu_graph() -> bytes:
    """A one-node graph: what a swapped-in model.onnx that would time fast looks like."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 28, 28])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_remeasure_refuses_a_model_onnx_that_is_not_the_recorded_export(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "t.yaml"
    target.write_text(TARGET)
    rep = make_report()
    rep["budget"].update(value=1e3, latency_ms=1e3)  # no timing on a busy machine comes near it
    write(run, rep)
    args = ["gate", str(run), "--remeasure", "--target", str(target)]
    ok = runner.invoke(app, args)  # the exported model itself, fingerprinted by model.onnx.json: timed
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("PASS budget: latency ") and "re-measured on t" in ok.output

    (run / "model.onnx").write_bytes(_relu_graph())
    line = error_line(runner.invoke(app, args))
    assert line.startswith(f"error: {str(run / 'model.onnx')!r} is not the model the report describes: its SHA-256 ")
    assert "recorded in model.onnx.json" in line

    (run / "model.onnx.json").unlink()  # no record: nothing says which model the report describes
    line = error_line(runner.invoke(app, args))
    assert "its export record model.onnx.json is missing" in line


# ---------------------------------------------------------------- 2. a schema, and verdicts recomputed


@pytest.mark.parametrize("kind", ["latency_ms", "latency_ratio", "flops_ratio", "params_ratio", "keep_ratio", "sparsity"])
def test_consistent_reports_of_every_budget_kind_pass(tmp_path: Path, kind: str) -> None:
    res = run_gate(write(tmp_path, make_report(kind)))
    assert res.passed and [c.message for c in res.checks] == ["budget met: within budget (from the report)"]


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r["final"].update(accuracy=7.5),
     "final.accuracy is 7.5, but the report's metric (accuracy) is a fraction in [0, 1] (0.9 = 90 %)"),
    (lambda r: r["baseline"].update(accuracy=-5),
     "baseline.accuracy is -5, but the report's metric (accuracy) is a fraction in [0, 1] (0.9 = 90 %)"),
    (lambda r: r["final"].update(latency_ms={"quiet": "fast"}), 'final.latency_ms.quiet must be a number, got "fast"'),
    (lambda r: r["final"].update(latency_ms="fast"), 'final.latency_ms must be a number, got "fast"'),
    (lambda r: r["final"]["latency_ms"].update(median=-1), "final.latency_ms.median must be > 0 (ms), got -1"),
    (lambda r: r["final"]["latency_ms"]["round_medians"].append(0), "final.latency_ms.round_medians.3 must be > 0 (ms), got 0"),
    (lambda r: r["final"].update(flops=-1), "final.flops must be >= 0, got -1"),
    (lambda r: r["final"].update(params="many"), 'final.params must be a number, got "many"'),
    (lambda r: r["final"].update(sparsity=1.5), "final.sparsity must be <= 1, got 1.5"),
    (lambda r: r["budget"].update(kind="speed"), "budget.kind must be one of 'latency_ms', 'latency_ratio'"),
    (lambda r: r["budget"].update(value=True), "budget.value must be a number, got true"),
    (lambda r: r["budget"].update(latency_ms=100.0), "budget.latency_ms 100 is not budget.value (1)"),
    (lambda r: r["final"].update(deployed=[1, 2]), "final.deployed must be an object, got a list"),
    (lambda r: r.update(budget={"value": 1.0}), "budget.kind is missing;"),
])
def test_reports_out_of_type_or_range_are_one_line(tmp_path: Path, edit: Any, problem: str) -> None:
    rep = make_report()
    edit(rep)
    path = write(tmp_path, rep)
    before = snapshot(tmp_path)
    line = error_line(runner.invoke(app, ["gate", str(path), "--max-accuracy-drop", "0.5", "--junit", str(tmp_path / "g.xml")]))
    assert line.startswith(f"error: {str(path)!r}: {problem}"), line
    assert line.endswith("the report is damaged or was edited: rerun deploy-prune compress")
    assert snapshot(tmp_path) == before  # no JUnit written


def test_non_finite_numbers_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(make_report()).replace('"flops": 1900000.0', '"flops": NaN'))
    with pytest.raises(UserError, match=r"final\.flops must be a finite number, got NaN"):
        run_gate(path)


def test_a_metric_of_the_users_own_need_not_be_a_fraction(tmp_path: Path) -> None:
    rep = make_report()
    rep["metric"] = {"name": "psnr", "higher_is_better": True, "source": "evaluate callback"}
    rep["baseline"]["accuracy"], rep["final"]["accuracy"] = 31.5, 30.9
    assert validate_report(rep).final.accuracy == 30.9
    rep["metric"]["name"] = "top1_accuracy"
    with pytest.raises(UserError, match=r"baseline\.accuracy is 31\.5, but the report's metric \(top1_accuracy\) is a fraction"):
        validate_report(rep)


@pytest.mark.parametrize("kind, edit, figures", [
    ("latency_ms", lambda r: r["final"].update(latency_ms={"median": 10.0, "quiet": 10.0}),
     "final latency 10 ms > budget 1 ms (1000 % of it)"),
    ("latency_ratio", lambda r: r["final"].update(latency_ms=9.9),
     "final latency 9.9 ms / baseline 2 ms = 4.950 > budget 0.5 (990 % of it)"),
    ("flops_ratio", lambda r: r["final"].update(flops=3e6), "final FLOPs 3e+06 > 50 % of the baseline's 4e+06"),
    ("params_ratio", lambda r: r["final"].update(params=30000),
     "final params 30000 (29000 to 30000 in the pruned layers) > budget 16000"),
    ("keep_ratio", lambda r: r["layers"][0].update(channels_after=60), "76 of 96 channels kept > 50 %"),
    ("sparsity", lambda r: r["final"].update(sparsity=0.1), "sparsity 0.1000 < target 0.6000"),
])
def test_a_met_verdict_its_figures_contradict_fails(tmp_path: Path, kind: str, edit: Any, figures: str) -> None:
    rep = make_report(kind)
    edit(rep)
    r = runner.invoke(app, ["gate", str(write(tmp_path, rep))])
    slack = f", beyond the {100 * LATENCY_TOLERANCE:.0f} % re-measurement tolerance" if kind.startswith("latency") else ""
    assert r.exit_code == 1
    assert r.output.splitlines() == [f"FAIL budget: the report says met, but its own figures do not meet it: {figures}{slack}; "
                                     f"{INCONSISTENT}"]

    # Explicit limits do not make the report's own verdict go away.
    res = run_gate(write(tmp_path, rep), min_accuracy=0.5)
    assert [(c.name, c.passed) for c in res.checks] == [("accuracy", True), ("budget_verdict", False)]


def test_a_not_met_verdict_its_figures_contradict_says_so(tmp_path: Path) -> None:
    rep = make_report("flops_ratio")
    rep["met_budget"] = False
    res = run_gate(write(tmp_path, rep))
    assert not res.passed and res.checks[0].message.startswith(
        "budget: the report says NOT met, but its own figures meet it: final FLOPs 1.9e+06 <= 50 % of the baseline's 4e+06")


def test_derived_budget_figures_must_agree_and_a_met_verdict_needs_its_figure(tmp_path: Path) -> None:
    rep = make_report("latency_ratio")
    rep["budget"]["latency_ms"] = 5.0  # what --remeasure would compare with: 50 % of a 2 ms baseline is 1 ms
    with pytest.raises(UserError, match=r"budget\.latency_ms 5 is not 50 % of the baseline's 2 ms \(1\)"):
        validate_report(rep)
    rep = make_report("params_ratio")
    rep["budget"]["cost_budget"] = 20000  # half of 40000 parameters in the pruned layers, of 33000 in all
    with pytest.raises(UserError, match="budget.cost_budget 20000 is 50 % of 40000 parameters, more than the baseline's 33000"):
        validate_report(rep)
    rep = make_report("flops_ratio")
    del rep["final"]["flops"]
    res = run_gate(write(tmp_path, rep))
    assert [c.message for c in res.checks] == [
        "budget: the report says met but lacks final.flops, the figure that decides it; the report is damaged or was "
        "edited: rerun deploy-prune compress"]


def test_latency_within_the_remeasurement_tolerance_fits_either_verdict(tmp_path: Path) -> None:
    """compress pooled two sittings and the report keeps the second: a second sitting a little
    over the budget is a met report's, and one scaled by a contended session's baseline too."""
    rep = make_report()
    rep["final"]["latency_ms"] = {"median": 1.1, "quiet": 1.1}
    assert budget_verdict(validate_report(rep)).met is None and run_gate(write(tmp_path, rep)).passed
    rep["final"]["latency_ms"] = {"median": 1.6, "quiet": 1.6}
    rep["final"]["baseline_same_session_ms"] = 3.0  # the whole session ran 1.5x slow
    assert budget_verdict(validate_report(rep)).met is None
    rep["final"]["baseline_same_session_ms"] = 2.0
    assert budget_verdict(validate_report(rep)).met is False


# Both measurements' rounds pool to 0.86 ms (1 ms budget, 43 % of the 2 ms baseline), or to 1.02 ms
# (2 % over the budget, 51 % of the baseline against a 50 % budget), the last within 10 % of the first.
UNDER = [[0.85, 0.86, 0.9], [0.86, 0.86, 0.87]]
OVER = [[1.02, 1.1, 1.02], [1.02, 1.04, 1.02]]
BASE = [[2.0, 2.1], [2.0, 2.0]]


@pytest.mark.parametrize("kind", ["latency_ms", "latency_ratio"])
def test_a_schema_2_latency_verdict_is_recomputed_exactly(tmp_path: Path, kind: str) -> None:
    ok = with_verdict(make_report(kind), UNDER, BASE)
    res = run_gate(write(tmp_path, ok))
    assert res.passed and [c.message for c in res.checks] == ["budget met: within budget (from the report)"]
    assert budget_verdict(validate_report(ok)).exact

    over = with_verdict(make_report(kind), OVER, BASE)  # 2 %: inside the schema 1 tolerance, yet over
    assert over["final"]["verdict"]["pooled"] == (1.02 if kind == "latency_ms" else 0.51)
    r = runner.invoke(app, ["gate", str(write(tmp_path, over))])
    assert r.exit_code == 1
    figures = ("pooled final latency 1.02 ms > budget 1 ms" if kind == "latency_ms"
               else "pooled ratio to the baseline 0.51 > budget 0.5")
    assert r.output.splitlines() == [f"FAIL budget: the report says met, but its own figures do not meet it: {figures} "
                                     f"(102 % of it; quiet rounds of 2 measurements); {INCONSISTENT}"]
    res = run_gate(write(tmp_path, over), max_accuracy_drop=0.5)  # explicit limits keep the verdict check
    assert [(c.name, c.passed) for c in res.checks] == [("accuracy_drop", True), ("budget_verdict", False)]

    over["met_budget"], over["budget_note"] = False, "over budget"  # the verdict compress gave it: not met, consistent
    res = run_gate(write(tmp_path, over))
    assert [(c.passed, c.message) for c in res.checks] == [(False, "budget NOT met: over budget (from the report)")]
    assert run_gate(write(tmp_path, over), max_accuracy_drop=0.5).passed

    # The same figures in a schema 1 report (the last measurement only) fit either verdict.
    old = with_verdict(make_report(kind), OVER, BASE)
    old["schema_version"] = 1
    del old["final"]["verdict"]
    assert budget_verdict(validate_report(old)).met is None and run_gate(write(tmp_path, old)).passed


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r["final"]["verdict"].update(pooled=0.85),
     "final.verdict.pooled 0.85 is not the quiet estimate of its round medians (0.86)"),
    (lambda r: r["final"]["verdict"].update(limit=2.0), "final.verdict.limit 2 is not budget.latency_ms (1)"),
    (lambda r: r["final"]["verdict"]["candidate_round_medians"][0].__setitem__(0, 0.5),
     "final.verdict.pooled 0.86 is not the quiet estimate of its round medians (0.68)"),
    (lambda r: r["final"]["latency_ms"].update(round_medians=[0.8]),
     "final.latency_ms.round_medians are not the last measurement's in final.verdict.candidate_round_medians"),
    (lambda r: r["final"]["verdict"].update(baseline_round_medians=BASE),
     "final.verdict.baseline_round_medians must be null (a latency_ms budget pools the candidate alone)"),
    (lambda r: r["final"]["verdict"].update(candidate_round_medians=[]),
     "final.verdict.candidate_round_medians is invalid"),
    (lambda r: r["final"]["verdict"]["candidate_round_medians"][0].append(-1.0),
     "final.verdict.candidate_round_medians.0.3 must be > 0 (ms), got -1.0"),
])
def test_a_schema_2_verdict_block_that_disagrees_with_itself_is_refused(tmp_path: Path, edit: Any, problem: str) -> None:
    rep = with_verdict(make_report(), UNDER)
    edit(rep)
    line = error_line(runner.invoke(app, ["gate", str(write(tmp_path, rep))]))
    assert line.startswith(f"error: {str(tmp_path / 'report.json')!r}: {problem}"), line
    assert line.endswith("the report is damaged or was edited: rerun deploy-prune compress")


def test_a_schema_2_latency_report_without_its_verdict_block_fails(tmp_path: Path) -> None:
    rep = with_verdict(make_report(), UNDER)
    del rep["final"]["verdict"]  # nothing to fall back on: the tolerance is for schema 1 reports alone
    assert [c.message for c in run_gate(write(tmp_path, rep)).checks] == [
        "budget: the report says met but lacks final.verdict, the figure that decides it; the report is damaged or was "
        "edited: rerun deploy-prune compress"]


# ---------------------------------------------------------------- 3. bad input is one line, exit 2, nothing written


def test_deeply_nested_json_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[" * 200_000 + "]" * 200_000)
    assert "nests too deeply" in error_line(runner.invoke(app, ["gate", str(path)]))
    rep = json.dumps(make_report()).replace('"steps": [', '"steps": [' + "[" * 200_000 + "]" * 200_000 + ", ")
    assert "nests too deeply" in error_line(runner.invoke(app, ["gate", str(write(tmp_path, rep))]))
    path = write(tmp_path, '{"schema_version": 1, "x": ' + "9" * 5000 + "}")  # more digits than Python converts
    assert "is not a readable deploy-prune report" in error_line(runner.invoke(app, ["gate", str(path)]))


def test_junit_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "run", make_report())
    (tmp_path / "ci").mkdir()
    before = snapshot(tmp_path)
    line = error_line(runner.invoke(app, ["gate", str(path), "--junit", str(tmp_path / "ci")]))
    assert line == f"error: --junit {str(tmp_path / 'ci')!r} is a directory; give a file name such as {str(tmp_path / 'ci' / 'gate.xml')!r}"
    assert snapshot(tmp_path) == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = snapshot(tmp_path)
    assert "is a file, not a directory" in error_line(runner.invoke(app, ["gate", str(path), "--junit", str(blocker / "g.xml")]))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", [*RUN_FILES, "checkpoints/state.pt", "finetune/final/checkpoints/last.pt", ".replaced-run/report.json",
                                  "report.xml"])
def test_junit_never_replaces_a_file_of_the_run(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    path = write(run, make_report())
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    if not (run / name).exists():
        (run / name).write_bytes(b"the run's")
    before = snapshot(tmp_path)
    monkeypatch.chdir(run)  # a relative --junit names the same file
    line = error_line(runner.invoke(app, ["gate", str(path), "--junit", name]))
    assert "the JUnit XML would replace it" in line and repr(name) in line
    assert snapshot(tmp_path) == before


def test_junit_that_is_the_report_under_another_name_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "run", make_report())
    os.link(path, tmp_path / "gate.xml")  # a hard link elsewhere is still the report
    before = snapshot(tmp_path)
    line = error_line(runner.invoke(app, ["gate", str(path), "--junit", str(tmp_path / "gate.xml")]))
    assert line == f"error: --junit {str(tmp_path / 'gate.xml')!r} is the report itself: the JUnit XML would replace it; " \
                   "give another file such as 'gate.xml'"
    assert snapshot(tmp_path) == before
    ok = runner.invoke(app, ["gate", str(path), "--junit", str(tmp_path / "run" / "gate.xml")])  # beside it: fine
    assert ok.exit_code == 0 and (tmp_path / "run" / "gate.xml").read_text().startswith("<?xml")


def test_the_gates_list_of_run_files_covers_the_pipelines() -> None:
    from deploy_prune.pipeline import stages
    from deploy_prune.report import PLOTS
    from deploy_prune.train import RUN_FILES as TRAIN_FILES

    assert set(stages.RUN_FILES) <= set(RUN_FILES) and set(stages.RUN_DIRS) <= set(RUN_DIRS)
    assert getattr(stages, "ASIDE", RUN_DIRS[0]) in RUN_DIRS  # where an --overwrite keeps the run it replaces
    assert {f"{p}.png" for p in PLOTS} <= set(RUN_FILES)
    assert {n for n in TRAIN_FILES if "/" not in n} <= set(RUN_FILES)

