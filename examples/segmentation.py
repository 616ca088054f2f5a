"""Compress a segmentation network to a measured latency budget with deploy-prune's Python API.

The task is not classification: a small encoder-decoder labels every pixel of generated images
(noise with a bright disc and a dark square: background, disc, square), trained with a per-pixel
cross-entropy and judged by mean intersection-over-union. deploy-prune gets the model, the data,
the training loop and the metric from here, and its budget is latency measured on the target:

    python examples/segmentation.py --target cpu-ort-1t --latency-ratio 0.6 --out runs/segmentation

Nothing is downloaded; the images are made here from a seed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deploy_prune as dp

CLASSES = 3  # background, disc, square


def shapes(n: int, size: int = 32, seed: int = 0) -> TensorDataset:
    """``n`` noisy grey images, each with one disc (label 1) and one square (label 2)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    y = torch.zeros(n, size, size, dtype=torch.long)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        cy, cx = torch.randint(6, size - 6, (2,), generator=g).tolist()
        r = int(torch.randint(3, 6, (1,), generator=g))
        disc = (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
        sy, sx = torch.randint(0, size - 8, (2,), generator=g).tolist()
        side = int(torch.randint(4, 8, (1,), generator=g))
        square = torch.zeros(size, size, dtype=torch.bool)
        square[sy:sy + side, sx:sx + side] = True
        x[i, 0][disc] += 1.0
        x[i, 0][square] -= 1.0
        y[i][disc] = 1
        y[i][square] = 2
    return TensorDataset(x, y)


class TinySeg(nn.Module):
    """Two strided conv stages down, two upsampling stages back, a 1x1 classifier per pixel."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.encoder = nn.Sequential(block(1, width), block(width, 2 * width, 2), block(2 * width, 2 * width, 2))
        self.decoder = nn.Sequential(nn.Upsample(scale_factor=2), block(2 * width, width),
                                     nn.Upsample(scale_factor=2), block(width, width))
        self.head = nn.Conv2d(width, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


def pixel_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The task's loss: cross-entropy per pixel."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def mean_iou(model: nn.Module, data: TensorDataset) -> float:
    """Mean intersection-over-union over the classes, on ``data``."""
    model.eval()
    inter = torch.zeros(CLASSES)
    union = torch.zeros(CLASSES)
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=128):
            pred = model(x).argmax(1)
            for c in range(CLASSES):
                inter[c] += ((pred == c) & (y == c)).sum()
                union[c] += ((pred == c) | (y == c)).sum()
    return float((inter / union.clamp(min=1)).mean())


def train(model: nn.Module, data: TensorDataset, epochs: float, seed: int = 0,
          after_step: object = None) -> None:
    """The user's own loop: Adam, per-pixel loss; ``after_step(model)`` after every step."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    steps = max(1, math.ceil(epochs * len(loader)))
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            opt.zero_grad()
            pixel_loss(model, batch).backward()
            opt.step()
            if callable(after_step):
                after_step(model)
            done += 1
            if done >= steps:
                break


def main(argv: list[str] | None = None) -> dp.Result:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--latency-ratio", type=float, default=0.6)
    ap.add_argument("--train-images", type=int, default=512)
    ap.add_argument("--val-images", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8, help="training of the unpruned model")
    ap.add_argument("--finetune-epochs", type=int, default=8, help="final fine-tuning after pruning")
    ap.add_argument("--out", type=Path, default=Path("runs/segmentation"))
    ap.add_argument("--profiles", type=Path, default=Path("profiles"))
    ap.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    train_set, val_set = shapes(args.train_images, seed=0), shapes(args.val_images, seed=1)
    model = TinySeg()
    train(model, train_set, args.epochs)
    before = mean_iou(model, val_set)
    print(f"unpruned: mIoU {before:.3f}", flush=True)

    def finetune(m: nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
        train(m, train_set, epochs, seed=ctx.seed, after_step=ctx.apply_masks)

    def mIoU(m: nn.Module) -> float:  # noqa: N802  (the report names the metric after the function)
        return mean_iou(m, val_set)

    result = dp.compress(model, torch.zeros(1, 1, 32, 32), target=args.target, budget=dp.LatencyRatio(args.latency_ratio),
                         method="uniform", train=train_set, finetune=finetune, evaluate=mIoU, out=args.out,
                         profiles=args.profiles, epochs=args.finetune_epochs, overwrite=args.overwrite,
                         progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    rep = result.report
    print(f"{rep['metric']['name']}: {rep['baseline']['accuracy']:.3f} -> {rep['final']['accuracy']:.3f}; "
          f"latency {rep['baseline']['latency_ms']['quiet']:.3f} -> {rep['final']['latency_ms']['quiet']:.3f} ms; "
          f"budget {'MET' if result.met_budget else 'NOT MET'} ({rep['budget_note']}); run in {result.out}")
    return result


if __name__ == "__main__":
    main()
