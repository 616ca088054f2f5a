"""Compress an ultralytics YOLOv8n detector to measured latency budgets with deploy-prune's Python API.

Generated images (shapes on noise, boxes in YOLO format: ``deploy_prune.data.shapes``) train a
YOLOv8n from its yaml (random init, nothing downloaded); the example's own fine-tuning loop uses
ultralytics' loss, and the metric is mAP50-95 (mAP50 printed beside it). Each target and latency
ratio is one ``dp.compress`` run; the head runs in ultralytics' export mode (NMS outside the model),
so the latency is the figure ultralytics' own benchmark reports.

    python examples/detection.py --targets cpu-ort-1t,cpu-openvino-1t,cpu-ort-int8-1t --ratios 0.6,0.4

needs ``pip install 'deploy-prune[ultralytics]'`` (AGPL-3.0, imported at run time).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import deploy_prune as dp
from deploy_prune.data import DataOptions, load_data
from deploy_prune.data.shapes import write_shapes
from deploy_prune.data.yolo import collate
from deploy_prune.models.ultralytics import import_ultralytics
from deploy_prune.train.detect import DetectionLoss, MeanAP


def train(model: nn.Module, data: object, epochs: float, seed: int = 0, after_step: object = None,
          batch_size: int = 16, lr: float = 2e-3) -> None:
    """The user's own loop: AdamW on ultralytics' loss; ``after_step(model)`` after every step."""
    loss_fn = DetectionLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate,  # type: ignore[arg-type]
                        generator=torch.Generator().manual_seed(seed))
    steps, done = max(1, math.ceil(epochs * len(loader))), 0
    model.train()
    while done < steps:
        for batch in loader:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            if callable(after_step):
                after_step(model)
            done += 1
            if done >= steps:
                break


def main(argv: list[str] | None = None) -> list[dp.Result]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="cpu-ort-1t", help="comma-separated target names or YAML files")
    ap.add_argument("--ratios", default="0.6", help="comma-separated latency ratios")
    ap.add_argument("--size", type=int, default=128, help="input size (square)")
    ap.add_argument("--train-images", type=int, default=384)
    ap.add_argument("--val-images", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=30, help="training of the unpruned model")
    ap.add_argument("--finetune-epochs", type=int, default=4, help="final fine-tuning after pruning")
    ap.add_argument("--data", type=Path, default=Path("runs/detection/shapes"))
    ap.add_argument("--out", type=Path, default=Path("runs/detection"))
    ap.add_argument("--profiles", type=Path, default=Path("profiles"))
    ap.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    args = ap.parse_args(argv)

    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    cfg = write_shapes(args.data, train=args.train_images, val=args.val_images, size=args.size, seed=0)
    data = load_data(f"yolo:{cfg}", DataOptions(image_size=args.size))
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=data.num_classes, verbose=False)
    train(model, data.train, args.epochs)
    metric = MeanAP(data.val)
    print(f"unpruned: mAP50-95 {metric(model):.3f}, mAP50 {metric.last['map50']:.3f}", flush=True)

    def finetune(m: nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
        train(m, data.train, epochs, seed=ctx.seed, after_step=ctx.apply_masks)

    results = []
    for target in args.targets.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            out = args.out / f"{Path(target).stem}-{ratio:g}"
            result = dp.compress(model, torch.zeros(1, 3, args.size, args.size), target=target,
                                 budget=dp.LatencyRatio(ratio), method="uniform", train=data.train, finetune=finetune,
                                 evaluate=metric, metric="mAP50-95", out=out, profiles=args.profiles,
                                 epochs=args.finetune_epochs, overwrite=args.overwrite,
                                 progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
            rep = result.report
            metric(result.model)
            print(f"{target} at {ratio:g}: mAP50-95 {rep['baseline']['accuracy']:.3f} -> {rep['final']['accuracy']:.3f} "
                  f"(mAP50 {metric.last['map50']:.3f}); latency {rep['baseline']['latency_ms']['quiet']:.3f} -> "
                  f"{rep['final']['latency_ms']['quiet']:.3f} ms; budget {'MET' if result.met_budget else 'NOT MET'} "
                  f"({rep['budget_note']}); run in {result.out}", flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main()
