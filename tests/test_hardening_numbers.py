"""Numbers that enter through flags, target YAML and method settings: NaN, infinities and values
out of range get one ``error:`` line naming the setting and its range, exit 2, and nothing written.
JSON is written strictly (no bare NaN tokens)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import one_line
from typer.testing import CliRunner

from deploy_prune.checks import check_number
from deploy_prune.cli import app
from deploy_prune.config import Protocol
from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError
from deploy_prune.io import write_json
from deploy_prune.train import TrainConfig, train_model

runner = CliRunner()


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return " ".join(output.split())


@pytest.mark.parametrize("args, message", [
    (["--latency-ms", "nan"], "--latency-ms must be a finite number > 0, got nan"),
    (["--latency-ms", "inf"], "--latency-ms must be a finite number > 0, got inf"),
    (["--latency-ratio", "nan"], "--latency-ratio must be a finite number in (0, 1), got nan"),
    (["--flops-ratio", "-0.5"], "--flops-ratio must be a finite number in (0, 1), got -0.5"),
    (["--sparsity", "1.0", "--method", "magnitude"], "--sparsity must be a finite number in (0, 1), got 1.0"),
    (["--latency-ratio", "0.5", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--latency-ratio", "0.5", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--latency-ratio", "0.5", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--latency-ratio", "0.5", "--epochs", "-1"], "--epochs must be an integer >= 0, got -1"),
    (["--latency-ratio", "0.5", "--step-fraction", "inf"], "--step-fraction must be a finite number in [0, 100], got inf"),
    (["--latency-ratio", "0.5", "--tolerance", "nan"], "--tolerance must be a finite number in [0, 1], got nan"),
    (["--latency-ratio", "0.5", "--method", "sap", "-O", "beta=nan"], "beta must be a finite number, got nan"),
])
def test_compress_numbers_are_checked_before_anything_runs(tiny_run: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "o"
    res = runner.invoke(app, ["compress", "--weights", str(tiny_run), "--data", "digits", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in _one_error_line(res.output)
    assert not out.exists()  # refused before the run directory was made


@pytest.mark.parametrize("args, message", [
    (["--min-time", "inf"], "protocol min_time_s must be a finite number in [0, 600], got inf"),
    (["--min-time", "nan"], "protocol min_time_s must be a finite number in [0, 600], got nan"),
    (["--repeats", "0"], "protocol repeats must be an integer in [0, 10000000]"),
    (["--warmup", "-1"], "protocol warmup must be an integer in [0, 100000], got -1"),
])
def test_benchmark_protocol_numbers(tiny_onnx: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, ["benchmark", str(tiny_onnx), "--target", "cpu-ort-1t", *args])
    assert res.exit_code == 2, res.output
    text = _one_error_line(res.output)
    assert message in text or ("repeats" in message and "repeats >= rounds >= 1" in text), text


def test_protocol_built_in_code_is_checked_too() -> None:
    with pytest.raises(UserError, match="protocol min_time_s must be a finite number in .0, 600., got nan"):
        Protocol(min_time_s=math.nan)
    with pytest.raises(UserError, match="protocol rounds must be an integer"):
        Protocol(rounds=2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("value, kw, ok", [
    (0.5, dict(lo=0, hi=1), True), (math.nan, dict(lo=0), False), (-math.inf, {}, False), (True, {}, False),
    ("1", {}, False), (3, dict(integer=True, lo=1), True), (3.0, dict(integer=True), False), (None, dict(optional=True), True),
    (1.0, dict(lo=0, hi=1, hi_open=True), False), (0.0, dict(lo=0, lo_open=True), False),
])
def test_check_number(value: object, kw: dict, ok: bool) -> None:
    if ok:
        assert check_number("x", value, **kw) == value
    else:
        with pytest.raises(UserError, match="^x must be "):
            check_number("x", value, **kw)


def test_json_is_written_strictly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(tmp_path / "r.json", {"latency": math.nan})
    assert not (tmp_path / "r.json").exists() and not list(tmp_path.iterdir())  # no temp file left either
    write_json(tmp_path / "ok.json", {"latency": 1.5})
    assert json.loads((tmp_path / "ok.json").read_text(), parse_constant=_refuse) == {"latency": 1.5}


def _refuse(token: str) -> Callable[[], None]:
    raise AssertionError(f"non-strict JSON token {token}")


# -- A. numbers ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "message"), [
    ("train_limit", 0, r"--train-limit must be an integer >= 1, got 0"),
    ("train_limit", -5, r"--train-limit must be an integer >= 1, got -5"),
    ("train_limit", 2.5, r"--train-limit must be an integer >= 1, got 2.5"),
    ("train_limit", True, r"--train-limit must be an integer >= 1, got True"),
    ("val_fraction", 0.0, r"--val-fraction must be a finite number in \(0, 1\), got 0.0"),
    ("val_fraction", 1.0, r"--val-fraction must be a finite number in \(0, 1\), got 1.0"),
    ("val_fraction", -0.2, r"--val-fraction must be a finite number in \(0, 1\), got -0.2"),
    ("val_fraction", float("nan"), r"--val-fraction must be a finite number in \(0, 1\), got nan"),
    ("val_fraction", float("inf"), r"--val-fraction must be a finite number in \(0, 1\), got inf"),
    ("image_size", 0, r"--image-size must be an integer >= 1, got 0"),
    ("image_size", float("nan"), r"--image-size must be an integer >= 1, got nan"),
    ("val_limit", 0, r"val_limit must be an integer >= 1, got 0"),
    ("seed", 1.5, r"--seed must be an integer, got 1.5"),
])
def test_data_options_refuse_bad_numbers(field: str, value: Any, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        DataOptions(**{field: value})
    one_line(e)


@pytest.mark.parametrize(("kw", "message"), [
    ({"batch_size": 0}, r"--batch-size must be an integer >= 1, got 0"),  # was ZeroDivisionError
    ({"batch_size": -8}, r"--batch-size must be an integer >= 1, got -8"),
    ({"batch_size": 16.0}, r"--batch-size must be an integer >= 1, got 16.0"),
    ({"epochs": -1}, r"--epochs must be an integer >= 0, got -1"),
    ({"epochs": float("nan")}, r"--epochs must be an integer >= 0, got nan"),
    ({"lr": 0.0}, r"--lr must be a finite number > 0, got 0.0"),
    ({"lr": -0.1}, r"--lr must be a finite number > 0, got -0.1"),
    ({"lr": float("nan")}, r"--lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, r"--lr must be a finite number > 0, got inf"),
    ({"weight_decay": -1e-4}, r"--weight-decay must be a finite number >= 0, got -0.0001"),
    ({"weight_decay": float("nan")}, r"--weight-decay must be a finite number >= 0, got nan"),
    ({"seed": 0.5}, r"--seed must be an integer, got 0.5"),
    ({"optimizer": "adam"}, r"unknown optimizer 'adam'; valid: sgd, adamw"),
])
def test_train_refuses_bad_numbers_before_reading_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       kw: dict[str, Any], message: str) -> None:
    import deploy_prune.data

    def no_data(*a: Any, **k: Any) -> None:
        raise AssertionError("data was loaded before the settings were checked")

    monkeypatch.setattr(deploy_prune.data, "load_data", no_data)
    with pytest.raises(UserError, match=message) as e:
        train_model(tmp_path / "run", "tiny-cnn", "digits", DataOptions(train_limit=64), progress=False, **kw)
    one_line(e)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("kw", "message"), [
    ({"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\), got 1.0"),
    ({"label_smoothing": float("nan")}, r"label_smoothing must be a finite number in \[0, 1\), got nan"),
    ({"eval_batch_size": 0}, r"eval_batch_size must be an integer >= 1, got 0"),
])
def test_train_config_checks_library_only_settings(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainConfig(**kw)


def test_zero_epochs_means_evaluate_and_save(tmp_path: Path) -> None:
    """epochs=0 is meaningful (a --weights checkpoint made into a run directory), so it stays valid."""
    m = train_model(tmp_path / "run", "tiny-cnn", "digits", DataOptions(train_limit=64), epochs=0, batch_size=32,
                    progress=False)
    assert m["epochs_run"] == 0 and m["history"] == []
    assert (tmp_path / "run" / "model.pt").is_file()


def test_flow_epsilon_must_be_finite() -> None:

    from deploy_prune.train.flows import FlowStop

    with pytest.raises(UserError, match=r"-O eps must be a finite number >= 0, got nan"):
        FlowStop("if", float("nan"), [(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))])

