"""Numbers that enter through flags, target YAML and method settings: NaN, infinities and values
out of range get one ``error:`` line naming the setting and its range, exit 2, and nothing written.
JSON is written strictly (no bare NaN tokens)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy_prune.checks import check_number
from deploy_prune.cli import app
from deploy_prune.config import Protocol
from deploy_prune.errors import UserError
from deploy_prune.io import write_json
from deploy_prune.target import target_from_dict

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


@pytest.mark.parametrize("raw, message", [
    ({"min_time_s": math.inf}, "min_time_s: input should be a finite number, got inf"),
    ({"min_time_s": math.nan}, "min_time_s: input should be a finite number, got nan"),
    ({"min_time_s": 1e9}, "min_time_s: input should be less than or equal to 600"),
    ({"threads": [1, 2]}, "threads: input should be a valid integer, got [1, 2]"),
    ({"device": ["cpu"]}, "device: input should be a valid string, got ['cpu']"),
    ({"input_shape": "abc"}, "input_shape: input should be a valid list, got 'abc'"),
    ({"input_shape": [3, 0, 32]}, "input_shape.1: input should be greater than or equal to 1, got 0"),
    ({"cache_kib": -1}, "cache_kib: input should be greater than or equal to 1, got -1"),
    ({"precision": "int3"}, "precision: input should be 'fp32', 'fp16', 'bf16' or 'int8', got 'int3'"),
    ({"batch": 0}, "batch: input should be greater than or equal to 1, got 0"),
    ({"threads": True}, "threads: input should be a valid integer, got True"),
    ({"channel_multiple": 0}, "channel_multiple must be an integer from 1 to 1024 or auto, got 0"),
    ({"agent": {"url": "http://127.0.0.1:1", "timeout_s": math.nan}}, "agent.timeout_s: input should be a finite number"),
    ({"agent": {"url": "http://127.0.0.1:1", "tokens": "x"}}, "unknown key 'agent.tokens'"),
])
def test_target_yaml_schema(raw: dict, message: str) -> None:
    with pytest.raises(UserError) as e:
        target_from_dict({"name": "x", "backend": "onnxruntime", **raw}, source="t.yaml")
    text = str(e.value)
    assert "\n" not in text and text.startswith("target 't.yaml': ") and message in text, text


def test_a_target_yaml_file_with_a_bad_value_is_one_line_through_the_cli(tiny_onnx: Path, tmp_path: Path) -> None:
    y = tmp_path / "t.yaml"
    y.write_text("name: t\nbackend: onnxruntime\nmin_time_s: .inf\n")
    res = runner.invoke(app, ["benchmark", str(tiny_onnx), "--target", str(y)])
    assert res.exit_code == 2
    assert "min_time_s: input should be a finite number, got inf" in _one_error_line(res.output)


def test_a_precision_the_backend_does_not_run_is_refused(tiny_onnx: Path) -> None:
    from deploy_prune.backends import get_backend

    t = target_from_dict({"name": "x", "backend": "onnxruntime", "precision": "int8"})
    with pytest.raises(UserError, match="runs the ONNX model as exported .fp32., not precision 'int8'"):
        get_backend("onnxruntime").load(tiny_onnx, t)


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
