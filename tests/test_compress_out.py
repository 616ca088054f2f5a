"""One run per directory: compress refuses a directory that holds a run unless told to continue
(--resume) or replace it (--overwrite), and a refused or failed start leaves no directory behind."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from deploy_prune.cli import app

runner = CliRunner()


def _args(tiny_run: Path, target: Path, out: Path, *more: str) -> list[str]:
    return ["compress", "--weights", str(tiny_run), "--data", "digits", "--target", str(target), "--flops-ratio", "0.6",
            "--epochs", "0", "--steps", "1", "--train-limit", "200", "--profiles", str(out.parent / "p"), "--out", str(out), *more]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_finished_run_is_not_overwritten_without_a_word(tiny_run: Path, quick_target_yaml: Callable[[int], Path],
                                                          tmp_path: Path) -> None:
    target = quick_target_yaml(8)
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"met_budget": True}))
    (out / "model.onnx").write_bytes(b"the old run's model")
    (out / "accuracy_vs_latency.png").write_bytes(b"old plot")
    (out / "mine.txt").write_text("not the tool's")
    before = _snapshot(out)
    res = runner.invoke(app, _args(tiny_run, target, out))
    assert res.exit_code == 2 and "already holds a compress run (report.json)" in res.output
    assert "--resume" in res.output and "--overwrite" in res.output
    assert _snapshot(out) == before
    both = runner.invoke(app, _args(tiny_run, target, out, "--resume", "--overwrite"))
    assert both.exit_code == 2 and "give one of them" in both.output and _snapshot(out) == before

    res = runner.invoke(app, _args(tiny_run, target, out, "--overwrite"))
    assert res.exit_code == 0, res.output
    assert (out / "model.onnx").read_bytes() != b"the old run's model"
    assert (out / "accuracy_vs_latency.png").read_bytes() != b"old plot"  # made again by this run
    assert (out / "mine.txt").read_text() == "not the tool's"  # only the tool's own files are replaced
    assert json.loads((out / "report.json").read_text())["budget"]["kind"] == "flops_ratio"


def test_a_failed_start_leaves_no_empty_directory(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "new"
    res = runner.invoke(app, ["compress", "--weights", str(tiny_run), "--data", "digits", "--target", "no-such-target",
                              "--flops-ratio", "0.5", "--out", str(out)])
    assert res.exit_code == 2 and "unknown target 'no-such-target'" in res.output
    assert not out.exists()
