"""Ultralytics YOLO (v8, 11) through the graph, the API and the CLI's model names: C2f / C3k2 splits
separated, the Detect head's outputs kept, export mode, a run reloaded by ``dp.load``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import deploy_prune as dp
from deploy_prune.graph import ModelGraph, keep_ratio_plan
from deploy_prune.models import build_model
from deploy_prune.models.checkpoint import save_checkpoint
from deploy_prune.models.ultralytics import import_ultralytics
from deploy_prune.transforms import architecture_widths

pytest.importorskip("ultralytics")
SIZE = 64


def _yolo(cfg: str = "yolov8n.yaml", nc: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(f"ultralytics:{cfg}", nc, 3)


@pytest.mark.parametrize("cfg, blocks", [("yolov8n.yaml", 8), ("yolo11n.yaml", 9)])
def test_a_yolo_is_cut_through_its_splits_and_keeps_its_head_outputs(cfg: str, blocks: int) -> None:
    model = _yolo(cfg)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
    assert isinstance(want, torch.Tensor) and want.shape[1] == 4 + 3  # export mode: one decoded tensor
    g = ModelGraph(model, (3, SIZE, SIZE), channel_multiple=8)
    assert len(g.splits.parts) == blocks and not g.splits.frozen
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)  # the separated model computes the same
    head = {f"model.{len(model.model) - 1}.cv{b}.{i}.2" for b in (2, 3) for i in range(3)}
    assert head <= g.frozen_layers  # box/DFL and class outputs are never cut
    flops = g.flops_params()[0]
    plan = keep_ratio_plan(g, 0.5)
    plan = {n: max(8, k - 8 * (i % 2)) for i, (n, k) in enumerate(plan.items())}  # uneven: parts differ
    predicted = g.predict_flops(plan)
    g.prune({n: list(range(k, g._info[n].channels)) for n, k in plan.items()})
    with torch.no_grad():
        assert model(x).shape == want.shape
    assert g.flops_params()[0] == predicted < 0.45 * flops  # concatenations priced as cut
    attention = [m for m in model.modules() if getattr(m, "prune_as_unit", False)]
    assert len(attention) == (1 if "11" in cfg else 0)  # YOLO11's PSA attention: one unit, kept whole
    for unit in attention:
        assert unit.qkv.conv.out_channels == unit.qkv.conv.in_channels * 2 and "forward" not in vars(unit)


def _user_yolo() -> torch.nn.Module:
    """As a user holds it (``YOLO("yolov8n.yaml").model``): training form, head not in export mode."""
    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", nc=3, verbose=False)


def test_a_cut_yolo_is_rebuilt_from_a_fresh_instance(tmp_path: Path) -> None:
    """What ``dp.load`` does with a run's model.pt: the fresh model is put in export form, separated
    and cut the same way."""
    model = _yolo()
    g = ModelGraph(model, (3, SIZE, SIZE), channel_multiple=8)
    g.prune({n: list(range(k, g._info[n].channels)) for n, k in keep_ratio_plan(g, 0.4).items()})
    save_checkpoint(tmp_path / "model.pt", model, {"model": {"spec": "yolo"}, "input_shape": [3, SIZE, SIZE],
                                                   "pruned": {"widths": architecture_widths(g), "ignore": []}})
    again = dp.load(tmp_path / "model.pt", model=_user_yolo())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x))


@pytest.mark.slow  # a whole compress run of YOLOv8n (about 100 s here): the pieces are tested above
def test_a_yolo_through_the_api_is_reloaded_by_dp_load(tmp_path: Path, quick_target_yaml: Callable[[int], Path]) -> None:
    model = _user_yolo()
    ds = TensorDataset(torch.randn(4, 3, SIZE, SIZE), torch.zeros(4))
    seen: list[tuple[bool, int]] = []

    def finetune(m: torch.nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
        m.train()
        seen.append((isinstance(m(torch.randn(2, 3, SIZE, SIZE)), dict), len(seen)))  # training form: raw head outputs

    def score(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(m.eval()(torch.ones(1, 3, SIZE, SIZE))[:, 4:].mean())

    res = dp.compress(model, torch.zeros(1, 3, SIZE, SIZE), target=str(quick_target_yaml(8)), budget=dp.Flops(0.5),
                      method="uniform", train=ds, evaluate=score, finetune=finetune, out=tmp_path / "run",
                      profiles=tmp_path / "p", epochs=1, steps=1)
    rep = res.report
    assert rep["met_budget"] is True and rep["final"]["flops"] <= 0.5 * rep["baseline"]["flops"]
    assert seen and all(raw for raw, _ in seen)
    assert any("head in export mode" in n for n in rep["notes"]) and any("one layer per part" in n for n in rep["notes"])
    again = dp.load(tmp_path / "run", model=_user_yolo())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), res.model.eval()(x))
    assert type(model.model[2]).__module__.startswith("ultralytics") and not model.model[-1].export  # the user's model is untouched


def test_ultralytics_model_names_and_a_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    import_ultralytics()
    assert Image.open.__module__ == "PIL.Image"  # not ultralytics' patch, which pip-installs pi-heif on a bad file
    with pytest.raises(dp.UserError, match="ultralytics has no model config 'yolov99n.yaml'"):
        build_model("ultralytics:yolov99n.yaml", 3, 3)
    with pytest.raises(dp.UserError, match="names no model config"):
        build_model("ultralytics:yolov8n.pt", 3, 3)
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    with pytest.raises(dp.UserError, match=r"YOLO models need ultralytics: pip install 'deploy-prune\[ultralytics\]'"):
        import_ultralytics()


@pytest.fixture(scope="module")
def yolo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deploy_prune.data.shapes import write_shapes

    return write_shapes(tmp_path_factory.mktemp("shapes"), train=8, val=4, size=SIZE, seed=2)


@pytest.mark.slow  # about 70 s here, most of it profiling YOLOv8n: the pieces are tested in the default suite
def test_the_cli_compresses_a_trained_yolo_on_a_yolo_folder(tmp_path: Path, yolo_folder: Path,
                                                             quick_target_yaml: Callable[[int], Path]) -> None:
    """The built-in loop trains with ultralytics' loss and scores mAP50-95, with no callback."""
    from typer.testing import CliRunner

    from deploy_prune.cli import app

    torch.save({"model": _user_yolo().half(), "train_args": {"imgsz": SIZE}}, tmp_path / "best.pt")  # as ultralytics saves
    args = ["compress", "--model", "ultralytics:yolov8n.yaml", "--weights", str(tmp_path / "best.pt"),
            "--data", f"yolo:{yolo_folder}", "--image-size", str(SIZE), "--target", str(quick_target_yaml(8)),
            "--flops-ratio", "0.5", "--method", "uniform", "--epochs", "1", "--steps", "1", "--batch-size", "4",
            "--profiles", str(tmp_path / "p"), "--out", str(tmp_path / "run")]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--trust-checkpoint" in refused.output and not (tmp_path / "run").exists()
    res = CliRunner().invoke(app, [*args, "--trust-checkpoint"])
    assert res.exit_code == 0, res.output
    rep = __import__("json").loads((tmp_path / "run" / "report.json").read_text())
    assert rep["metric"]["name"] == "mAP50-95" and "ultralytics" in rep["metric"]["source"]
    assert 0.0 <= rep["final"]["accuracy"] <= 1.0 and rep["met_budget"] is True
    assert "mAP50-95 %" in res.output
    again = dp.load(tmp_path / "run")  # rebuilt by name (ultralytics:yolov8n.yaml), separated and cut
    with torch.no_grad():
        assert again(torch.zeros(1, 3, SIZE, SIZE)).shape[1] == 4 + 3


def test_detection_data_needs_a_yolo(tmp_path: Path, yolo_folder: Path) -> None:
    from deploy_prune.data import DataOptions, load_data

    data = load_data(f"yolo:{yolo_folder}", DataOptions(image_size=SIZE))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 7, 1))
    with pytest.raises(dp.UserError, match=r"detection data \(user\) trains and scores ultralytics YOLO models"):
        dp.compress(net, torch.zeros(1, 3, SIZE, SIZE), target="cpu-ort-1t", budget=dp.Flops(0.5), method="uniform",
                    train=data.train, val=data.val, out=tmp_path / "run")
