"""Datasets, all local: ``load_data(spec)`` is the one door; nothing is ever downloaded.

Specs: ``digits`` (scikit-learn's bundled 8x8 digits, resized; the embedded default),
``fashion-mnist`` (IDX files; ``--data-dir`` or /usr/share/datasets/fashion-mnist),
``imagefolder:PATH``, ``cifar10:PATH`` (the python batches), ``synthetic[:CxHxW]``.

Splits: ``val`` is carved from the training portion with a seeded permutation, so the same
seed gives the same split everywhere; ``test`` is the official test split when one exists.
Reports and sensitivity use ``val``; ``test`` is kept for a final, untouched number.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from deploy_prune.data.idx import find_idx, read_idx
from deploy_prune.errors import UserError
from deploy_prune.registry import Registry

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


@dataclass
class DataBundle:
    """Train/val(/test) splits plus what a model needs to know about the inputs."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    classes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
            "mean": self.mean, "std": self.std, "train_size": len(self.train), "val_size": len(self.val),  # type: ignore[arg-type]
            "test_size": len(self.test) if self.test is not None else 0,  # type: ignore[arg-type]
        }


@dataclass
class DataOptions:
    data_dir: str | None = None
    image_size: int | None = None
    seed: int = 0
    val_fraction: float | None = None
    train_limit: int | None = None
    val_limit: int | None = None


Loader = Callable[[str, DataOptions], DataBundle]
DATASETS: Registry[Loader] = Registry("dataset")


def load_data(spec: str, options: DataOptions | None = None) -> DataBundle:
    """Parse ``name[:arg]`` and load it; unknown names list the valid ones."""
    opts = options or DataOptions()
    name, _, arg = spec.partition(":")
    bundle = DATASETS.get(name)(arg, opts)
    bundle.name = spec
    g = torch.Generator().manual_seed(opts.seed + 1)
    if opts.train_limit is not None and opts.train_limit < len(bundle.train):  # type: ignore[arg-type]
        bundle.train = Subset(bundle.train, torch.randperm(len(bundle.train), generator=g)[: opts.train_limit].tolist())  # type: ignore[arg-type]
    if opts.val_limit is not None and opts.val_limit < len(bundle.val):  # type: ignore[arg-type]
        bundle.val = Subset(bundle.val, torch.randperm(len(bundle.val), generator=g)[: opts.val_limit].tolist())  # type: ignore[arg-type]
    return bundle


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _tensor_bundle(
    name: str, x: np.ndarray, y: np.ndarray, x_test: np.ndarray | None, y_test: np.ndarray | None,
    opts: DataOptions, default_val: float, classes: list[str], scale: float,
) -> DataBundle:
    """Normalise uint8-like arrays (N,C,H,W), resize if asked, split, wrap as TensorDatasets."""

    def prep(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).float().div_(scale)
        if opts.image_size is not None and t.shape[-1] != opts.image_size:
            t = F.interpolate(t, size=(opts.image_size, opts.image_size), mode="bilinear", align_corners=False)
        return t

    xt = prep(x)
    # Statistics from the training portion only, one per channel.
    tr_idx, va_idx = _split(len(xt), opts.val_fraction or default_val, opts.seed)
    mean = xt[tr_idx].mean(dim=(0, 2, 3))
    std = xt[tr_idx].std(dim=(0, 2, 3)).clamp_min(1e-6)

    def norm(t: torch.Tensor) -> torch.Tensor:
        return (t - mean[None, :, None, None]) / std[None, :, None, None]

    xt, yt = norm(xt), torch.as_tensor(y, dtype=torch.long)
    train = TensorDataset(xt[tr_idx], yt[tr_idx])
    val = TensorDataset(xt[va_idx], yt[va_idx])
    test = None
    if x_test is not None and y_test is not None:
        test = TensorDataset(norm(prep(x_test)), torch.as_tensor(y_test, dtype=torch.long))
    num_classes = int(max(yt.max().item() + 1, len(classes)))
    return DataBundle(
        name, train, val, test, num_classes, xt.shape[1], (xt.shape[2], xt.shape[3]),
        mean.tolist(), std.tolist(), classes or [str(i) for i in range(num_classes)],
    )


@DATASETS.register("digits", "scikit-learn's bundled 8x8 digits (1797 images), resized to 32x32; no files needed")
def _digits(arg: str, opts: DataOptions) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images[:, None, :, :].astype(np.float32)  # values 0..16
    if opts.image_size is None:
        opts = DataOptions(**{**opts.__dict__, "image_size": 32})
    return _tensor_bundle("digits", images, d.target, None, None, opts, 0.2, [str(i) for i in range(10)], 16.0)


@DATASETS.register("fashion-mnist", "Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist, or --data-dir)")
def _fashion(arg: str, opts: DataOptions) -> DataBundle:
    root = Path(arg or opts.data_dir or os.environ.get("DEPLOY_PRUNE_FASHION_MNIST") or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise UserError(
            f"Fashion-MNIST not found at {str(root)!r}; run 'make data' (apt-get install dataset-fashion-mnist) "
            "or pass --data-dir DIR holding the IDX files"
        )
    x = read_idx(find_idx(root, "train-images-idx3-ubyte"))
    y = read_idx(find_idx(root, "train-labels-idx1-ubyte"))
    xt = read_idx(find_idx(root, "t10k-images-idx3-ubyte"))
    yt = read_idx(find_idx(root, "t10k-labels-idx1-ubyte"))
    if len(x) != len(y) or len(xt) != len(yt):
        raise UserError(f"Fashion-MNIST files in {str(root)!r} disagree on sample counts; re-install them")
    return _tensor_bundle("fashion-mnist", x[:, None], y, xt[:, None], yt, opts, 0.1, FASHION_CLASSES, 255.0)


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they contain (dicts, lists, numpy arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _read_cifar_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"cannot read CIFAR batch {str(path)!r}: {e}") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


@DATASETS.register("cifar10", "CIFAR-10 python batches: cifar10:PATH (data_batch_1..5, test_batch)")
def _cifar10(arg: str, opts: DataOptions) -> DataBundle:
    root = Path(arg or opts.data_dir or "")
    batches = sorted(root.glob("data_batch_*")) if arg or opts.data_dir else []
    if not batches:
        raise UserError(f"no CIFAR-10 data_batch_* files in {str(root)!r}; use cifar10:PATH to the extracted cifar-10-batches-py")
    parts = [_read_cifar_batch(b) for b in batches]
    x = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
    y = np.concatenate([np.asarray(p["labels"]) for p in parts])
    xt = yt = None
    if (root / "test_batch").is_file():
        t = _read_cifar_batch(root / "test_batch")
        xt, yt = np.asarray(t["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(t["labels"])
    classes: list[str] = []
    if (root / "batches.meta").is_file():
        meta = _read_cifar_batch(root / "batches.meta")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", [])]
    return _tensor_bundle("cifar10", x, y, xt, yt, opts, 0.1, classes, 255.0)


@DATASETS.register("imagefolder", "imagefolder:PATH, one sub-folder per class (or PATH/train + PATH/val)")
def _imagefolder(arg: str, opts: DataOptions) -> DataBundle:
    from torchvision import datasets, transforms

    root = Path(arg or opts.data_dir or "")
    if not (arg or opts.data_dir) or not root.is_dir():
        raise UserError(f"image folder {str(root)!r} not found; use imagefolder:PATH with one sub-folder per class")
    size = opts.image_size or 224
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet statistics: the usual pretraining
    tf = transforms.Compose([
        transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std),
    ])
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train: Dataset = datasets.ImageFolder(str(root / "train"), tf)
            val: Dataset = datasets.ImageFolder(str(root / "val"), tf)
            classes = train.classes  # type: ignore[attr-defined]
        else:
            full = datasets.ImageFolder(str(root), tf)
            tr, va = _split(len(full), opts.val_fraction or 0.1, opts.seed)
            train, val, classes = Subset(full, tr), Subset(full, va), full.classes
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"cannot read image folder {str(root)!r}: {e}") from None
    return DataBundle("imagefolder", train, val, None, len(classes), 3, (size, size), mean, std, list(classes))


@DATASETS.register("synthetic", "random tensors for latency-only work: synthetic[:CxHxW] (default 3x32x32, 10 classes)")
def _synthetic(arg: str, opts: DataOptions) -> DataBundle:
    shape = (3, opts.image_size or 32, opts.image_size or 32)
    if arg:
        try:
            shape = tuple(int(v) for v in arg.lower().split("x"))  # type: ignore[assignment]
            assert len(shape) == 3 and min(shape) > 0
        except (ValueError, AssertionError):
            raise UserError(f"bad synthetic shape {arg!r}; use synthetic:CxHxW, e.g. synthetic:3x32x32") from None
    g = torch.Generator().manual_seed(opts.seed)
    n_train, n_val, k = 256, 64, 10
    x = torch.randn(n_train + n_val, *shape, generator=g)
    y = torch.randint(0, k, (n_train + n_val,), generator=g)
    return DataBundle(
        "synthetic", TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]), None,
        k, shape[0], (shape[1], shape[2]), [0.0] * shape[0], [1.0] * shape[0], [str(i) for i in range(k)],
    )


def make_loader(
    ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, sampler: Any = None, workers: int = 0
) -> DataLoader:
    """A DataLoader with a seeded shuffle (same seed, same order) and no worker processes by default."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, generator=g,
        num_workers=workers, drop_last=False,
    )


def data_available() -> dict[str, str]:
    """Which datasets can be loaded here and from where (for ``doctor``)."""
    fm = Path(os.environ.get("DEPLOY_PRUNE_FASHION_MNIST", FASHION_MNIST_DIR))
    return {
        "digits": "bundled with scikit-learn",
        "fashion-mnist": str(fm) if fm.is_dir() else "not found (make data)",
        "synthetic": "always",
        "imagefolder": "user path",
        "cifar10": "user path",
    }
