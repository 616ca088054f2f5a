"""Bad numbers and corrupt or odd data: one clear UserError line naming the setting or the file
and the fix, and no directory left behind by a training run that fails on them."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deploy_prune.data import DataOptions, load_data
from deploy_prune.errors import UserError
from deploy_prune.train import TrainConfig, train_model


def _one_line(e: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# -- A. numbers ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "message"), [
    ("train_limit", 0, r"--train-limit must be an integer >= 1, got 0"),
    ("train_limit", -5, r"--train-limit must be an integer >= 1, got -5"),
    ("train_limit", 2.5, r"--train-limit must be an integer >= 1, got 2.5"),
    ("train_limit", True, r"--train-limit must be an integer >= 1, got True"),
    ("val_fraction", 0.0, r"--val-fraction must be a finite number in \(0, 1\), got 0.0"),
    ("val_fraction", 1.0, r"--val-fraction must be a finite number in \(0, 1\), got 1.0"),
    ("val_fraction", -0.2, r"--val-fraction must be a finite number in \(0, 1\), got -0.2"),
    ("val_fraction", float("nan"), r"--val-fraction must be a finite number in \(0, 1\), got nan"),
    ("val_fraction", float("inf"), r"--val-fraction must be a finite number in \(0, 1\), got inf"),
    ("image_size", 0, r"--image-size must be an integer >= 1, got 0"),
    ("image_size", float("nan"), r"--image-size must be an integer >= 1, got nan"),
    ("val_limit", 0, r"val_limit must be an integer >= 1, got 0"),
    ("seed", 1.5, r"--seed must be an integer, got 1.5"),
])
def test_data_options_refuse_bad_numbers(field: str, value: Any, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        DataOptions(**{field: value})
    _one_line(e)


@pytest.mark.parametrize(("kw", "message"), [
    ({"batch_size": 0}, r"--batch-size must be an integer >= 1, got 0"),  # was ZeroDivisionError
    ({"batch_size": -8}, r"--batch-size must be an integer >= 1, got -8"),
    ({"batch_size": 16.0}, r"--batch-size must be an integer >= 1, got 16.0"),
    ({"epochs": -1}, r"--epochs must be an integer >= 0, got -1"),
    ({"epochs": float("nan")}, r"--epochs must be an integer >= 0, got nan"),
    ({"lr": 0.0}, r"--lr must be a finite number > 0, got 0.0"),
    ({"lr": -0.1}, r"--lr must be a finite number > 0, got -0.1"),
    ({"lr": float("nan")}, r"--lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, r"--lr must be a finite number > 0, got inf"),
    ({"weight_decay": -1e-4}, r"--weight-decay must be a finite number >= 0, got -0.0001"),
    ({"weight_decay": float("nan")}, r"--weight-decay must be a finite number >= 0, got nan"),
    ({"seed": 0.5}, r"--seed must be an integer, got 0.5"),
    ({"optimizer": "adam"}, r"unknown optimizer 'adam'; valid: sgd, adamw"),
])
def test_train_refuses_bad_numbers_before_reading_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       kw: dict[str, Any], message: str) -> None:
    import deploy_prune.data

    def no_data(*a: Any, **k: Any) -> None:
        raise AssertionError("data was loaded before the settings were checked")

    monkeypatch.setattr(deploy_prune.data, "load_data", no_data)
    with pytest.raises(UserError, match=message) as e:
        train_model(tmp_path / "run", "tiny-cnn", "digits", DataOptions(train_limit=64), progress=False, **kw)
    _one_line(e)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("kw", "message"), [
    ({"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\), got 1.0"),
    ({"label_smoothing": float("nan")}, r"label_smoothing must be a finite number in \[0, 1\), got nan"),
    ({"eval_batch_size": 0}, r"eval_batch_size must be an integer >= 1, got 0"),
])
def test_train_config_checks_library_only_settings(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainConfig(**kw)


def test_zero_epochs_means_evaluate_and_save(tmp_path: Path) -> None:
    """epochs=0 is meaningful (a --weights checkpoint made into a run directory), so it stays valid."""
    m = train_model(tmp_path / "run", "tiny-cnn", "digits", DataOptions(train_limit=64), epochs=0, batch_size=32,
                    progress=False)
    assert m["epochs_run"] == 0 and m["history"] == []
    assert (tmp_path / "run" / "model.pt").is_file()


def test_flow_epsilon_must_be_finite() -> None:
    import torch

    from deploy_prune.train.flows import FlowStop

    with pytest.raises(UserError, match=r"-O eps must be a finite number >= 0, got nan"):
        FlowStop("if", float("nan"), [(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))])


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
    msg = _one_line(e)
    assert str(tmp_path / "data_batch_1") in msg and "cifar-10-batches-py" in msg


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    _dump(tmp_path / "data_batch_1", _batch())
    raw = (tmp_path / "data_batch_1").read_bytes()
    (tmp_path / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="cannot read CIFAR batch") as e:
        load_data(f"cifar10:{tmp_path}")
    assert str(tmp_path / "data_batch_1") in _one_line(e)


def test_cifar_bad_test_batch_is_named(tmp_path: Path) -> None:
    _dump(tmp_path / "data_batch_1", _batch())
    _dump(tmp_path / "test_batch", _batch(labels=None))
    with pytest.raises(UserError, match="has no 'labels' entry") as e:
        load_data(f"cifar10:{tmp_path}")
    assert str(tmp_path / "test_batch") in _one_line(e)


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
    assert str(tmp_path) in _one_line(e)


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
    assert str(data / "dog" / "2.jpg") in _one_line(e)
    assert not out.exists()  # was: an empty checkpoints/ left behind


def test_image_that_is_not_an_image(tmp_path: Path) -> None:
    _images(tmp_path, ("a", "b"))
    (tmp_path / "a" / "notes.png").write_text("not a picture")
    b = load_data(f"imagefolder:{tmp_path}", DataOptions(image_size=8, val_fraction=0.2))
    with pytest.raises(UserError, match=r"cannot decode image .*notes\.png") as e:
        for ds in (b.train, b.val):
            for i in range(len(ds)):  # type: ignore[arg-type]
                ds[i]
    _one_line(e)


@pytest.mark.parametrize("layout", ["flat", "train-val"])
def test_single_class_folder_is_refused(tmp_path: Path, layout: str) -> None:
    if layout == "flat":
        _images(tmp_path, ("only",))
    else:
        _images(tmp_path / "train", ("only",))
        _images(tmp_path / "val", ("only",))
    with pytest.raises(UserError, match=r"has 1 class sub-folder\(s\) \['only'\]; a classifier needs at least 2") as e:
        load_data(f"imagefolder:{tmp_path}", DataOptions(image_size=8))
    assert str(tmp_path) in _one_line(e)


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
    _one_line(e)


def test_too_few_images_to_split(tmp_path: Path) -> None:
    _images(tmp_path, ("a", "b"), n=1)
    with pytest.raises(UserError, match=r"has only 2 sample\(s\): too few to split") as e:
        load_data(f"imagefolder:{tmp_path}", DataOptions(image_size=8, val_fraction=0.9))
    assert str(tmp_path) in _one_line(e)
