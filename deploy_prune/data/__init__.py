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

from deploy_prune.checks import check_number
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
    task: str = "classify"  # classify | detect (items (image, (n, 5) labels): data.yolo)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
            "mean": self.mean, "std": self.std, "train_size": len(self.train), "val_size": len(self.val),  # type: ignore[arg-type]
            "test_size": len(self.test) if self.test is not None else 0,  # type: ignore[arg-type]
            "classes": list(self.classes),  # label i's name (an export carries them in its metadata)
        }


@dataclass
class DataOptions:
    """How to load a dataset. Numbers are checked here, where they enter, so a bad value is one
    clear line before any file is read (not a ValueError from deep inside torch)."""

    data_dir: str | None = None
    image_size: int | None = None
    seed: int = 0
    val_fraction: float | None = None
    train_limit: int | None = None
    val_limit: int | None = None

    def __post_init__(self) -> None:
        check_number("--image-size", self.image_size, lo=1, integer=True, optional=True)
        check_number("--seed", self.seed, integer=True)
        check_number("--val-fraction", self.val_fraction, lo=0, hi=1, lo_open=True, hi_open=True, optional=True)
        check_number("--train-limit", self.train_limit, lo=1, integer=True, optional=True)
        check_number("val_limit", self.val_limit, lo=1, integer=True, optional=True)


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


def _split(n: int, val_fraction: float, seed: int, what: str = "the dataset") -> tuple[list[int], list[int]]:
    check_number("--val-fraction", val_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise UserError(f"{what} has only {n} sample(s): too few to split into training and validation; add data")
    return perm[n_val:], perm[:n_val]


def _check_labels(y: np.ndarray, num_classes: int | None, where: str, need_two: bool = True) -> None:
    """Labels must be integers in [0, classes) with at least two classes: a one-class
    "classifier" trains to accuracy 1.0 and means nothing, and a label out of range fails deep
    inside the loss."""
    if y.ndim != 1 or (len(y) and y.dtype.kind not in "iu"):
        raise UserError(f"{where}: labels must be a flat list of integers, got {y.dtype} of shape {list(y.shape)}; "
                        "regenerate the dataset files")
    if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        top = f"{num_classes - 1}" if num_classes is not None else "the number of classes - 1"
        raise UserError(f"{where}: labels must be in 0..{top}, found {int(y.min())}..{int(y.max())}; "
                        "regenerate the dataset files")
    if need_two and len(np.unique(y)) < 2:
        raise UserError(f"{where}: all samples have the same label; a classifier needs at least 2 classes, "
                        "add data of another class")


def _tensor_bundle(
    name: str, x: np.ndarray, y: np.ndarray, x_test: np.ndarray | None, y_test: np.ndarray | None,
    opts: DataOptions, default_val: float, classes: list[str], scale: float, where: str | None = None,
) -> DataBundle:
    """Normalise uint8-like arrays (N,C,H,W), resize if asked, split, wrap as TensorDatasets.
    ``where`` names the source in error messages (default: ``name``)."""

    def prep(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).float().div_(scale)
        if opts.image_size is not None and t.shape[-1] != opts.image_size:
            t = F.interpolate(t, size=(opts.image_size, opts.image_size), mode="bilinear", align_corners=False)
        return t

    where = where or name
    _check_labels(np.asarray(y), len(classes) or None, where)
    if x_test is not None and y_test is not None:
        _check_labels(np.asarray(y_test), len(classes) or int(np.asarray(y).max()) + 1, f"{where} (test split)", need_two=False)
    xt = prep(x)
    # Statistics from the training portion only, one per channel.
    tr_idx, va_idx = _split(len(xt), opts.val_fraction or default_val, opts.seed, where)
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
    return _tensor_bundle("fashion-mnist", x[:, None], y, xt[:, None], yt, opts, 0.1, FASHION_CLASSES, 255.0,
                          where=f"Fashion-MNIST in {str(root)!r}")


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


_CIFAR_FIX = "replace it with the file from the extracted cifar-10-batches-py"


def _read_cifar_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"cannot read CIFAR batch {str(path)!r}: {str(e) or type(e).__name__}; {_CIFAR_FIX}") from None
    if not isinstance(d, dict):
        raise UserError(f"CIFAR batch {str(path)!r} holds a pickled {type(d).__name__}, not a dict; {_CIFAR_FIX}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one batch, checked: a batch with no
    ``labels``, rows that are not 3072 bytes, or counts that disagree is refused by name."""
    d = _read_cifar_batch(path)
    missing = [k for k in ("data", "labels") if k not in d]
    if missing:
        raise UserError(f"CIFAR batch {str(path)!r} has no {' or '.join(repr(k) for k in missing)} entry "
                        f"(it has {sorted(map(str, d))}); {_CIFAR_FIX}")
    try:
        x, y = np.asarray(d["data"]), np.asarray(d["labels"])
    except (TypeError, ValueError) as e:
        raise UserError(f"CIFAR batch {str(path)!r} has unreadable data or labels ({e}); {_CIFAR_FIX}") from None
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.dtype.kind not in "iu" or (x.size and (x.min() < 0 or x.max() > 255)):
        raise UserError(f"CIFAR batch {str(path)!r}: 'data' must be rows of 3072 bytes (3x32x32 images), got "
                        f"{x.dtype} of shape {list(x.shape)}; {_CIFAR_FIX}")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"CIFAR batch {str(path)!r} has {len(x)} images but labels of shape {list(y.shape)}; {_CIFAR_FIX}")
    if len(y) and y.dtype.kind not in "iu":
        raise UserError(f"CIFAR batch {str(path)!r}: labels must be integers, got {y.dtype}; {_CIFAR_FIX}")
    return x.astype(np.uint8).reshape(-1, 3, 32, 32), y.astype(np.int64)


@DATASETS.register("cifar10", "CIFAR-10 python batches: cifar10:PATH (data_batch_1..5, test_batch)")
def _cifar10(arg: str, opts: DataOptions) -> DataBundle:
    root = Path(arg or opts.data_dir or "")
    batches = sorted(root.glob("data_batch_*")) if arg or opts.data_dir else []
    if not batches:
        raise UserError(f"no CIFAR-10 data_batch_* files in {str(root)!r}; use cifar10:PATH to the extracted cifar-10-batches-py")
    parts = [_cifar_arrays(b) for b in batches]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    xt = yt = None
    if (root / "test_batch").is_file():
        xt, yt = _cifar_arrays(root / "test_batch")
    classes: list[str] = []
    if (root / "batches.meta").is_file():
        meta = _read_cifar_batch(root / "batches.meta")
        names = meta.get("label_names", [])
        if not isinstance(names, list):
            raise UserError(f"{str(root / 'batches.meta')!r}: 'label_names' must be a list; {_CIFAR_FIX}")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    return _tensor_bundle("cifar10", x, y, xt, yt, opts, 0.1, classes, 255.0, where=f"CIFAR-10 in {str(root)!r}")


def _open_image(path: str) -> Any:
    """torchvision's default loader, but a file PIL cannot decode (truncated, not an image) is a
    UserError naming it, raised when the sample is read; decoding every file up front would
    double the time to open a large folder."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL's UnidentifiedImageError, "Truncated File Read", a failing plugin
        raise UserError(f"cannot decode image {path!r} ({type(e).__name__}: {e}); delete or replace the file") from None


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
    train: Dataset
    val: Dataset
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train_f = datasets.ImageFolder(str(root / "train"), tf, loader=_open_image)
            val_f = datasets.ImageFolder(str(root / "val"), tf, loader=_open_image)
            if train_f.classes != val_f.classes:
                raise UserError(f"image folder {str(root)!r}: train/ has classes {train_f.classes} but val/ has "
                                f"{val_f.classes}; give both the same class sub-folders")
            train, val, classes = train_f, val_f, train_f.classes
        else:
            full = datasets.ImageFolder(str(root), tf, loader=_open_image)
            classes = full.classes
            if len(classes) >= 2:
                tr, va = _split(len(full), opts.val_fraction or 0.1, opts.seed, f"image folder {str(root)!r}")
                train, val = Subset(full, tr), Subset(full, va)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"cannot read image folder {str(root)!r}: {str(e).splitlines()[0]}") from None
    if len(classes) < 2:
        raise UserError(f"image folder {str(root)!r} has {len(classes)} class sub-folder(s) {list(classes)}; "
                        "a classifier needs at least 2 classes: add a sub-folder of images per class")
    return DataBundle("imagefolder", train, val, None, len(classes), 3, (size, size), mean, std, list(classes))


@DATASETS.register("yolo", "YOLO-format detection data: yolo:PATH/data.yaml (images/ + labels/); --image-size (default 320)")
def _yolo(arg: str, opts: DataOptions) -> DataBundle:
    from deploy_prune.data import yolo

    cfg = yolo.read_config(arg or opts.data_dir or "")
    size, k = opts.image_size or yolo.DEFAULT_SIZE, len(cfg.names)
    return DataBundle("yolo", yolo.DetectionSet(cfg.train, k, size), yolo.DetectionSet(cfg.val, k, size), None, k, 3,
                      (size, size), [], [], cfg.names, task="detect")


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
    """A DataLoader with a seeded shuffle (same seed, same order) and no worker processes by default;
    batches are made by the dataset's own ``collate`` where it has one (``data.yolo``)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, generator=g,
        num_workers=workers, drop_last=False, collate_fn=getattr(underlying(ds), "collate", None),
    )


def underlying(ds: Dataset) -> Dataset:
    """The dataset a ``Subset`` (of a ``Subset`` ...) selects from; ``ds`` itself otherwise."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


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
