"""CLI inputs that used to end in a traceback or a wrong message: a bare state dict exported with
--model/--data, a run exported naming another architecture, an ONNX model with an integer input
benchmarked, and a --log sink that cannot be written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.errors import UserError
from deploy_prune.models import build_model
from deploy_prune.models.checkpoint import load_model, save_checkpoint, state_dict_io

runner = CliRunner()


def error_line(r: object) -> str:
    """The one ``error:`` line a refused command printed (and no traceback)."""
    out = r.output  # type: ignore[attr-defined]  # stdout and stderr
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


# 1. a bare state dict (torch.save(model.state_dict())) with --model and --data


@pytest.fixture
def bare_sd(tiny_run: Path, tmp_path: Path) -> Path:
    """The tiny run's trained weights as a bare state dict."""
    state = torch.load(tiny_run / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    path = tmp_path / "bare_sd.pt"
    torch.save(state, path)
    return path


def test_bare_state_dict_exports_with_model_and_data(bare_sd: Path) -> None:
    r = runner.invoke(app, ["export", str(bare_sd), "--model", "tiny-cnn", "--data", "digits"])
    assert r.exit_code == 0, r.output
    out = bare_sd.with_suffix(".onnx")
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert r.output.startswith(f"wrote {out} (opset 18, input [1, 1, 32, 32]); parity max |diff| ")
    assert r.output.rstrip().endswith(" over 10 samples ok")  # 2 random batches + 8 digits samples
    model = build_model("tiny-cnn", 10, 1).eval()
    model.load_state_dict(torch.load(bare_sd, weights_only=True))
    import onnxruntime as ort

    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


def test_bare_state_dict_needs_a_shape_and_matching_data(bare_sd: Path) -> None:
    r = runner.invoke(app, ["export", str(bare_sd), "--model", "tiny-cnn"])
    assert r.exit_code == 2
    assert error_line(r) == (f"error: {str(bare_sd)!r} does not record its input shape; pass --input-shape C,H,W or "
                             "the --data it was trained on")
    r = runner.invoke(app, ["export", str(bare_sd), "--model", "tiny-cnn", "--data", "synthetic:3x32x32"])
    assert r.exit_code == 2
    assert error_line(r) == (f"error: --data synthetic:3x32x32 has 3-channel images but {str(bare_sd)!r} takes 1 "
                             "channel(s); pass the --data it was trained on")
    r = runner.invoke(app, ["export", str(bare_sd), "--data", "digits"])
    assert r.exit_code == 2
    assert error_line(r) == f"error: {str(bare_sd)!r} is a bare state dict; name its architecture with --model"
    assert not bare_sd.with_suffix(".onnx").exists()


@pytest.mark.parametrize(("spec", "classes", "channels"), [("tiny-cnn", 7, 1), ("resnet20", 10, 3), ("mobilenet_v2", 5, 2)])
def test_state_dict_io_reads_classes_and_channels(spec: str, classes: int, channels: int) -> None:
    assert state_dict_io(build_model(spec, classes, channels).state_dict()) == (classes, channels)


# 2. a run exported naming another architecture


@pytest.fixture(scope="module")
def pruned_ckpt(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run cut to half its widths, saved as compress saves its result."""
    from deploy_prune.graph import ModelGraph
    from deploy_prune.transforms import architecture_widths, prune_to_widths

    model, meta = load_model(tiny_run)
    shape = meta["input_shape"]
    prune_to_widths(model, shape, {g.name: g.channels // 2 for g in ModelGraph(model, shape).groups()})
    pruned = {"widths": architecture_widths(ModelGraph(model, shape)), "ignore": []}
    return save_checkpoint(tmp_path_factory.mktemp("pruned") / "pruned.pt", model, {**meta, "pruned": pruned})


@pytest.mark.parametrize(("which", "other"), [("run", "resnet20"), ("run", "mobilenet_v2"), ("pruned", "resnet20")])
def test_export_naming_another_architecture_is_one_line(tiny_run: Path, pruned_ckpt: Path, tmp_path: Path,
                                                        which: str, other: str) -> None:
    weights = str(tiny_run if which == "run" else pruned_ckpt)
    out = tmp_path / "other.onnx"
    r = runner.invoke(app, ["export", weights, "--model", other, "--out", str(out)])
    assert r.exit_code == 2
    assert error_line(r) == (f"error: {weights!r} was trained as model 'tiny-cnn' and does not fit model {other!r}; "
                             "drop --model, or pass --model tiny-cnn")
    assert not out.exists()


def test_naming_the_recorded_architecture_still_exports(pruned_ckpt: Path, tmp_path: Path) -> None:
    model, meta = load_model(pruned_ckpt, "tiny-cnn")
    assert meta["model"]["spec"] == "tiny-cnn" and meta["pruned"]
    assert model.features[0].out_channels == 8  # type: ignore[index]  # half of tiny-cnn's 16


# 3. benchmark of an ONNX model whose input is not float


def _int_model(path: Path, elem: int = TensorProto.INT64) -> Path:
    x = helper.make_tensor_value_info("ids", elem, [1, 4])
    y = helper.make_tensor_value_info("out", elem, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["ids"], ["out"])], "ids", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("target", ["cpu-ort-1t", "cpu-ort-int8-1t", "cpu-openvino-1t", "cpu-torch-1t"])
def test_benchmark_of_an_int64_input_is_one_line(tmp_path: Path, target: str) -> None:
    path = _int_model(tmp_path / "ids.onnx")
    r = runner.invoke(app, ["benchmark", str(path), "--target", target, "--warmup", "1", "--repeats", "2",
                            "--rounds", "1", "--min-time", "0"])
    assert r.exit_code == 2, r.output
    assert error_line(r) == (f"error: {path}: model input 'ids' is int64; deploy-prune times models with float inputs "
                             "(float32 or uint8/int8 for a quantized layer's input), not other types: export the "
                             "model with a float32 input")


def test_every_backend_refuses_an_input_it_cannot_feed(tmp_path: Path) -> None:
    """Past benchmark's check (the Python API, the gate): the backend's session refuses it."""
    from deploy_prune.backends import BACKENDS
    from deploy_prune.config import Target

    path = _int_model(tmp_path / "mask.onnx", TensorProto.BOOL)
    for backend in ("onnxruntime", "openvino", "torch"):
        b = BACKENDS.get(backend)
        if not b.available()[0]:
            continue
        with pytest.raises(UserError, match=r"^model input 'ids' is bool; (deploy-prune|backend torch) times models "
                                            r"with float inputs \(float32"):
            b.load(path, Target(name="t", backend=backend, threads=1))


# 4. a --log sink that cannot be written, refused before the run


def test_log_to_an_unwritable_directory_fails_before_the_run(tiny_run: Path, tmp_path: Path) -> None:
    """Simulated with a path under a regular file (tests run as root, for whom a chmod'ed directory
    stays writable)."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    out = tmp_path / "out"
    for spec in (f"tensorboard:{blocker}/tb", f"mlflow:{blocker}/mlruns", f"mlflow:{(blocker / 'mlruns').as_uri()}"):
        r = runner.invoke(app, ["compress", "--weights", str(tiny_run), "--out", str(out), "--log", spec])
        assert r.exit_code == 2
        where = spec.split(":", 1)[1].replace("file://", "")
        assert error_line(r) == (f"error: --log {spec}: cannot write into {where!r}: {str(blocker)!r} is a file, not a "
                                 "directory; give a directory you can write to")
        assert not out.exists()


def test_log_to_a_read_only_directory_fails_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated by making the probe file's creation fail as it does in a read-only directory."""
    import deploy_prune.report.tracking as tracking

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tracking.tempfile, "mkstemp", refuse)
    with pytest.raises(UserError) as e:
        tracking.parse_trackers([f"tensorboard:{tmp_path / 'tb'}"])
    assert str(e.value) == (f"--log tensorboard:{tmp_path / 'tb'}: cannot write into {str(tmp_path / 'tb')!r} "
                            "(Permission denied); give a directory you can write to")
    assert not (tmp_path / "tb").exists()  # nothing made on the way


def test_log_to_a_writable_directory_leaves_nothing_behind(tmp_path: Path) -> None:
    from deploy_prune.report.tracking import Tracker, parse_trackers

    (tmp_path / "tb").mkdir()
    assert parse_trackers([f"tensorboard:{tmp_path / 'tb'}", f"mlflow:{tmp_path / 'ml'}"]) == [
        Tracker("tensorboard", str(tmp_path / "tb")), Tracker("mlflow", str(tmp_path / "ml"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"] and not any((tmp_path / "tb").iterdir())
