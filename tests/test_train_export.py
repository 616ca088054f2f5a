from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError
from deploy_prune.export import export_run
from deploy_prune.models.checkpoint import load_model
from deploy_prune.train import train_model


def test_train_writes_run_directory(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert metrics["val_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert metrics["provenance"]["tool"] == "deploy-prune"
    assert (tiny_run / "checkpoints" / "last.pt").is_file()
    model, meta = load_model(tiny_run)  # a run directory is accepted as --weights
    assert meta["input_shape"] == [1, 32, 32] and meta["model"]["spec"] == "tiny-cnn"


def test_resume_continues_from_last_epoch(tmp_path: Path) -> None:
    opts = DataOptions(train_limit=128)
    train_model(tmp_path, "tiny-cnn", "digits", opts, epochs=1, batch_size=64, progress=False)
    m = train_model(tmp_path, None, "digits", opts, epochs=2, batch_size=64, resume=True, progress=False)
    assert [h["epoch"] for h in m["history"]] == [1, 2]


def test_resume_with_nothing_to_resume(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        train_model(tmp_path, "tiny-cnn", "digits", DataOptions(), epochs=1, resume=True, progress=False)


def test_export_checks_and_parity(tiny_run: Path, tiny_onnx: Path) -> None:
    m = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(m)
    assert m.opset_import[0].version >= 17
    rec = json.loads((tiny_run / "model.onnx.json").read_text())
    assert rec["parity_ok"] and rec["max_abs_diff"] < 1e-3
    assert rec["parity_samples"] > 2  # random inputs plus real digits
    assert rec["top1_agreement"] == 1.0
    props = {p.key: p.value for p in m.metadata_props}
    assert props["model"] == "tiny-cnn" and "normalize_mean" in props


def test_export_bad_input_shape(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="bad --input-shape"):
        export_run(tiny_run, out=tmp_path / "x.onnx", input_shape="1,32")
    assert not (tmp_path / "x.onnx").exists()


def test_the_exporters_op_table_is_built_once_and_every_export_gets_its_own_copy() -> None:
    from torch.onnx._internal.exporter import _registration

    from deploy_prune.export import to_onnx
    from deploy_prune.models import build_model

    model = build_model("tiny-cnn", 10, 1).eval()
    first = to_onnx(model, torch.zeros(1, 1, 8, 8)).SerializeToString()
    a, b = _registration.ONNXRegistry.from_torchlib(), _registration.ONNXRegistry.from_torchlib()
    assert a is not b and a.functions == b.functions and len(a.functions) > 100
    a.functions.clear()  # an export that changes its table (custom ops) changes only its copy
    assert _registration.ONNXRegistry.from_torchlib().functions == b.functions
    assert to_onnx(model, torch.zeros(1, 1, 8, 8)).SerializeToString() == first
