"""Target YAML values of the wrong type or meaning: the whole schema is validated in one place
(``config.TargetFile``), the first problem one line naming the file, the key and what it must be."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.errors import UserError
from deploy_prune.target import target_from_dict

runner = CliRunner()


def _one_error_line(output: str) -> str:
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return " ".join(output.split())


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
    ({"narrow_widths": "some"}, "narrow_widths must be a list of channel counts (e.g. [4, 8, 12]), [] for none, or auto, got 'some'"),
    ({"narrow_widths": [8, 0]}, "narrow_widths must be a list of channel counts (e.g. [4, 8, 12]), [] for none, or auto, got 0"),
    ({"agent": {"url": "http://127.0.0.1:1", "timeout_s": math.nan}}, "agent.timeout_s: input should be a finite number"),
    ({"agent": {"url": "http://127.0.0.1:1", "tokens": "x"}}, "unknown key 'agent.tokens'"),
])
def test_target_yaml_schema(raw: dict, message: str) -> None:
    with pytest.raises(UserError) as e:
        target_from_dict({"name": "x", "backend": "onnxruntime", **raw}, source="t.yaml")
    text = str(e.value)
    assert "\n" not in text and text.startswith("target 't.yaml': ") and message in text, text


def test_narrow_widths_default_to_auto_below_the_multiple() -> None:
    base = {"name": "x", "backend": "onnxruntime", "channel_multiple": 16}
    assert target_from_dict(base).width_space().narrow == (4, 8, 12)
    assert target_from_dict({**base, "narrow_widths": "auto"}).width_space().narrow == (4, 8, 12)
    assert target_from_dict({**base, "narrow_widths": []}).width_space().narrow == ()
    assert target_from_dict({**base, "narrow_widths": [8]}).width_space().narrow == (8,)
    with pytest.raises(UserError, match=r"narrow_widths \[24\] are not below the channel multiple 16"):
        target_from_dict({**base, "narrow_widths": [8, 24]})


def test_a_target_yaml_file_with_a_bad_value_is_one_line_through_the_cli(tiny_onnx: Path, tmp_path: Path) -> None:
    y = tmp_path / "t.yaml"
    y.write_text("name: t\nbackend: onnxruntime\nmin_time_s: .inf\n")
    res = runner.invoke(app, ["benchmark", str(tiny_onnx), "--target", str(y)])
    assert res.exit_code == 2
    assert "min_time_s: input should be a finite number, got inf" in _one_error_line(res.output)


def test_a_precision_the_backend_does_not_run_is_refused(tiny_onnx: Path) -> None:
    from deploy_prune.backends import get_backend

    t = target_from_dict({"name": "x", "backend": "onnxruntime", "precision": "fp16"})
    with pytest.raises(UserError, match="runs fp32 and int8 .QDQ. models, not precision 'fp16'"):
        get_backend("onnxruntime").load(tiny_onnx, t)

