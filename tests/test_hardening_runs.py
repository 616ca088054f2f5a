"""Run directories, exports and checkpoints under bad input: existing results are never replaced
without being asked, an export and its record are replaced together, foreign checkpoints are
never executed, and a resume that does not fit the run is refused. Every refusal is one line
and leaves the directory exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError
from deploy_prune.export import export_record, export_run
from deploy_prune.models import build_model
from deploy_prune.models.checkpoint import FORMAT, load_checkpoint, load_model, save_checkpoint
from deploy_prune.train import train_model

OPTS = DataOptions(train_limit=600)  # what tiny_run was trained with (3 epochs, batch 32)


def _one_line(e: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _snapshot(d: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory under ``d``: equal snapshots, untouched directory."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


@pytest.fixture
def run(tiny_run: Path, tiny_onnx: Path, tmp_path: Path) -> Path:
    """A private copy of the finished 3-epoch tiny run, exported (model.onnx + model.onnx.json)."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest)
    assert (dest / "model.onnx").is_file() and (dest / "model.onnx.json").is_file()
    return dest


# -- D. train over an existing run ---------------------------------------------------------------

def test_train_refuses_a_finished_run(run: Path) -> None:
    before = _snapshot(run)
    with pytest.raises(UserError, match=r"already holds a run \(model\.pt, metrics\.json, model\.onnx, .*\); "
                                        r"pass --resume to continue it, --overwrite to replace it") as e:
        train_model(run, "tiny-cnn", "digits", OPTS, epochs=1, batch_size=32, progress=False)
    _one_line(e)
    assert _snapshot(run) == before


def test_train_refuses_an_interrupted_run(run: Path, tmp_path: Path) -> None:
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.pt", interrupted / "checkpoints" / "last.pt")
    before = _snapshot(interrupted)
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints/last\.pt\); pass --resume"):
        train_model(interrupted, "tiny-cnn", "digits", OPTS, epochs=1, batch_size=32, progress=False)
    assert _snapshot(interrupted) == before


def test_resume_and_overwrite_together_are_refused(run: Path) -> None:
    before = _snapshot(run)
    with pytest.raises(UserError, match="pass only one"):
        train_model(run, None, "digits", OPTS, epochs=4, resume=True, overwrite=True, progress=False)
    assert _snapshot(run) == before


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
    before = _snapshot(run)
    with pytest.raises(UserError, match="not found"):
        train_model(run, "tiny-cnn", f"imagefolder:{tmp_path / 'nowhere'}", OPTS, epochs=1, overwrite=True,
                    progress=False)
    assert _snapshot(run) == before  # the old run goes only once the new one's inputs are good


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
    before = _snapshot(run)
    with pytest.raises(UserError, match=r"already holds an export; pass --overwrite to replace it") as e:
        export_run(run)
    _one_line(e)
    assert _snapshot(run) == before


def test_export_refuses_a_foreign_file(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.onnx"
    other.write_text("someone else's file")
    with pytest.raises(UserError, match=r"already exists and its record 'other\.onnx\.json' is missing or does not "
                                        r"match it .*; pass --overwrite") as e:
        export_run(run, out=other)
    _one_line(e)
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


# -- C. export against data that does not fit the checkpoint ---------------------------------------

def _checkpoint(path: Path, classes: int, channels: int, data_spec: str = "synthetic") -> Path:
    meta = {"model": {"spec": "tiny-cnn", "num_classes": classes, "in_channels": channels},
            "input_shape": [channels, 32, 32],
            "data": {"spec": data_spec, "mean": [0.0] * channels, "std": [1.0] * channels}}
    return save_checkpoint(path, build_model("tiny-cnn", classes, channels), meta)


@pytest.mark.parametrize(("classes", "channels", "data", "message"), [
    (10, 3, "digits", r"--data digits has 1-channel images but .* takes 3 channel\(s\); pass the --data it was trained on"),
    (3, 1, "digits", r"--data digits has 10 classes but .* predicts 3; pass the --data it was trained on"),
    (10, 1, "synthetic:3x32x32", r"--data synthetic:3x32x32 has 3-channel images but .* takes 1 channel"),
])
def test_export_refuses_data_that_does_not_fit(tmp_path: Path, classes: int, channels: int, data: str,
                                               message: str) -> None:
    ck = _checkpoint(tmp_path / "ck.pt", classes, channels)
    out = tmp_path / "new" / "model.onnx"
    with pytest.raises(UserError, match=message) as e:
        export_run(ck, out=out, data_spec=data)
    _one_line(e)
    assert not (tmp_path / "new").exists()  # no ONNX file, no record, no empty directory


def test_export_refuses_recorded_data_that_does_not_fit(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path / "ck.pt", 10, 3, data_spec="digits")  # e.g. a hand-edited or stale record
    with pytest.raises(UserError, match="has 1-channel images but"):
        export_run(ck)
    assert not (tmp_path / "ck.onnx").exists()


def test_export_refuses_input_shape_with_other_channels(run: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--input-shape 3,32,32 has 3 channel\(s\) but .* takes 1; give C = 1"):
        export_run(run, out=tmp_path / "x.onnx", input_shape="3,32,32")
    assert not (tmp_path / "x.onnx").exists()


def test_export_of_a_whole_module_checks_classes_from_its_output(tmp_path: Path) -> None:
    torch.save(build_model("tiny-cnn", 3, 1), tmp_path / "whole.pt")
    with pytest.raises(UserError, match="has 10 classes but .* predicts 3"):
        export_run(tmp_path / "whole.pt", data_spec="digits", input_shape="1,32,32", trust=True)
    assert not (tmp_path / "whole.onnx").exists()


def test_export_with_fitting_data_still_works(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path / "ck.pt", 10, 3)
    rec = export_run(ck, data_spec="synthetic:3x32x32")
    assert rec["parity_ok"] and rec["parity_samples"] > 2 and export_record(tmp_path / "ck.onnx") == rec


# -- E. checkpoints that are not ours --------------------------------------------------------------

class _Plant:
    """Unpickling this would create ``marker``: proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(("kind", "message"), [
    ("pickle", r"is not a deploy-prune checkpoint: it is a plain Python pickle, which can run code"),
    ("torch.save", r"is not a deploy-prune checkpoint: it contains pickled Python objects \(\S*open\) that "
                   r"loading would run as code"),
])
def test_foreign_pickle_is_refused_and_never_run(tmp_path: Path, kind: str, message: str) -> None:
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    if kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": _Plant(marker)}, f)
    else:
        torch.save({"state_dict": _Plant(marker)}, path)
    loaders = [
        lambda: load_model(path),
        lambda: export_run(path, input_shape="1,32,32"),
        lambda: train_model(tmp_path / "run", None, "digits", DataOptions(train_limit=64), weights=str(path),
                            epochs=1, progress=False),
    ]
    for load in loaders:
        with pytest.raises(UserError, match=message) as e:
            load()
        msg = _one_line(e)
        assert "--trust-checkpoint" in msg and "weights_only" not in msg and "corrupt" not in msg
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "evil.onnx").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"not a checkpoint at all", "corrupt or not a torch file"),
    (b"", r"corrupt or not a torch file \(EOFError\)"),
])
def test_damaged_files_are_called_corrupt_not_trusted(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        load_model(tmp_path / "bad.pt")
    assert "--trust-checkpoint" not in _one_line(e)


@pytest.mark.parametrize(("ckpt", "message"), [
    ({"format": FORMAT, "version": 1, "state_dict": {}}, "is a damaged deploy-prune checkpoint"),
    ({"format": FORMAT, "version": 1, "model": {"spec": "tiny-cnn"}, "state_dict": {}}, "is a damaged deploy-prune"),
    ({"format": FORMAT, "version": 99, "model": {}, "state_dict": {}}, r"version 99 checkpoint from a newer deploy-prune"),
])
def test_our_format_with_missing_parts(tmp_path: Path, ckpt: dict[str, Any], message: str) -> None:
    torch.save(ckpt, tmp_path / "ck.pt")
    with pytest.raises(UserError, match=message) as e:
        load_model(tmp_path / "ck.pt")
    _one_line(e)


# -- F. resume on a run it does not fit ------------------------------------------------------------

@pytest.mark.parametrize(("kw", "message"), [
    ({"model_spec": "resnet20", "epochs": 4},
     r"holds a 'tiny-cnn' run, not 'resnet20'; resume it with --model tiny-cnn \(or no --model\), or train resnet20"),
    ({"epochs": 1}, r"already has 3 epochs, more than the 1 asked; give --epochs 3 or more to continue it, or a new --out"),
    ({"epochs": 0}, r"already has 3 epochs, more than the 0 asked"),
    ({"epochs": 4, "optimizer": "adamw"}, r"was trained with --optimizer sgd, not adamw"),
    ({"epochs": 4, "options": DataOptions(train_limit=600, image_size=16)},
     r"was trained on 10 classes of shape \[1, 32, 32\], but this data has 10 classes of shape \[1, 16, 16\]"),
])
def test_resume_that_does_not_fit_the_run(run: Path, kw: dict[str, Any], message: str) -> None:
    before = _snapshot(run)
    spec, opts = kw.pop("model_spec", None), kw.pop("options", OPTS)
    with pytest.raises(UserError, match=message) as e:
        train_model(run, spec, "digits", opts, batch_size=32, resume=True, progress=False, **kw)
    assert str(run) in _one_line(e)
    assert _snapshot(run) == before  # metrics.json still says 3 epochs; nothing rewritten
