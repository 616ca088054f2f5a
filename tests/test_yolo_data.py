"""YOLO-format folders: read locally, every label checked before training, batches in ultralytics'
format (its loss takes them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deploy_prune.data import DataOptions, load_data
from deploy_prune.data.shapes import NAMES, write_shapes
from deploy_prune.data.yolo import as_ultralytics, collate
from deploy_prune.errors import UserError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), train=6, val=3, size=48, seed=1)


def test_a_yolo_folder_loads_with_its_classes_and_boxes(shapes: Path) -> None:
    b = load_data(f"yolo:{shapes}", DataOptions(image_size=32))
    assert (b.task, b.num_classes, b.classes, len(b.train), len(b.val)) == ("detect", 3, NAMES, 6, 3)
    assert b.input_shape == (3, 32, 32)
    x, y = b.train[0]
    want = [[float(v) for v in line.split()] for line in (shapes.parent / "labels/train/00000.txt").read_text().splitlines()]
    assert x.shape == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    torch.testing.assert_close(y, torch.tensor(want).reshape(-1, 5))
    images, targets = collate([b.train[i] for i in range(3)])
    batch = as_ultralytics(images, targets)
    n = sum(len(b.train[i][1]) for i in range(3))
    assert batch["img"].shape == (3, 3, 32, 32) and batch["bboxes"].shape == (n, 4) and batch["cls"].shape == (n, 1)
    assert batch["batch_idx"].tolist() == [float(i) for i in range(3) for _ in range(len(b.train[i][1]))]


def test_ultralytics_loss_takes_the_batches(shapes: Path) -> None:
    pytest.importorskip("ultralytics")
    from ultralytics.cfg import get_cfg

    from deploy_prune.models import build_model

    b = load_data(f"yolo:{shapes}", DataOptions(image_size=32))
    torch.manual_seed(0)
    model = build_model("ultralytics:yolov8n.yaml", 3, 3)
    model.args = get_cfg()
    batch = as_ultralytics(*collate([b.train[i] for i in range(4)]))
    loss, parts = model.train().loss(batch, model(batch["img"]))
    assert loss.shape == (3,) and torch.isfinite(loss).all() and set(parts) == {"box_loss", "cls_loss", "dfl_loss"}


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", r"line 1 has 4 fields; a box is 'class cx cy w h'"),
    ("3 0.5 0.5 0.2 0.2", r"line 1: class 3 is not one of the 3 classes \(0\.\.2\)"),
    ("1.5 0.5 0.5 0.2 0.2", r"line 1: class 1\.5 is not one of the 3 classes"),
    ("0 0.5 1.2 0.2 0.2", r"line 1: coordinates must be normalised to \[0, 1\], got 0\.5 1\.2 0\.2 0\.2"),
    ("0 0.5 0.5 0 0.2", r"line 1: a box needs a width and height above 0"),
    ("0 a 0.5 0.2 0.2", r"line 1 holds a non-number"),
    (None, r"has no label file .*00000\.txt'; add an empty one for a background image"),
])
def test_a_bad_label_names_the_file_and_line(tmp_path: Path, line: str | None, message: str) -> None:
    cfg = write_shapes(tmp_path, train=2, val=1, size=32)
    label = tmp_path / "labels" / "train" / "00000.txt"
    if line is None:
        label.unlink()
    else:
        label.write_text(line + "\n")
    with pytest.raises(UserError, match=message) as e:
        load_data(f"yolo:{cfg}")
    assert "\n" not in str(e.value) and "00000" in str(e.value)


def test_empty_labels_are_background_and_a_polygon_gives_its_box(tmp_path: Path) -> None:
    cfg = write_shapes(tmp_path, train=2, val=1, size=32)
    (tmp_path / "labels" / "train" / "00000.txt").write_text("")
    (tmp_path / "labels" / "train" / "00001.txt").write_text("2 0.1 0.2 0.5 0.2 0.3 0.6\n")
    b = load_data(f"yolo:{cfg}", DataOptions(image_size=16))
    assert b.train[0][1].shape == (0, 5)
    torch.testing.assert_close(b.train[1][1], torch.tensor([[2.0, 0.3, 0.4, 0.4, 0.4]]))


@pytest.mark.parametrize("text, message", [
    ("train: images/train\nval: images/val\n", r"has no names"),
    ("train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n", r"nc is 3 but names lists 2 classes"),
    ("train: images/nope\nval: images/val\nnames: [a]\n", r"is neither an image folder nor a \.txt list of images"),
])
def test_a_bad_data_yaml_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    write_shapes(tmp_path, train=1, val=1, size=16)
    (tmp_path / "data.yaml").write_text(text)
    with pytest.raises(UserError, match=message):
        load_data(f"yolo:{tmp_path / 'data.yaml'}")


class _Oracle(torch.nn.Module):
    """Outputs, in YOLO's export form (N, 4 + classes, anchors), exactly the labels of the batches
    it is shown in order, or nothing at all (``blind``)."""

    def __init__(self, labels: list[torch.Tensor], size: int, blind: bool = False, params: bool = True) -> None:
        super().__init__()
        self.labels, self.size, self.blind, self.seen = labels, size, blind, 0
        if params:  # without: as an ONNX-backed module (the int8 artefact a run scores) has none
            self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(img), 4 + 3, 5)
        for i in range(len(img)):
            y = self.labels[self.seen]
            self.seen += 1
            if not self.blind:
                out[i, :4, : len(y)] = (y[:, 1:] * self.size).T
                out[i, 4 + y[:, 0].long(), torch.arange(len(y))] = 0.9
        return out


def test_map_is_one_for_the_labels_and_zero_for_nothing(shapes: Path) -> None:
    pytest.importorskip("ultralytics")
    from deploy_prune.train.detect import MeanAP

    b = load_data(f"yolo:{shapes}", DataOptions(image_size=32))
    labels = [b.val[i][1] for i in range(len(b.val))]
    assert sum(len(y) for y in labels) > 0
    metric = MeanAP(b.val, batch_size=2)
    # 0.995, not 1: ultralytics' (and COCO's) interpolated AP tops out there
    assert metric(_Oracle(labels, 32)) == pytest.approx(0.995) and metric.last["map50"] == pytest.approx(0.995)
    assert metric(_Oracle(labels, 32, blind=True)) == 0.0 and metric.__name__ == "mAP50-95"
    assert metric(_Oracle(labels, 32, params=False)) == pytest.approx(0.995)


def test_the_detection_loss_trains_a_yolo(shapes: Path) -> None:
    pytest.importorskip("ultralytics")
    from deploy_prune.models import build_model
    from deploy_prune.train.detect import DetectionLoss

    b = load_data(f"yolo:{shapes}", DataOptions(image_size=32))
    torch.manual_seed(0)
    model = build_model("ultralytics:yolov8n.yaml", 3, 3).train()
    loss = DetectionLoss()(model, collate([b.train[i] for i in range(4)]))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and model.model[0].conv.weight.grad.abs().sum() > 0
    assert model.args.box == 7.5  # ultralytics' default gains


def test_the_default_criterion_on_detection_data_needs_no_labels(shapes: Path) -> None:
    """deeplsp's default (taylor: cross-entropy on labels) becomes bn-scale on detection data, with a
    note; a criterion the user chose stays, and scoring refuses it on batches it cannot read."""
    from types import SimpleNamespace

    from deploy_prune.graph import ModelGraph
    from deploy_prune.importance import score_groups
    from deploy_prune.methods import get_method
    from deploy_prune.pipeline.stages import _criterion_for_the_task

    b = load_data(f"yolo:{shapes}", DataOptions(image_size=32))
    for chosen, want in ((None, "bn-scale"), ("taylor", "taylor")):
        method = get_method("deeplsp", **({"criterion": chosen} if chosen else {}))
        run = SimpleNamespace(cfg=SimpleNamespace(criterion=chosen, method_options={}), data=b, notes=[])
        _criterion_for_the_task(run, method)  # type: ignore[arg-type]
        assert method.criterion == want and bool(run.notes) == (chosen is None)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    batch = collate([b.train[i] for i in range(2)])
    assert len(batch[1]) != len(batch[0])  # objects, not images: no label per input
    with pytest.raises(UserError, match="criterion 'taylor' needs \\(input, label\\) batches, one label per input"):
        score_groups(net, ModelGraph(net, (3, 32, 32)), "taylor", [batch])


@pytest.mark.parametrize("task, data, message", [
    ("detect", "digits", "--task detect, but --data digits holds a classify dataset; give YOLO-format data"),
    ("classify", "yolo", "holds a detect dataset; drop --task or give classify data"),
    ("segment", "digits", "--task 'segment' is not a task deploy-prune trains; give classify or detect"),
])
def test_task_must_be_what_the_data_holds(shapes: Path, tmp_path: Path, task: str, data: str, message: str) -> None:
    from typer.testing import CliRunner

    from deploy_prune.cli import app

    spec = f"yolo:{shapes}" if data == "yolo" else data
    res = CliRunner().invoke(app, ["compress", "--model", "tiny-cnn", "--weights", "none", "--data", spec, "--task", task,
                                   "--flops-ratio", "0.5", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()
