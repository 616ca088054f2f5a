"""Generated detection data: shapes (rectangle, ellipse, triangle) on noisy backgrounds, written
as a YOLO-format folder (``images/{train,val}``, ``labels/{train,val}``, ``data.yaml``) for tests,
examples and smoke runs without a download. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploy_prune.io import ensure_dir

NAMES = ["rectangle", "ellipse", "triangle"]


def _draw(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, list[str]]:
    from PIL import Image, ImageDraw

    base = rng.integers(0, 90, 3)
    noise = rng.integers(-25, 25, (size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    lines = []
    for _ in range(int(rng.integers(0, max_objects + 1))):
        cls = int(rng.integers(0, len(NAMES)))
        w, h = (int(v) for v in rng.integers(size // 8, size // 2, 2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        box, colour = (x0, y0, x0 + w, y0 + h), tuple(int(c) for c in rng.integers(120, 256, 3))
        if cls == 0:
            draw.rectangle(box, fill=colour)
        elif cls == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(x0 + w / 2, y0), (x0, y0 + h), (x0 + w, y0 + h)], fill=colour)
        lines.append(f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
    return np.asarray(img), lines


def write_shapes(root: str | Path, train: int = 64, val: int = 16, size: int = 128, seed: int = 0,
                 max_objects: int = 3) -> Path:
    """Write the folder under ``root`` and return its ``data.yaml`` (images without objects get
    an empty label file: background images)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        images, labels = ensure_dir(root / "images" / split), ensure_dir(root / "labels" / split)
        for i in range(n):
            arr, lines = _draw(rng, size, max_objects)
            Image.fromarray(arr).save(images / f"{i:05d}.png")
            (labels / f"{i:05d}.txt").write_text("".join(f"{line}\n" for line in lines))
    cfg = root / "data.yaml"
    cfg.write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES)))
    return cfg
