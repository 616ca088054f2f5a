"""Existing results are never overwritten without a word: train, export and compress refuse a
directory or file that holds a result unless told to resume or overwrite it; an export and its
record are replaced together; temp files of a killed write are cleaned up by the next run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import OPTS, one_line, snapshot
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError
from deploy_prune.export import export_record, export_run
from deploy_prune.models.checkpoint import FORMAT, load_checkpoint
from deploy_prune.train import train_model

runner = CliRunner()






# -- D. train over an existing run ---------------------------------------------------------------

def test_train_refuses_a_finished_run(run: Path) -> None:
    before = snapshot(run)
    with pytest.raises(UserError, match=r"already holds a run \(model\.pt, metrics\.json, model\.onnx, .*\); "
                                        r"pass --resume to continue it, --overwrite to replace it") as e:
        train_model(run, "tiny-cnn", "digits", OPTS, epochs=1, batch_size=32, progress=False)
    one_line(e)
    assert snapshot(run) == before


def test_train_refuses_an_interrupted_run(run: Path, tmp_path: Path) -> None:
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.pt", interrupted / "checkpoints" / "last.pt")
    before = snapshot(interrupted)
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints/last\.pt\); pass --resume"):
        train_model(interrupted, "tiny-cnn", "digits", OPTS, epochs=1, batch_size=32, progress=False)
    assert snapshot(interrupted) == before


def test_resume_and_overwrite_together_are_refused(run: Path) -> None:
    before = snapshot(run)
    with pytest.raises(UserError, match="pass only one"):
        train_model(run, None, "digits", OPTS, epochs=4, resume=True, overwrite=True, progress=False)
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_and_removes_its_stale_export(run: Path) -> None:
    old_model = (run / "model.pt").read_bytes()
    m = train_model(run, "tiny-cnn", "digits", DataOptions(train_limit=64), epochs=1, batch_size=32,
                    overwrite=True, progress=False)
    assert m["epochs"] == 1 and len(m["history"]) == 1
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert (run / "model.pt").read_bytes() != old_model
    assert not (run / "model.onnx").exists() and not (run / "model.onnx.json").exists()  # stale: removed


def test_overwrite_with_bad_input_keeps_the_old_run(run: Path, tmp_path: Path) -> None:
    before = snapshot(run)
    with pytest.raises(UserError, match="not found"):
        train_model(run, "tiny-cnn", f"imagefolder:{tmp_path / 'nowhere'}", OPTS, epochs=1, overwrite=True,
                    progress=False)
    assert snapshot(run) == before  # the old run goes only once the new one's inputs are good


def test_resume_that_trains_removes_the_stale_export(run: Path) -> None:
    m = train_model(run, None, "digits", OPTS, epochs=4, batch_size=32, resume=True, progress=False)
    assert m["epochs"] == 4 and m["epochs_run"] == 4
    assert not (run / "model.onnx").exists() and not (run / "model.onnx.json").exists()


def test_resume_of_a_finished_run_keeps_its_export(run: Path) -> None:
    m = train_model(run, None, "digits", OPTS, epochs=3, batch_size=32, resume=True, progress=False)
    assert m["epochs"] == 3 and m["epochs_run"] == 3
    assert export_record(run / "model.onnx") is not None  # same weights: the export still describes them


def test_temps_of_a_killed_write_are_removed_by_the_next_run(run: Path) -> None:
    litter = [run / ".model.pt.k1ll3d00.tmp", run / ".metrics.json.abcd_123.tmp",
              run / "checkpoints" / ".last.pt.zz9yx8w7.tmp", run / ".model.onnx.q1w2e3r4.tmp"]
    for t in litter:
        t.write_bytes(b"half a file")
    keep = [run / "notes.tmp", run / ".model.pt.backup"]  # not temp files of ours
    for k in keep:
        k.write_text("mine")
    train_model(run, None, "digits", OPTS, epochs=3, batch_size=32, resume=True, progress=False)
    assert not any(t.exists() for t in litter)
    assert all(k.read_text() == "mine" for k in keep)


# -- D. export over an existing file ---------------------------------------------------------------

def test_export_refuses_an_existing_export(run: Path) -> None:
    before = snapshot(run)
    with pytest.raises(UserError, match=r"already holds an export; pass --overwrite to replace it") as e:
        export_run(run)
    one_line(e)
    assert snapshot(run) == before


def test_export_refuses_a_foreign_file(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.onnx"
    other.write_text("someone else's file")
    with pytest.raises(UserError, match=r"already exists and its record 'other\.onnx\.json' is missing or does not "
                                        r"match it .*; pass --overwrite") as e:
        export_run(run, out=other)
    one_line(e)
    assert other.read_text() == "someone else's file" and not (tmp_path / "other.onnx.json").exists()


def test_export_out_must_be_a_new_file(run: Path) -> None:
    with pytest.raises(UserError, match="is a directory; give a file name"):
        export_run(run, out=run)
    with pytest.raises(UserError, match="is the checkpoint being exported"):
        export_run(run, out=run / "model.pt", overwrite=True)
    assert load_checkpoint(run)["format"] == FORMAT


def test_export_overwrite_replaces_onnx_and_record_together(run: Path) -> None:
    rec = export_run(run, batch=2, overwrite=True)
    assert rec["input_shape"][0] == 2
    data = (run / "model.onnx").read_bytes()
    assert rec["onnx_sha256"] == hashlib.sha256(data).hexdigest() and rec["onnx_bytes"] == len(data)
    assert export_record(run / "model.onnx") == rec


class _Killed(BaseException):
    """Stands in for the process dying: not an Exception, so nothing converts it."""


def test_crash_between_the_two_renames_is_detected(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace, calls = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:  # the ONNX file is in place; its record is not
            raise _Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        export_run(run, batch=2, overwrite=True)  # a different graph, so the old record cannot describe it
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((run / "model.onnx.json").read_text())["input_shape"][0] == 1  # the old record
    assert export_record(run / "model.onnx") is None  # ... which no longer matches the ONNX file
    with pytest.raises(UserError, match="record 'model.onnx.json' is missing or does not match it"):
        export_run(run)
    rec = export_run(run, batch=2, overwrite=True)
    assert export_record(run / "model.onnx") == rec


def test_export_removes_temps_of_a_killed_export(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    out.mkdir()
    litter = [out / ".model.onnx.k1ll3d00.tmp", out / ".model.onnx.json.k1ll3d00.tmp"]
    for t in litter:
        t.write_bytes(b"partial")
    export_run(run, out=out / "model.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.json"]


# -- compress over an existing run ---------------------------------------------------------------

def _args(tiny_run: Path, target: Path, out: Path, *more: str) -> list[str]:
    return ["compress", "--weights", str(tiny_run), "--data", "digits", "--target", str(target), "--flops-ratio", "0.6",
            "--epochs", "0", "--steps", "1", "--train-limit", "200", "--profiles", str(out.parent / "p"), "--out", str(out), *more]




@pytest.mark.slow  # a real --overwrite run; the set-aside mechanism: test_reliability_rundir.py
def test_a_finished_run_is_not_overwritten_without_a_word(tiny_run: Path, quick_target_yaml: Callable[[int], Path],
                                                          tmp_path: Path) -> None:
    target = quick_target_yaml(8)
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"met_budget": True}))
    (out / "model.onnx").write_bytes(b"the old run's model")
    (out / "accuracy_vs_latency.png").write_bytes(b"old plot")
    (out / "mine.txt").write_text("not the tool's")
    before = snapshot(out)
    res = runner.invoke(app, _args(tiny_run, target, out))
    assert res.exit_code == 2 and "already holds a compress run (report.json)" in res.output
    assert "--resume" in res.output and "--overwrite" in res.output
    assert snapshot(out) == before
    both = runner.invoke(app, _args(tiny_run, target, out, "--resume", "--overwrite"))
    assert both.exit_code == 2 and "give one of them" in both.output and snapshot(out) == before

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
