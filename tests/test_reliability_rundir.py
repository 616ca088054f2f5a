"""Run directories are never lost to ``--overwrite``, to an output that is an input, to a second
writer, to a failed API run or to a full disk.

The compress runs here stop the real pipeline at its first stage (``stages._pipeline`` replaced
by one that writes a few files, then returns or fails as the test needs): what is tested is the
run directory's handling (claim, lock, overwrite, clean-up), which happens around the stages.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import OPTS, one_line, snapshot
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import deploy_prune as dp
import deploy_prune.train as train_mod
from deploy_prune.cli import app
from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError
from deploy_prune.export import export_run
from deploy_prune.io import LOCK_NAME, RunLock, atomic_write
from deploy_prune.pipeline import CompressConfig, stages
from deploy_prune.train import train_model

runner = CliRunner()
ASIDE = ".replaced-run"
OLD = {"report.json": b'{"met_budget": true}', "model.pt": b"old checkpoint", "model.onnx": b"old model",
       "checkpoints/state.pt": b"old state", "widths.png": b"old plot", "sensitivity.json": b"{}"}


class _Killed(BaseException):
    """Stands in for the process dying: not an Exception, so nothing converts it."""


def _old_run(out: Path) -> Path:
    """A finished compress run (its files' bytes stand in for the real ones) and a file of the user's."""
    for name, data in {**OLD, "mine.txt": b"not the tool's"}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return out


def _fake_pipeline(writes: dict[str, bytes], fail: BaseException | None = None,
                   during: Callable[[Any], None] | None = None) -> Callable[..., dict[str, Any]]:
    """The pipeline cut short: ``during(run)``, then ``writes`` into the run, then ``fail`` or a report."""
    def pipeline(run: Any, method: Any, t_start: float) -> dict[str, Any]:
        if during is not None:
            during(run)
        for name, data in writes.items():
            (run.out / name).parent.mkdir(parents=True, exist_ok=True)
            (run.out / name).write_bytes(data)
        if fail is not None:
            raise fail
        return {"met_budget": True, "run_dir": str(run.out), "final": {}}
    return pipeline


def _args(weights: Path | str, target: Path, out: Path, *more: str) -> list[str]:
    return ["compress", "--weights", str(weights), "--data", "digits", "--target", str(target), "--flops-ratio", "0.6",
            "--epochs", "0", "--steps", "1", "--train-limit", "200", "--profiles", str(out.parent / "p"), "--out",
            str(out), *more]


def _cfg(weights: Path, target: Path, out: Path, **kw: Any) -> CompressConfig:
    return CompressConfig(out=out, weights=str(weights), data="digits", data_options=DataOptions(train_limit=200),
                          target=str(target), flops_ratio=0.6, epochs=0, steps=1, profiles=out.parent / "p", **kw)


def _error(res: Any) -> str:
    """The CLI's error: its last line, asserted to be the only line that is not progress."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output, res.output
    assert lines and lines[-1].startswith("error: "), res.output
    return str(lines[-1])


@pytest.fixture
def target(quick_target_yaml: Callable[[int], Path]) -> Path:
    return quick_target_yaml(8)


# -- 1. --overwrite replaces the old run only once the new one finishes ----------------------------

@pytest.mark.parametrize("bad, message", [
    (("--weights", "nowhere/model.pt"), "error: checkpoint 'nowhere/model.pt' not found"),
    (("--target", "no-such-target"), "error: unknown target 'no-such-target'"),
])
def test_overwrite_with_bad_input_keeps_the_finished_run(tiny_run: Path, target: Path, tmp_path: Path,
                                                         bad: tuple[str, str], message: str) -> None:
    out = _old_run(tmp_path / "run")
    before = snapshot(out)
    args = _args(tiny_run, target, out, "--overwrite")
    args[args.index(bad[0]) + 1] = bad[1]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert _error(res).startswith(message)
    assert snapshot(out) == before


def test_overwrite_sets_the_old_run_aside_until_the_new_one_finishes(tiny_run: Path, target: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = _old_run(tmp_path / "run")
    old = {k: v for k, v in snapshot(out).items() if k != "mine.txt"}
    seen: dict[str, Any] = {}

    def during(run: Any) -> None:
        seen["aside"] = snapshot(out / ASIDE)
        seen["out"] = sorted(p.name for p in out.iterdir())

    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({"model.pt": b"new", "report.json": b"{}"}, during=during))
    stages.compress(_cfg(tiny_run, target, out, overwrite=True))
    assert seen["aside"] == {**old, ".command": b"compress\n"}  # the whole old run, while the new one runs
    assert seen["out"] == [LOCK_NAME, ASIDE, "mine.txt"]
    assert snapshot(out) == {"mine.txt": b"not the tool's", "model.pt": b"new", "report.json": b"{}"}


def test_a_failed_overwrite_puts_the_old_run_back(tiny_run: Path, target: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = _old_run(tmp_path / "run")
    before = snapshot(out)
    diverged = UserError(f"training diverged; the last good checkpoint is kept in {out}/checkpoints "
                         "(resume with --resume and a lower --lr)")
    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({"model.pt": b"new", "checkpoints/state.pt": b"new"}, diverged))
    res = runner.invoke(app, _args(tiny_run, target, out, "--overwrite"))
    assert res.exit_code == 2
    assert _error(res) == f"error: training diverged (the previous run in {str(out)!r} is restored as it was)"
    assert snapshot(out) == before

    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({"model.pt": b"new"}, RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        stages.compress(_cfg(tiny_run, target, out, overwrite=True))
    assert snapshot(out) == before


def test_a_killed_overwrite_leaves_the_old_run_aside(tiny_run: Path, target: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = _old_run(tmp_path / "run")
    before = snapshot(out)
    old = {k: v for k, v in before.items() if k != "mine.txt"}
    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({"checkpoints/state.pt": b"new state"}, _Killed()))
    with pytest.raises(_Killed):
        stages.compress(_cfg(tiny_run, target, out, overwrite=True))
    assert snapshot(out / ASIDE) == {**old, ".command": b"compress\n"}
    assert (out / "checkpoints" / "state.pt").read_bytes() == b"new state" and not (out / LOCK_NAME).exists()

    aside = str(out / ASIDE)
    res = runner.invoke(app, _args(tiny_run, target, out))
    assert res.exit_code == 2
    assert _error(res) == (f"error: {str(out)!r} holds a run an interrupted --overwrite was making (the run it replaces "
                           f"is kept in {aside!r}); pass --resume to continue it, --overwrite to start it again, or "
                           f"move the files in {aside!r} back into {str(out)!r}")

    # --overwrite again, failing: the old run comes back from where the killed run left it
    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({"model.pt": b"newer"}, UserError("no luck")))
    with pytest.raises(UserError, match=r"^no luck \(the previous run in .* is restored as it was\)$"):
        stages.compress(_cfg(tiny_run, target, out, overwrite=True))
    assert snapshot(out) == before


def test_resume_finishes_an_interrupted_overwrite(tiny_run: Path, target: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = _old_run(tmp_path / "run")
    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({"checkpoints/state.pt": b"new state"}, _Killed()))
    with pytest.raises(_Killed):
        stages.compress(_cfg(tiny_run, target, out, overwrite=True))
    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({"model.pt": b"new", "report.json": b"{}"}))
    stages.compress(_cfg(tiny_run, target, out, resume=True))
    assert snapshot(out) == {"checkpoints": None, "checkpoints/state.pt": b"new state", "mine.txt": b"not the tool's",
                             "model.pt": b"new", "report.json": b"{}"}


def test_overwrite_help_says_where_the_old_run_waits() -> None:
    res = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "400"})
    assert "once the new run finishes: until then the old run waits in OUT/.replaced-run/" in res.output


TRAINED = {"model.pt": b"old checkpoint", "metrics.json": b'{"epochs": 3}', "model.onnx": b"old model",
           "model.onnx.json": b"{}", "checkpoints/last.pt": b"old last"}
TINY = DataOptions(train_limit=64)


def _old_train_run(out: Path) -> Path:
    """A finished train run (its files' bytes stand in for the real ones) and a file of the user's."""
    for name, data in {**TRAINED, "mine.txt": b"not the tool's"}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return out


def _fake_fit(writes: dict[str, bytes], fail: BaseException | None = None,
              during: Callable[[Path], None] | None = None) -> Callable[..., dict[str, Any]]:
    """``train.fit`` cut short: ``during(out)``, then ``writes`` into the run, then ``fail`` or metrics."""
    def fit(model: Any, data: Any, cfg: Any, out_dir: Path, meta: Any, **kw: Any) -> dict[str, Any]:
        out = Path(out_dir)
        if during is not None:
            during(out)
        for name, data_ in writes.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data_)
        if fail is not None:
            raise fail
        return {"val_accuracy": 0.5, "epochs": cfg.epochs}
    return fit


def test_train_overwrite_sets_the_old_run_aside_until_the_new_one_finishes(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = _old_train_run(tmp_path / "run")
    seen: dict[str, Any] = {}

    def during(d: Path) -> None:
        seen["aside"] = snapshot(d / ASIDE)
        seen["out"] = sorted(p.name for p in d.iterdir())

    new = {"model.pt": b"new", "metrics.json": b"{}", "checkpoints/last.pt": b"new last"}
    monkeypatch.setattr(train_mod, "fit", _fake_fit(new, during=during))
    train_model(out, "tiny-cnn", "digits", TINY, epochs=1, overwrite=True, progress=False)
    assert seen["aside"] == {**TRAINED, "checkpoints": None, ".command": b"train\n"}
    assert seen["out"] == [LOCK_NAME, ASIDE, "mine.txt"]
    assert snapshot(out) == {**new, "checkpoints": None, "mine.txt": b"not the tool's"}  # no stale model.onnx


def test_a_failed_train_overwrite_puts_the_old_run_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _old_train_run(tmp_path / "run")
    before = snapshot(out)
    monkeypatch.setattr(train_mod, "fit", _fake_fit({"checkpoints/last.pt": b"new"},
                                                    UserError("training diverged (loss nan) at epoch 1; lower --lr")))
    with pytest.raises(UserError) as e:
        train_model(out, "tiny-cnn", "digits", TINY, epochs=1, overwrite=True, progress=False)
    assert one_line(e) == (f"training diverged (loss nan) at epoch 1; lower --lr (the previous run in {str(out)!r} is "
                           "restored as it was)")
    assert snapshot(out) == before

    monkeypatch.setattr(train_mod, "fit", _fake_fit({"model.pt": b"new"}, RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):
        train_model(out, "tiny-cnn", "digits", TINY, epochs=1, overwrite=True, progress=False)
    assert snapshot(out) == before


def test_a_killed_train_overwrite_leaves_the_old_run_aside_for_train_alone(tiny_run: Path, target: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = _old_train_run(tmp_path / "run")
    before = snapshot(out)
    monkeypatch.setattr(train_mod, "fit", _fake_fit({"checkpoints/last.pt": b"new last"}, _Killed()))
    with pytest.raises(_Killed):
        train_model(out, "tiny-cnn", "digits", TINY, epochs=1, overwrite=True, progress=False)
    assert snapshot(out / ASIDE) == {**TRAINED, "checkpoints": None, ".command": b"train\n"}

    aside = str(out / ASIDE)
    with pytest.raises(UserError) as e:
        train_model(out, "tiny-cnn", "digits", TINY, epochs=1, progress=False)
    assert one_line(e) == (f"{str(out)!r} holds a run an interrupted --overwrite was making (the run it replaces is "
                           f"kept in {aside!r}); pass --resume to continue it, --overwrite to start it again, or move "
                           f"the files in {aside!r} back into {str(out)!r}")
    for more in ({"overwrite": True}, {"resume": True}):  # compress never takes train's run for its own
        with pytest.raises(UserError) as e:
            stages.compress(_cfg(tiny_run, target, tmp_path / "run", **more))
        assert one_line(e) == (f"{aside!r} holds the train run that an interrupted train --overwrite is replacing; "
                               "continue it with deploy-prune train --resume, start it again with --overwrite, or "
                               "choose another --out")

    monkeypatch.setattr(train_mod, "fit", _fake_fit({"model.pt": b"newer"}, UserError("no luck")))
    with pytest.raises(UserError, match=r"^no luck \(the previous run in .* is restored as it was\)$"):
        train_model(out, "tiny-cnn", "digits", TINY, epochs=1, overwrite=True, progress=False)
    assert snapshot(out) == before


def test_train_refuses_a_compress_run_set_aside(tiny_run: Path, target: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = _old_run(tmp_path / "run")
    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({}, _Killed()))  # killed before its first checkpoint
    with pytest.raises(_Killed):
        stages.compress(_cfg(tiny_run, target, out, overwrite=True))
    before = snapshot(out)
    with pytest.raises(UserError, match=r"holds the compress run that an interrupted compress --overwrite is replacing; "
                                        r"continue it with deploy-prune compress --resume"):
        train_model(out, "tiny-cnn", "digits", TINY, epochs=1, overwrite=True, progress=False)
    assert snapshot(out) == before


# -- 2. an output is never an input, nor a file of another kind -------------------------------------

@pytest.mark.parametrize("weights", ["{run}", "{run}/model.pt"])
@pytest.mark.parametrize("more", [(), ("--overwrite",)])
def test_compress_refuses_to_write_over_its_own_weights(run: Path, target: Path, weights: str, more: tuple[str, ...]) -> None:
    before = snapshot(run)
    given = weights.format(run=run)
    res = runner.invoke(app, _args(given, target, run, *more))
    assert res.exit_code == 2
    shown = "" if given.endswith("model.pt") else f" ({run / 'model.pt'})"
    assert _error(res) == (f"error: --out {str(run)!r} would overwrite --weights {given!r}{shown}, an input of this "
                           "command; choose another --out")
    assert snapshot(run) == before


def test_compress_refuses_a_directory_of_another_commands_run(tiny_run: Path, run: Path, target: Path) -> None:
    before = snapshot(run)
    res = runner.invoke(app, _args(tiny_run, target, run, "--overwrite"))
    assert res.exit_code == 2
    assert _error(res) == (f"error: {str(run)!r} holds model.onnx, model.onnx.json, model.pt, which compress writes, "
                           "but no compress run (no report.json or checkpoints/state.pt); choose another --out")
    assert snapshot(run) == before


def test_benchmark_out_replaces_only_an_earlier_benchmark_result(run: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    before = snapshot(run)
    quick = ["--warmup", "0", "--repeats", "2", "--rounds", "1", "--min-time", "0", "--target", "cpu-ort-1t"]
    onnx = str(run / "model.onnx")
    os.link(onnx, tmp_path / "link.onnx")
    for out, message in [
        (run / "model.pt", "already exists and is not a benchmark result (it holds a checkpoint)"),
        (run / "metrics.json", "already exists and is not a benchmark result (it holds JSON)"),
        (run / "model.onnx", f"would overwrite model {onnx!r}, an input of this command"),
        (tmp_path / "link.onnx", f"would overwrite model {onnx!r}, an input of this command"),  # a hard link to it
        (run, "is a directory; give a file name"),
    ]:
        res = runner.invoke(app, ["benchmark", onnx, "--out", str(out), *quick])
        assert res.exit_code == 2
        assert _error(res).startswith(f"error: --out {str(out)!r} {message}")
    assert snapshot(run) == before
    res_json = tmp_path / "bench.json"
    for _ in range(2):  # the second run replaces the first's result
        res = runner.invoke(app, ["benchmark", onnx, "--out", str(res_json), "--json", *quick])
        assert res.exit_code == 0, res.output
    assert json.loads(res_json.read_text())["results"][0]["model"] == onnx


def test_trtexec_out_refuses_a_checkpoint(run: Path) -> None:
    before = snapshot(run)
    res = runner.invoke(app, ["trtexec", str(run / "metrics.json"), "--out", str(run / "model.pt")])
    assert res.exit_code == 2
    assert _error(res) == (f"error: --out {str(run / 'model.pt')!r} already exists and is not an earlier trtexec result "
                           "(it holds a checkpoint); choose another --out, or remove the file yourself")
    assert snapshot(run) == before


def test_export_out_refuses_checkpoints_reports_and_their_names(run: Path, tmp_path: Path) -> None:
    before = snapshot(run)
    with pytest.raises(UserError, match=r"already exists and holds JSON, not an ONNX model; choose another --out") as e:
        export_run(run, out=run / "metrics.json", overwrite=True)
    one_line(e)
    with pytest.raises(UserError, match=r"would replace '.*metrics\.json' with its export record, and that file is not "
                                        r"one \(it holds JSON\)"):
        export_run(run, out=run / "metrics")
    with pytest.raises(UserError, match=r"already exists and holds a checkpoint, not an ONNX model"):
        export_run(run, out=run / "checkpoints" / "last.pt", overwrite=True)
    assert snapshot(run) == before


def test_train_refuses_its_own_weights_and_a_compress_run(run: Path, tmp_path: Path) -> None:
    before = snapshot(run)
    with pytest.raises(UserError, match=r"^--out .* would overwrite --weights .*, an input of this command; choose "
                                        r"another --out$") as e:
        train_model(run, None, "digits", OPTS, epochs=1, weights=str(run), overwrite=True, progress=False)
    one_line(e)
    assert snapshot(run) == before
    compressed = _old_run(tmp_path / "compressed")
    before = snapshot(compressed)
    with pytest.raises(UserError, match=r"holds a compress run \(report\.json\); train into another --out"):
        train_model(compressed, "tiny-cnn", "digits", OPTS, epochs=1, overwrite=True, progress=False)
    assert snapshot(compressed) == before


# -- 3. one writer at a time ---------------------------------------------------------------------------

def _holder_line(out: Path, pid: int, command: str) -> str:
    return (rf"'{re.escape(str(out))}' is being written by another process \(pid {pid} on {re.escape(platform.node())}, "
            rf"started \S+: {re.escape(command)}\); wait for it to finish, or choose another --out")


def test_a_second_writer_gets_one_line_naming_the_holder(tiny_run: Path, target: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunLock(out, command="deploy-prune compress --out run"):
        res = runner.invoke(app, _args(tiny_run, target, out))
        assert res.exit_code == 2
        assert re.fullmatch("error: " + _holder_line(out, os.getpid(), "deploy-prune compress --out run"), _error(res))
        with pytest.raises(UserError, match=_holder_line(out, os.getpid(), "deploy-prune compress --out run")):
            train_model(out, "tiny-cnn", "digits", OPTS, epochs=1, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert list(out.iterdir()) == []  # released: the lock file goes with it


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = ("import sys, time; from deploy_prune.io import RunLock; RunLock(sys.argv[1], command='holder').acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=_holder_line(out, holder.pid, "holder")):
            RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).is_file()  # a killed holder leaves its file, but not its lock
    with RunLock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_a_run_unlocks_its_directory_however_it_ends(tiny_run: Path, target: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for i, fail in enumerate([None, UserError("no"), _Killed()]):
        out = tmp_path / f"run{i}"
        monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({"checkpoints/state.pt": b"s"}, fail))
        try:
            stages.compress(_cfg(tiny_run, target, out))
        except (UserError, _Killed):
            pass
        assert not (out / LOCK_NAME).exists()
        with RunLock(out):
            pass


# -- 4. a failed API run leaves nothing half-made ---------------------------------------------------

class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().mean((2, 3)))


def _api(**kw: Any) -> dp.Result:
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    args: dict[str, Any] = dict(target="cpu-ort-1t", budget=dp.Flops(0.5), method="uniform", train=ds, val=ds,
                                epochs=0, steps=1)
    return dp.compress(_Net(), torch.zeros(1, 1, 8, 8), **{**args, **kw})


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where ``out=None`` runs make their temporary directories, for this test alone."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_a_failed_api_run_leaves_no_directory(tmp_path: Path, temp_root: Path) -> None:
    for out in (tmp_path / "run", None):
        with pytest.raises(dp.UserError, match=r"^evaluate returned nan; it must return a finite number") as e:
            _api(evaluate=lambda m: float("nan"), out=out, profiles=tmp_path / "p")
        one_line(e)
    assert not (tmp_path / "run").exists()
    assert list(temp_root.iterdir()) == []


def test_a_failed_api_run_in_a_temporary_directory_removes_it(temp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline({"checkpoints/state.pt": b"s"}, UserError("no luck")))
    with pytest.raises(dp.UserError) as e:
        _api()
    assert str(e.value) == ("no luck (the run's temporary directory is removed; pass out= to keep the checkpoints of a "
                            "failed run for resume=True)")
    assert list(temp_root.iterdir()) == []


def test_an_api_run_in_a_temporary_directory_keeps_only_its_result(temp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "_pipeline", _fake_pipeline(
        {"model.onnx": b"m", "model.pt": b"c", "report.json": b"{}", "checkpoints/state.pt": b"s",
         "finetune/final/checkpoints/last.pt": b"f"}))
    result = _api()
    assert result.out.parent == temp_root and result.out.name.startswith("deploy-prune-")
    assert sorted(p.name for p in result.out.iterdir()) == ["model.onnx", "model.pt", "report.json"]
    assert result.paths == {"onnx": result.out / "model.onnx", "checkpoint": result.out / "model.pt",
                            "report": result.out / "report.json"}


# -- 5. a full disk is one line ----------------------------------------------------------------------

def _full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fails, then", [("state.pt", ""), ("report.json", " with --resume")])
def test_a_full_disk_in_compress_is_one_line(tiny_run: Path, target: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, fails: str, then: str) -> None:
    from deploy_prune.io import write_json

    out = tmp_path / "run"

    def pipeline(run: Any, method: Any, t_start: float) -> dict[str, Any]:
        if fails == "state.pt":
            monkeypatch.setattr(torch, "save", _full)
        run.checkpoint("baseline")  # the first file a run writes
        monkeypatch.setattr(Path, "write_text", _full)
        write_json(run.out / "report.json", {})
        raise AssertionError("unreachable")

    monkeypatch.setattr(stages, "_pipeline", pipeline)
    res = runner.invoke(app, _args(tiny_run, target, out))
    monkeypatch.undo()
    assert res.exit_code == 2
    path = out / "checkpoints" / "state.pt" if fails == "state.pt" else out / "report.json"
    assert _error(res) == f"error: no space left on device writing {path}; free space and rerun{then}"
    assert not list(out.rglob(".*.tmp"))  # no half-written temp file
    assert out.exists() == (fails == "report.json")  # a new run that wrote nothing leaves no directory


def test_a_full_disk_in_any_command_is_one_line(tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command's writes go through ``io.atomic_write``, and the CLI maps its ENOSPC to one
    line (profile's tables are written the same way; benchmark is the quick command to run)."""
    out = tmp_path / "bench.json"
    monkeypatch.setattr(Path, "write_text", _full)
    res = runner.invoke(app, ["benchmark", str(tiny_onnx), "--out", str(out), "--warmup", "0", "--repeats", "2",
                              "--rounds", "1", "--min-time", "0", "--target", "cpu-ort-1t"])
    monkeypatch.undo()
    assert res.exit_code == 2
    assert _error(res) == f"error: no space left on device writing {out}; free space and rerun"
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_names_the_file_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "model.pt"
    with pytest.raises(OSError) as e:
        atomic_write(dest, _full)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(dest))

    def torch_full(p: Path) -> None:  # what torch's checkpoint writer raises on a full disk
        p.write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")

    import deploy_prune.io as dio

    monkeypatch.setattr(dio, "_no_space_left", lambda d: True)
    with pytest.raises(OSError) as e:
        atomic_write(dest, torch_full)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(dest))
    monkeypatch.setattr(dio, "_no_space_left", lambda d: False)
    with pytest.raises(RuntimeError, match="file write failed"):  # a disk with room: the error as it was
        atomic_write(dest, torch_full)
    assert list(tmp_path.iterdir()) == []
