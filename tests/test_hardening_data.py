"""Corrupt or odd data: CIFAR batches of the wrong kind, truncated or non-image files, single-class
folders, and exports against data that does not fit the checkpoint: one UserError line naming the
file and the fix, nothing written, no directory left behind."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import one_line

from deploy_prune.data import DataOptions, load_data
from deploy_prune.errors import UserError
from deploy_prune.export import export_record, export_run
from deploy_prune.models import build_model
from deploy_prune.models.checkpoint import save_checkpoint
from deploy_prune.train import train_model

# -- B. CIFAR batches ------------------------------------------------------------------------------

def _batch(n: int = 10, seed: int = 0, **override: Any) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    d: dict[bytes, Any] = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                           b"labels": (np.arange(n) % 10).tolist()}
    for k, v in override.items():
        if v is None:
            d.pop(k.encode())
        else:
            d[k.encode()] = v
    return d


def _dump(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize(("content", "message"), [
    ([1, 2, 3], r"holds a pickled list, not a dict"),
    ("just a string", r"holds a pickled str, not a dict"),
    (_batch(labels=None), r"has no 'labels' entry"),
    (_batch(data=None), r"has no 'data' entry"),
    (_batch(data=np.zeros((10, 1000), dtype=np.uint8)), r"'data' must be rows of 3072 bytes .* shape \[10, 1000\]"),
    (_batch(data=np.zeros((10, 3, 32, 32), dtype=np.uint8)), r"'data' must be rows of 3072 bytes .* shape \[10, 3, 32, 32\]"),
    (_batch(data=np.random.default_rng(0).random((10, 3072))), r"'data' must be rows of 3072 bytes .*, got float64"),
    (_batch(labels=list(range(9))), r"has 10 images but labels of shape \[9\]"),
    (_batch(labels=[0.5] * 10), r"labels must be integers, got float64"),
])
def test_cifar_bad_batches_name_the_file(tmp_path: Path, content: Any, message: str) -> None:
    _dump(tmp_path / "data_batch_1", content)
    with pytest.raises(UserError, match=message) as e:
        load_data(f"cifar10:{tmp_path}")
    msg = one_line(e)
    assert str(tmp_path / "data_batch_1") in msg and "cifar-10-batches-py" in msg


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    _dump(tmp_path / "data_batch_1", _batch())
    raw = (tmp_path / "data_batch_1").read_bytes()
    (tmp_path / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="cannot read CIFAR batch") as e:
        load_data(f"cifar10:{tmp_path}")
    assert str(tmp_path / "data_batch_1") in one_line(e)


def test_cifar_bad_test_batch_is_named(tmp_path: Path) -> None:
    _dump(tmp_path / "data_batch_1", _batch())
    _dump(tmp_path / "test_batch", _batch(labels=None))
    with pytest.raises(UserError, match="has no 'labels' entry") as e:
        load_data(f"cifar10:{tmp_path}")
    assert str(tmp_path / "test_batch") in one_line(e)


@pytest.mark.parametrize(("labels", "message"), [
    ([0] * 10, r"all samples have the same label; a classifier needs at least 2 classes"),
    ([-1] + [1] * 9, r"labels must be in 0\.\.9, found -1\.\.1"),
    ([12] + [1] * 9, r"labels must be in 0\.\.9, found 1\.\.12"),  # batches.meta names 10 classes
])
def test_cifar_labels_must_make_a_classification_task(tmp_path: Path, labels: list[int], message: str) -> None:
    _dump(tmp_path / "data_batch_1", _batch(labels=labels))
    _dump(tmp_path / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    with pytest.raises(UserError, match=message) as e:
        load_data(f"cifar10:{tmp_path}")
    assert str(tmp_path) in one_line(e)


def test_good_cifar_batches_still_load(tmp_path: Path) -> None:
    _dump(tmp_path / "data_batch_1", _batch(20))
    _dump(tmp_path / "test_batch", _batch(4, seed=1))  # a small test split may hold few classes
    b = load_data(f"cifar10:{tmp_path}")
    assert b.input_shape == (3, 32, 32) and len(b.train) + len(b.val) == 20 and b.num_classes == 10  # type: ignore[arg-type]


# -- B. image folders ------------------------------------------------------------------------------

def _images(root: Path, classes: tuple[str, ...], n: int = 4, fmt: str = "png") -> None:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / c / f"{i}.{fmt}")


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def test_truncated_jpeg_is_named_and_train_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "images"
    _images(data, ("cat", "dog"), fmt="jpg")
    _truncate(data / "dog" / "2.jpg")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot decode image .*2\.jpg.*; delete or replace the file") as e:
        train_model(out, "tiny-cnn", f"imagefolder:{data}", DataOptions(image_size=8, val_fraction=0.25),
                    epochs=1, batch_size=4, progress=False)
    assert str(data / "dog" / "2.jpg") in one_line(e)
    assert not out.exists()  # was: an empty checkpoints/ left behind


def test_image_that_is_not_an_image(tmp_path: Path) -> None:
    _images(tmp_path, ("a", "b"))
    (tmp_path / "a" / "notes.png").write_text("not a picture")
    b = load_data(f"imagefolder:{tmp_path}", DataOptions(image_size=8, val_fraction=0.2))
    with pytest.raises(UserError, match=r"cannot decode image .*notes\.png") as e:
        for ds in (b.train, b.val):
            for i in range(len(ds)):  # type: ignore[arg-type]
                ds[i]
    one_line(e)


@pytest.mark.parametrize("layout", ["flat", "train-val"])
def test_single_class_folder_is_refused(tmp_path: Path, layout: str) -> None:
    if layout == "flat":
        _images(tmp_path, ("only",))
    else:
        _images(tmp_path / "train", ("only",))
        _images(tmp_path / "val", ("only",))
    with pytest.raises(UserError, match=r"has 1 class sub-folder\(s\) \['only'\]; a classifier needs at least 2") as e:
        load_data(f"imagefolder:{tmp_path}", DataOptions(image_size=8))
    assert str(tmp_path) in one_line(e)


def test_single_class_folder_does_not_train(tmp_path: Path) -> None:
    _images(tmp_path / "images", ("only",))
    with pytest.raises(UserError, match="at least 2 classes"):
        train_model(tmp_path / "run", "tiny-cnn", f"imagefolder:{tmp_path / 'images'}", DataOptions(image_size=8),
                    epochs=1, batch_size=4, progress=False)
    assert not (tmp_path / "run").exists()


def test_train_and_val_folders_must_agree_on_classes(tmp_path: Path) -> None:
    _images(tmp_path / "train", ("cat", "dog"))
    _images(tmp_path / "val", ("cat", "fox"))
    with pytest.raises(UserError, match=r"train/ has classes \['cat', 'dog'\] but val/ has \['cat', 'fox'\]") as e:
        load_data(f"imagefolder:{tmp_path}", DataOptions(image_size=8))
    one_line(e)


def test_too_few_images_to_split(tmp_path: Path) -> None:
    _images(tmp_path, ("a", "b"), n=1)
    with pytest.raises(UserError, match=r"has only 2 sample\(s\): too few to split") as e:
        load_data(f"imagefolder:{tmp_path}", DataOptions(image_size=8, val_fraction=0.9))
    assert str(tmp_path) in one_line(e)


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
    one_line(e)
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
