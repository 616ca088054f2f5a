"""deploy-prune compare: methods in separate processes, one leaderboard, failures reported not fatal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy_prune.cli import app


@pytest.mark.slow
def test_compare_leaderboard_with_a_failing_method(tiny_run: Path, quick_target_yaml: Callable[[int], Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, [
        "compare", "--methods", "uniform,network,sap,hybrid", "--weights", str(tiny_run), "--data", "digits",
        "--target", str(quick_target_yaml(1)), "--flops-ratio", "0.6", "--sparsity", "0.5", "--epochs", "0",
        "--train-limit", "300", "--profiles", str(tmp_path / "profiles"), "--out", str(out),
        "-O", "network:iterations=1", "-O", "network:retrain_epochs=0.5", "-O", "sap:p=2"])
    assert r.exit_code == 1, r.output  # a method failed; the leaderboard is still written
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {row["method"]: row for row in board["rows"]}
    assert rows["uniform"]["status"] == "ok" and rows["uniform"]["budget"]["kind"] == "flops_ratio"
    assert rows["uniform"]["flops_ratio"] <= 0.6 and rows["uniform"]["speedup"] > 0
    assert rows["network"]["status"] == "ok" and rows["network"]["budget"]["kind"] == "sparsity"
    assert abs(rows["network"]["sparsity"] - 0.5) < 2e-3 and rows["network"]["flops_ratio"] == 1.0
    assert rows["sap"]["status"] == "failed" and "0 < p < q" in rows["sap"]["reason"]  # its process failed alone
    assert rows["hybrid"]["status"] == "ok" and rows["hybrid"]["budget"]["kind"] == "flops_ratio"  # no latency budget given
    assert rows["uniform"]["baseline_ms"] == rows["network"]["baseline_ms"]  # measured together, one baseline
    md = (out / "leaderboard.md").read_text()
    assert "| uniform | structured | ok |" in md and "FAILED" in md and (out / "leaderboard.png").stat().st_size > 0


def test_compare_quick(tiny_run: Path, quick_target_yaml: Callable[[int], Path], tmp_path: Path) -> None:
    """Two methods, one failing in its own process: the other's row and the leaderboard still come."""
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, [
        "compare", "--methods", "uniform,sap", "--weights", str(tiny_run), "--data", "digits",
        "--target", str(quick_target_yaml(8)), "--flops-ratio", "0.6", "--epochs", "0", "--train-limit", "200",
        "--profiles", str(tmp_path / "profiles"), "--out", str(out)])
    assert r.exit_code == 1, r.output
    rows = {row["method"]: row for row in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert rows["uniform"]["status"] == "ok" and rows["uniform"]["flops_ratio"] <= 0.6 and rows["uniform"]["speedup"] > 0
    assert rows["sap"]["status"] == "failed" and "takes none of the given budgets; it takes --sparsity" in rows["sap"]["reason"]
    assert "| uniform | structured | ok |" in (out / "leaderboard.md").read_text()


def test_compare_bad_input(tiny_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["compare", "--methods", "uniform,nope", "--weights", str(tiny_run), "--sparsity", "0.5",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "nope" in r.output
    r = runner.invoke(app, ["compare", "--methods", "sap", "--weights", str(tiny_run), "--sparsity", "0.5",
                            "-O", "iterations=3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "METHOD:KEY=VALUE" in r.output
    r = runner.invoke(app, ["compare", "--methods", "sap", "--weights", str(tiny_run), "--sparsity", "0.5",
                            "-O", "sap:iteration=3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "has no setting iteration" in r.output


def test_a_crash_in_one_method_is_its_row_with_the_error_kind(tiny_run: Path, quick_target_yaml: Callable[[int], Path],
                                                              tmp_path: Path) -> None:
    """The worker sends back what happened (kind, message, exit code); nothing is scraped from stderr."""
    from deploy_prune.compare import CompareConfig, compare

    cfg = CompareConfig(methods=["sap"], out=tmp_path / "cmp", weights=str(tiny_run),
                        budgets={"sparsity": 0.5}, target=str(quick_target_yaml(8)),
                        settings={"epochs": 0, "profiles": tmp_path / "p"}, options={"sap": {"p": "abc"}})
    rows = {r["method"]: r for r in compare(cfg)["rows"]}  # test_compare_quick: a failure spares the other rows
    assert rows["sap"]["status"] == "failed" and rows["sap"]["reason"].startswith("TypeError: ")
    board = json.loads((tmp_path / "cmp" / "leaderboard.json").read_text())
    assert board["config"]["settings"]["profiles"] == str(tmp_path / "p")
