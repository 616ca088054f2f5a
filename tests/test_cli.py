from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy_prune.cli import app

runner = CliRunner()


def test_help_and_version() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "deploy-prune" in r.output
    r = runner.invoke(app, ["--help"])
    for verb in ("train", "export", "benchmark", "targets", "doctor", "models"):
        assert verb in r.output


def test_train_export_benchmark_through_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", "digits", "--epochs", "1", "--train-limit", "200",
                            "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (out / "model.pt").is_file()
    r = runner.invoke(app, ["export", str(out)])
    assert r.exit_code == 0, r.output
    assert "parity" in r.output and (out / "model.onnx").is_file()
    r = runner.invoke(app, ["benchmark", str(out / "model.onnx"), "--target", "cpu-ort-1t", "--json",
                            "--warmup", "2", "--repeats", "10", "--rounds", "2", "--min-time", "0"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["results"][0]["threads"] == 1 and res["results"][0]["latency_ms"]["median"] > 0
    # one table across targets, a device line for each
    r = runner.invoke(app, ["benchmark", str(out / "model.onnx"), "--target", "cpu-ort-1t", "--target", "cpu-ort",
                            "--warmup", "2", "--repeats", "10", "--rounds", "2", "--min-time", "0"])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.stdout.splitlines() if "model.onnx" in line]
    assert len(rows) == 2 and "cpu-ort-1t" in rows[0] and "1.00" in rows[0]
    assert r.stdout.count("onnxruntime 1.") == 2


def test_unknown_names_exit_2_with_valid_list(tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--model", "resnet21", "--out", str(tmp_path / "x"), "--epochs", "1"])
    assert r.exit_code == 2 and "valid names" in r.output and "resnet20" in r.output
    r = runner.invoke(app, ["train", "--data", "imagenet", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "fashion-mnist" in r.output
    r = runner.invoke(app, ["benchmark", "nothing.onnx", "--target", "nope"])
    assert r.exit_code == 2 and "cpu-ort" in r.output


def test_unwritable_out_and_missing_checkpoint(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(app, ["train", "--epochs", "1", "--train-limit", "50", "--out", str(blocker / "run"), "--no-progress"])
    assert r.exit_code == 2 and "cannot write" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "missing.pt")])
    assert r.exit_code == 2 and "not found" in r.output


def test_resume_without_checkpoint(tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "empty"), "--no-progress"])
    assert r.exit_code == 2 and "nothing to resume" in r.output


def test_shape_mismatch(tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--model", "vgg16", "--data", "synthetic:3x8x8", "--out", str(tmp_path / "r"),
                            "--no-progress"])
    assert r.exit_code == 2 and "cannot run on inputs of shape" in r.output


def test_an_error_naming_an_extra_keeps_its_brackets(tiny_onnx: Path, tmp_path: Path) -> None:
    """Error lines are printed through rich: "deploy-prune[tensorrt]" must not be read as markup."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: its backend does not fail")
    y = tmp_path / "trt.yaml"
    y.write_text("name: trt-local\nbackend: tensorrt\ndevice: cuda\n")
    res = runner.invoke(app, ["benchmark", str(tiny_onnx), "--target", str(y)])
    assert res.exit_code == 2 and "pip install 'deploy-prune[tensorrt]'" in res.output, res.output
    help_text = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "250"}).output
    assert "deploy-prune[tracking]" in help_text


def test_doctor_and_targets() -> None:
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["backends"]["onnxruntime"]["available"] and "cpu-ort" in rep["targets"]
    r = runner.invoke(app, ["targets"])
    assert r.exit_code == 0 and "cpu-ort-1t" in r.output and "(auto)" in r.output  # what auto resolved to
    r = runner.invoke(app, ["models"])
    assert "mobilenet_v3_large" in r.output


def test_compress_progress_keeps_one_bar_for_the_step_running() -> None:
    from deploy_prune.cli import _StageProgress

    with _StageProgress() as shown:
        shown.count("profile: layers", 1, 10)
        assert [t.description for t in shown.bars.tasks] == ["profile: layers"]
        shown.count("measure", 1, 5)  # a new step ends the last one's bar
        assert [(t.description, t.completed, t.total) for t in shown.bars.tasks] == [("measure", 1, 5)]
        shown.count("measure", 5, 5)
        assert not shown.bars.tasks
