from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_prune.data import DataOptions, load_data
from deploy_prune.data.idx import read_idx, write_idx
from deploy_prune.errors import UserError


def test_digits_is_embedded_and_split_is_deterministic() -> None:
    a = load_data("digits", DataOptions(seed=3))
    b = load_data("digits", DataOptions(seed=3))
    c = load_data("digits", DataOptions(seed=4))
    assert a.input_shape == (1, 32, 32) and a.num_classes == 10
    assert len(a.train) + len(a.val) == 1797
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])  # type: ignore[attr-defined]
    assert not torch.equal(a.val.tensors[1], c.val.tensors[1])  # type: ignore[attr-defined]
    # normalised with training statistics
    assert abs(float(a.train.tensors[0].mean())) < 0.05  # type: ignore[attr-defined]


def test_image_size_option_resizes() -> None:
    assert load_data("digits", DataOptions(image_size=16)).input_shape == (1, 16, 16)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip_and_fashion_mnist_layout(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    y = (np.arange(50) % 10).astype(np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", x)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", y)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", x[:20])
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", y[:20])
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), x)
    b = load_data("fashion-mnist", DataOptions(data_dir=str(tmp_path)))
    assert b.input_shape == (1, 28, 28) and len(b.train) + len(b.val) == 50 and len(b.test) == 20  # type: ignore[arg-type]
    assert b.classes[0] == "T-shirt/top"


def test_idx_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(tmp_path / "junk")


def test_fashion_mnist_missing_dir_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="make data"):
        load_data("fashion-mnist", DataOptions(data_dir=str(tmp_path / "nowhere")))


def _cifar_batch(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n).tolist())}
    with open(path, "wb") as f:
        pickle.dump(d, f)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    for i in (1, 2):
        _cifar_batch(tmp_path / f"data_batch_{i}", 30, i)
    _cifar_batch(tmp_path / "test_batch", 10, 9)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    b = load_data(f"cifar10:{tmp_path}")
    assert b.input_shape == (3, 32, 32) and len(b.train) + len(b.val) == 60 and len(b.test) == 10  # type: ignore[arg-type]
    assert b.classes[3] == "c3"


class _Evil:
    def __reduce__(self):  # noqa: ANN204
        return (print, ("pwned",))


def test_cifar_loader_refuses_code_in_pickles(tmp_path: Path) -> None:
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        load_data(f"cifar10:{tmp_path}")


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(np.full((20, 24, 3), i * 40, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    b = load_data(f"imagefolder:{tmp_path}", DataOptions(image_size=16, val_fraction=0.2))
    assert b.num_classes == 2 and b.input_shape == (3, 16, 16)
    assert len(b.train) == 8 and len(b.val) == 2  # type: ignore[arg-type]
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)


def test_synthetic_and_unknown() -> None:
    assert load_data("synthetic:1x12x10").input_shape == (1, 12, 10)
    with pytest.raises(UserError, match="bad synthetic shape"):
        load_data("synthetic:12x10")
    with pytest.raises(UserError, match="valid names: .*digits"):
        load_data("mnist")
