"""YOLO-format detection data (``yolo:PATH/data.yaml``), read locally and checked before training.

``data.yaml`` names ``train`` and ``val`` (image folders or ``.txt`` lists of images, relative to
its ``path`` key or to the yaml's folder) and the classes (``names``: a list or an index map;
``nc`` must agree). Each image's labels are the ``.txt`` of the same name under the sibling
``labels/`` folder (``images/`` -> ``labels/``): one line per object, ``class cx cy w h``
normalised to [0, 1] (a segmentation polygon ``class x1 y1 x2 y2 ...`` gives its bounding box).
An empty label file is a background image; a missing one, a line of the wrong arity, a class id
outside ``names`` or a coordinate outside [0, 1] stops the run naming the file and the line.

Images are resized to ``--image-size`` squares (default 320) without letterboxing; boxes stay
normalised, so they follow the stretch. Items are ``(image, labels)`` with labels an (n, 5)
tensor; ``collate`` batches them as YOLO's ``(images, targets)`` pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Dataset

from deploy_prune.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_SIZE = 320


@dataclass(frozen=True)
class DetectionConfig:
    """What ``data.yaml`` says: where the splits' images are and the class names."""

    root: Path
    train: list[Path]
    val: list[Path]
    names: list[str]


def read_config(path: str | Path) -> DetectionConfig:
    """``data.yaml`` parsed and its image lists found (module doc); one line on any problem."""
    p = Path(path)
    if p.is_dir():
        p = p / "data.yaml"
    if not p.is_file():
        raise UserError(f"YOLO dataset config {str(p)!r} not found; use yolo:PATH/data.yaml")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{str(p)!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{str(p)!r} must be a mapping with train, val and names")
    missing = [k for k in ("train", "val", "names") if k not in cfg]
    if missing:
        raise UserError(f"{str(p)!r} has no {', '.join(missing)}; a YOLO data.yaml names train, val and names")
    names = cfg["names"]
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise UserError(f"{str(p)!r}: names must be indexed 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise UserError(f"{str(p)!r}: names must be a non-empty list of class names")
    if "nc" in cfg and cfg["nc"] != len(names):
        raise UserError(f"{str(p)!r}: nc is {cfg['nc']} but names lists {len(names)} classes")
    root = Path(cfg.get("path") or p.parent)
    root = root if root.is_absolute() else p.parent / root
    return DetectionConfig(root, _images(root, cfg["train"], p), _images(root, cfg["val"], p), [str(n) for n in names])


def _images(root: Path, spec: Any, cfg: Path) -> list[Path]:
    found: list[Path] = []
    for s in spec if isinstance(spec, list) else [spec]:
        d = root / str(s)
        if d.is_dir():
            found += sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif d.is_file() and d.suffix == ".txt":
            found += [(root / line.strip()) for line in d.read_text().splitlines() if line.strip()]
        else:
            raise UserError(f"{str(cfg)!r}: {str(d)!r} is neither an image folder nor a .txt list of images")
    if not found:
        raise UserError(f"{str(cfg)!r}: no images under {spec!r}")
    return found


def label_path(image: Path) -> Path:
    """The label file of an image: ``.../images/x.jpg`` -> ``.../labels/x.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def read_labels(image: Path, classes: int) -> torch.Tensor:
    """An image's objects as an (n, 5) tensor of ``class cx cy w h`` (module doc for the checks)."""
    lp = label_path(image)
    if not lp.is_file():
        raise UserError(f"image {str(image)!r} has no label file {str(lp)!r}; add an empty one for a background image")
    rows = []
    for n, line in enumerate(lp.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{str(lp)!r} line {n}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise UserError(f"{where} has {len(fields)} fields; a box is 'class cx cy w h' (5 fields)")
        try:
            cls, vals = float(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise UserError(f"{where} holds a non-number: {line.strip()!r}") from None
        if cls != int(cls) or not 0 <= cls < classes:
            raise UserError(f"{where}: class {fields[0]} is not one of the {classes} classes (0..{classes - 1}) in names")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vals):
            raise UserError(f"{where}: coordinates must be normalised to [0, 1], got {' '.join(fields[1:])}")
        if len(vals) > 4:  # a polygon: its bounding box
            xs, ys = vals[0::2], vals[1::2]
            vals = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        if vals[2] <= 0 or vals[3] <= 0:
            raise UserError(f"{where}: a box needs a width and height above 0, got {vals[2]:g} x {vals[3]:g}")
        rows.append([cls, *vals])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


class DetectionSet(Dataset):
    """Images resized to ``size`` squares (RGB, [0, 1]) with their (n, 5) labels, read up front
    (labels: small text files, every problem found before training) and decoded on access."""

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate(items)

    def __init__(self, images: list[Path], classes: int, size: int) -> None:
        self.images, self.size = images, size
        self.labels = [read_labels(p, classes) for p in images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor, resize

        try:
            with Image.open(self.images[i]) as im:
                x = pil_to_tensor(im.convert("RGB"))
        except Exception as e:
            raise UserError(f"cannot decode image {str(self.images[i])!r} ({type(e).__name__}); delete or replace it") from None
        return resize(x, [self.size, self.size], antialias=True).float() / 255.0, self.labels[i]


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, targets)``: targets an (n, 6) tensor of ``image-in-batch class cx cy w h`` (the
    classic YOLO batch; ``as_ultralytics`` turns it into ultralytics' loss dict)."""
    return (torch.stack([x for x, _ in items]),
            torch.cat([torch.cat([torch.full((len(y), 1), float(i)), y], 1) for i, (_, y) in enumerate(items)]))


def as_ultralytics(images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ultralytics' batch dict (``img``, ``batch_idx``, ``cls``, ``bboxes`` in normalised xywh)."""
    return {"img": images, "batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:]}
