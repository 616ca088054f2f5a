from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.data import DataOptions, load_data
from deploy_prune.errors import UserError
from deploy_prune.models.checkpoint import load_model
from deploy_prune.sensitivity import SensitivityConfig, fingerprint, load_sensitivity, run_sensitivity

runner = CliRunner()


def test_sensitivity_json_heatmap_and_workers_agree(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sens"
    r = runner.invoke(app, ["sensitivity", "--weights", str(tiny_run), "--data", "digits", "--criterion", "l1",
                            "--ratios", "0.25,0.75", "--val-samples", "200", "--score-batches", "2",
                            "--workers", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "sensitivity.json").read_text())
    assert (out / "sensitivity.png").stat().st_size > 1000
    assert res["val_subset"] == 200 and len(res["groups"]) == 4
    for g in res["groups"]:
        assert [e["ratio"] for e in g["entries"]] == [0.25, 0.75]
        small, big = g["entries"]
        assert big["kept_channels"] < small["kept_channels"] < g["channels"]
        assert big["flops_saved"] > small["flops_saved"] > 0
        assert small["latency_saved_ms"] is None  # no latency profile yet
    mean_drop = [sum(g["entries"][i]["accuracy_drop"] for g in res["groups"]) for i in (0, 1)]
    assert mean_drop[1] > mean_drop[0]  # removing more channels hurts more

    # one process gives the same numbers as two
    model, _ = load_model(tiny_run)
    data = load_data("digits", DataOptions())
    cfg = SensitivityConfig(criterion="l1", ratios=(0.25, 0.75), val_samples=200, score_batches=2)
    single = run_sensitivity(model, data, cfg)
    assert [e["accuracy"] for g in single["groups"] for e in g["entries"]] == \
        [e["accuracy"] for g in res["groups"] for e in g["entries"]]
    assert single["fingerprint"] == res["fingerprint"]
    assert load_sensitivity(out / "sensitivity.json", res["fingerprint"])["baseline_accuracy"] == res["baseline_accuracy"]
    with pytest.raises(UserError, match="other weights or settings"):
        load_sensitivity(out / "sensitivity.json", fingerprint(model, SensitivityConfig(criterion="l2"), "digits", [], 1))


def test_sensitivity_bad_input(tiny_run: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["sensitivity", "--weights", str(tiny_run), "--ratios", "0.5,1.2", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "in (0, 1)" in r.output
    r = runner.invoke(app, ["sensitivity", "--weights", str(tiny_run), "--criterion", "oracle", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "taylor" in r.output
    r = runner.invoke(app, ["sensitivity", "--weights", str(tiny_run), "--ignore", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--ignore names no layer" in r.output
    assert not (tmp_path / "sensitivity.json").exists()


def test_sensitivity_measures_the_narrow_widths_of_the_width_space(tiny_run: Path) -> None:
    """A group of one channel block (16 of 16) is measured below it when the space has narrow widths:
    rounding to the block alone would leave it unmeasured, and the allocator would price it as free."""
    from deploy_prune.widths import WidthSpace

    model, _ = load_model(tiny_run)
    data = load_data("digits", DataOptions())
    cfg = SensitivityConfig(criterion="l1", ratios=(0.5, 0.75), val_samples=100, score_batches=1)
    aligned = run_sensitivity(model, data, cfg, channel_multiple=16)
    spaced = run_sensitivity(model, data, cfg, channel_multiple=WidthSpace(16, (4, 8, 12)))
    first = {r: next(g for g in res["groups"] if g["channels"] == 16) for r, res in (("aligned", aligned), ("spaced", spaced))}
    assert [e["kept_channels"] for e in first["aligned"]["entries"]] == [16, 16]
    assert [e["accuracy_drop"] for e in first["aligned"]["entries"]] == [0.0, 0.0]
    assert [e["kept_channels"] for e in first["spaced"]["entries"]] == [8, 4]
    assert first["spaced"]["entries"][1]["accuracy_drop"] > 0
    assert spaced["width_space"] == {"multiple": 16, "narrow": [4, 8, 12]}
    assert spaced["fingerprint"] != aligned["fingerprint"]  # a file from the aligned space is not reused
    assert aligned["fingerprint"] == fingerprint(model, cfg, "digits", [], WidthSpace(16))


def test_sensitivity_after_adaptive_bn(tiny_run: Path) -> None:
    """``bn_batches`` re-estimates BatchNorm statistics after each cut: a deep cut of the stream then
    loses less than with the stale ones, and the file is told apart from a raw one."""
    model, _ = load_model(tiny_run)
    data = load_data("digits", DataOptions())
    raw_cfg = SensitivityConfig(criterion="l1", ratios=(0.75,), val_samples=200, score_batches=2)
    bn_cfg = SensitivityConfig(criterion="l1", ratios=(0.75,), val_samples=200, score_batches=2, bn_batches=2)
    raw, bn = run_sensitivity(model, data, raw_cfg), run_sensitivity(model, data, bn_cfg)
    drops = [(r["entries"][0]["accuracy_drop"], b["entries"][0]["accuracy_drop"]) for r, b in zip(raw["groups"], bn["groups"], strict=True)]
    assert sum(b for _, b in drops) < sum(r for r, _ in drops), drops
    assert raw["fingerprint"] != bn["fingerprint"] and bn["config"]["bn_batches"] == 2
    assert raw["fingerprint"] == fingerprint(model, raw_cfg, "digits", [], 1)
    with pytest.raises(UserError, match="--bn-batches must be from 0 to --score-batches"):
        SensitivityConfig(score_batches=2, bn_batches=3)


def test_compress_reuses_a_sensitivity_made_for_its_target_widths(tiny_run: Path, tmp_path: Path,
                                                                   quick_target_yaml: Callable[[int], Path]) -> None:
    """``--sensitivity`` is reused when it was measured at the target's widths (16-channel blocks
    and the narrow widths below them), and refused with the fix when it was not."""
    target = str(quick_target_yaml(16))
    common = ["--weights", str(tiny_run), "--data", "digits", "--criterion", "l1", "--val-samples", "100", "--score-batches", "2"]
    for name, extra in (("s16", ["--target", target]), ("s1", [])):
        r = runner.invoke(app, ["sensitivity", *common, *extra, "--profiles", str(tmp_path / "p"), "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    s16 = json.loads((tmp_path / "s16" / "sensitivity.json").read_text())
    first = next(g for g in s16["groups"] if g["channels"] == 16)
    assert {e["kept_channels"] for e in first["entries"]} == {16, 12, 8, 4}

    def compress(sens: str, out: str) -> Any:
        return runner.invoke(app, ["compress", "--weights", str(tiny_run), "--data", "digits", "--train-limit", "300",
                                   "--target", target, "--flops-ratio", "0.6", "--method", "deeplsp", "--criterion", "l1", "--epochs", "0",
                                   "--sensitivity", str(tmp_path / sens), "--profiles", str(tmp_path / "p"), "--out", str(tmp_path / out)])

    r = compress("s16", "c16")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c16" / "report.json").read_text())["sensitivity"]["reused"] is True
    r = compress("s1", "c1")
    assert r.exit_code == 2 and f"target widths; rerun sensitivity with --target {target}" in r.output, r.output
