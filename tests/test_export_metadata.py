"""What an exported ONNX file carries (normalisation, class names, input shape, version, provenance)
from ``export`` and from ``compress``, and ``--dynamic-batch``: a symbolic batch axis, checked by
running the file in ONNX Runtime at several batch sizes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deploy_prune import __version__
from deploy_prune.cli import app
from deploy_prune.errors import UserError
from deploy_prune.export import export_onnx, export_run, read_metadata

runner = CliRunner()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _batch_dims(path: Path) -> tuple[onnx.TensorShapeProto.Dimension, onnx.TensorShapeProto.Dimension]:
    g = onnx.load(str(path)).graph
    return g.input[0].type.tensor_type.shape.dim[0], g.output[0].type.tensor_type.shape.dim[0]


def test_metadata_props_carry_what_a_server_needs(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    mean, std, names = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], ["cat", "dog", "owl", "fox"]
    export_onnx(_net(), (3, 8, 8), out, model_spec="toy", mean=mean, std=std, class_names=names)
    props = _props(out)
    assert props["deploy_prune_version"] == __version__  # the key older readers use
    assert props["deploy_prune.version"] == __version__
    assert json.loads(props["deploy_prune.input_shape"]) == [1, 3, 8, 8]
    assert json.loads(props["deploy_prune.dynamic_batch"]) is False
    assert json.loads(props["deploy_prune.mean"]) == mean and json.loads(props["deploy_prune.std"]) == std
    assert json.loads(props["deploy_prune.class_names"]) == names and props["deploy_prune.model"] == "toy"
    prov = json.loads(props["deploy_prune.provenance"])
    assert {"tool_version", "git_commit", "date", "cpu", "torch", "onnx", "opset"} <= set(prov)
    assert prov["opset"] == 18 and prov["onnx"] == onnx.__version__ and "host" not in prov
    assert read_metadata(out)["deploy_prune.mean"] == mean  # JSON decoded
    # without normalisation or names, those keys are absent rather than guessed
    bare = tmp_path / "bare.onnx"
    export_onnx(_net(), (3, 8, 8), bare)
    assert not {"deploy_prune.mean", "deploy_prune.std", "deploy_prune.class_names"} & set(_props(bare))


def test_normalisation_must_match_the_channels(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="normalisation mean has 1 values but the input has 3 channel") as e:
        export_onnx(_net(), (3, 8, 8), tmp_path / "m.onnx", mean=[0.5], std=[0.5])
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())  # nothing written


def test_dynamic_batch_runs_at_other_batch_sizes(tmp_path: Path) -> None:
    out, net = tmp_path / "dyn.onnx", _net()
    rec = export_onnx(net, (3, 8, 8), out, dynamic_batch=True)
    assert rec["parity_ok"] and rec["dynamic_batch"] is True and rec["parity_batches"] == [1, 2]
    dim_in, dim_out = _batch_dims(out)
    assert dim_in.dim_param == "batch" and dim_out.dim_param == "batch" and not dim_in.HasField("dim_value")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 3, 5):
        x = torch.randn(n, 3, 8, 8)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-4, atol=1e-4)
    props = _props(out)
    assert json.loads(props["deploy_prune.dynamic_batch"]) is True
    assert json.loads(props["deploy_prune.input_shape"]) == ["batch", 3, 8, 8]
    static = tmp_path / "static.onnx"
    export_onnx(net, (3, 8, 8), static, batch=2)
    assert _batch_dims(static)[0].dim_value == 2  # the default stays static


def test_export_of_a_run_records_its_data(tiny_run: Path, tmp_path: Path) -> None:
    from deploy_prune.models.checkpoint import load_model

    _, meta = load_model(tiny_run)
    out = tmp_path / "tiny.onnx"
    r = runner.invoke(app, ["export", str(tiny_run), "--out", str(out), "--dynamic-batch"])
    assert r.exit_code == 0, r.output
    assert "input ['batch', 1, 32, 32]" in r.output and "at batches 1, 2" in r.output
    md = read_metadata(out)
    assert md["deploy_prune.mean"] == pytest.approx(meta["data"]["mean"]) and len(md["deploy_prune.mean"]) == 1
    assert md["deploy_prune.std"] == pytest.approx(meta["data"]["std"])
    assert md["deploy_prune.class_names"] == [str(i) for i in range(10)]  # digits' labels
    assert md["deploy_prune.model"] == "tiny-cnn" and md["deploy_prune.input_shape"] == ["batch", 1, 32, 32]
    # the un-namespaced keys stay for readers of them
    assert md["model"] == "tiny-cnn" and md["normalize_mean"] == md["deploy_prune.mean"]
    assert md["input_shape"] == [1, 32, 32] and md["deploy_prune_version"] == __version__
    rec = export_run(tiny_run, out=tmp_path / "b4.onnx", batch=4)
    assert rec["dynamic_batch"] is False and _batch_dims(tmp_path / "b4.onnx")[0].dim_value == 4


def test_compress_exports_with_the_same_metadata(tiny_run: Path, tmp_path: Path,
                                                 quick_target_yaml: Callable[[int], Path]) -> None:
    from deploy_prune.data import DataOptions, load_data
    from deploy_prune.pipeline import CompressConfig, compress

    out = tmp_path / "run"
    compress(CompressConfig(out=out, weights=str(tiny_run), data="digits", data_options=DataOptions(train_limit=300),
                            target=str(quick_target_yaml(8)), flops_ratio=0.8, method="uniform", epochs=0, steps=1,
                            score_batches=1, batch_size=64, profiles=tmp_path / "profiles"))
    md = read_metadata(out / "model.onnx")
    data = load_data("digits", DataOptions(train_limit=300))
    assert md["deploy_prune.mean"] == pytest.approx(data.mean) and md["deploy_prune.std"] == pytest.approx(data.std)
    assert md["deploy_prune.class_names"] == data.classes and md["deploy_prune.model"] == "tiny-cnn"
    assert md["deploy_prune.input_shape"] == [1, 1, 32, 32] and md["deploy_prune_version"] == __version__
    assert md["deploy_prune.provenance"]["tool_version"] == __version__
