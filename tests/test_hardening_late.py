"""Settings reach only the method that takes them: an unknown or foreign setting is an error that
names the method's settings, found before anything expensive runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.errors import UserError
from deploy_prune.methods import get_method

runner = CliRunner()


def _compress(tiny_run: Path, out: Path, *args: str) -> Any:
    return runner.invoke(app, ["compress", "--weights", str(tiny_run), "--data", "digits", "--out", str(out), *args])


def test_sap_through_the_cli_gets_only_what_was_given(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI once passed DF's --df-beta default (4.0) to every method, and SAP took it as its own beta.
    import deploy_prune.pipeline.stages as C

    seen: dict[str, Any] = {}

    def capture(name: str, **settings: Any) -> Any:
        seen.update(name=name, settings=settings)
        raise UserError("captured")

    monkeypatch.setattr(C, "get_method", capture)
    res = _compress(tiny_run, tmp_path / "o", "--method", "sap", "--sparsity", "0.5", "-O", "iterations=2")
    assert res.exit_code == 2 and "captured" in res.output
    assert seen == {"name": "sap", "settings": {"iterations": 2}}
    assert get_method("sap").settings()["beta"] == 0.9  # SAP's own default stays in force


@pytest.mark.parametrize("args, message", [
    (["--method", "sap", "--sparsity", "0.5", "--df-beta", "4"], "--df-* flags are settings of --method df, not sap"),
    (["--method", "uniform", "--latency-ratio", "0.5", "--amount", "0.2"], "--method uniform has no setting amount; it takes criterion"),
    (["--method", "sap", "--sparsity", "0.5", "-O", "nosuch=1"], "--method sap has no setting nosuch; it takes iterations"),
    (["--method", "deeplsp", "--latency-ratio", "0.5", "--criterion", "nosuchcrit"], "unknown criterion 'nosuchcrit'"),
    (["--method", "uniform", "--latency-ratio", "0.5", "--criterion", "nosuchcrit"], "unknown criterion 'nosuchcrit'"),
    (["--method", "loss-based", "--sparsity", "0.5", "--criterion", "l1"], "scores single weights by taylor, magnitude, random, not 'l1'"),
    (["--method", "deeplsp", "--latency-ratio", "0.5", "--tolerance", "2"], "--tolerance must be a finite number in [0, 1], got 2.0"),
])
def test_foreign_or_unknown_settings_are_refused_before_anything_runs(tiny_run: Path, tmp_path: Path, args: list[str],
                                                                      message: str) -> None:
    out = tmp_path / "o"
    res = _compress(tiny_run, out, *args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not out.exists()  # nothing measured, nothing written


def test_get_method_refuses_what_the_method_does_not_take() -> None:
    with pytest.raises(UserError, match="--method deeplsp has no setting beta; it takes criterion, amount, tolerance"):
        get_method("deeplsp", beta=4.0)
    assert get_method("deeplsp", criterion="l1").settings()["criterion"] == "l1"
