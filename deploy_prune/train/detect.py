"""Detection's loss and metric for an ultralytics YOLO on ``data.yolo`` batches: the loss is
ultralytics' own (``model.loss``: box IoU, classification and DFL terms with its default gains),
the metric mAP50-95 and mAP50 as ultralytics' validator computes them (NMS at confidence 0.001
and IoU 0.7, greedy matching at IoU 0.50:0.95, its ``ap_per_class``), on the model's export-form
output. The math is ultralytics'; only the loop over batches is here.

    loss = DetectionLoss()                       # dp.compress(..., loss=loss, evaluate=MeanAP(val))
    MeanAP(val)(model)                           # mAP50-95 in [0, 1]; .last holds mAP50 too
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deploy_prune.data.yolo import as_ultralytics, collate

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)


class DetectionLoss:
    """``(model, batch) -> Tensor``: ultralytics' detection loss per image (its criterion sums
    over the batch), with ultralytics' default hyperparameters unless the model carries its own
    ``args`` (a trained model does)."""

    __name__ = "detection_loss"

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        from ultralytics.cfg import get_cfg

        core: Any = getattr(model, "module", model)  # DDP
        args = getattr(core, "args", None)
        if args is None or isinstance(args, dict):  # a checkpoint keeps its training arguments as a dict
            core.args = get_cfg(overrides=args)
        images, targets = batch
        loss, _ = core.loss(as_ultralytics(images, targets), model(images))
        return loss.sum() / len(images)


@dataclass
class MeanAP:
    """``(model) -> mAP50-95`` on ``data``; ``last`` holds the last call's mAP50-95 and mAP50."""

    data: Dataset
    batch_size: int = 16
    conf: float = 0.001
    iou: float = 0.7
    last: dict[str, float] = field(default_factory=dict)
    __name__ = "mAP50-95"

    def __call__(self, model: nn.Module) -> float:
        from ultralytics.engine.validator import BaseValidator
        from ultralytics.utils.metrics import ap_per_class, box_iou
        from ultralytics.utils.nms import non_max_suppression
        from ultralytics.utils.ops import xywh2xyxy

        matcher = SimpleNamespace(iouv=IOU_THRESHOLDS)
        stats: dict[str, list[Any]] = {"tp": [], "conf": [], "pred_cls": [], "target_cls": []}
        was = model.training
        model.eval()
        device = next(model.parameters(), torch.zeros(0)).device  # an ONNX-backed module (an int8 artefact) has none
        with torch.no_grad():
            for images, targets in DataLoader(self.data, batch_size=self.batch_size, collate_fn=collate):
                batch = as_ultralytics(images, targets)
                img = images.to(device)
                y = model(img)
                dets = non_max_suppression(y[0] if isinstance(y, (tuple, list)) else y, self.conf, self.iou, max_det=300)
                h, w = img.shape[-2:]
                scale = torch.tensor([w, h, w, h], dtype=torch.float32)
                for i, d in enumerate(dets):
                    mine = batch["batch_idx"] == i
                    cls, boxes = batch["cls"][mine, 0], xywh2xyxy(batch["bboxes"][mine]) * scale
                    d = d.cpu()
                    stats["target_cls"].append(cls.numpy())
                    stats["conf"].append(d[:, 4].numpy())
                    stats["pred_cls"].append(d[:, 5].numpy())
                    if len(d) and len(cls):
                        correct = BaseValidator.match_predictions(matcher, d[:, 5], cls, box_iou(boxes, d[:, :4]))  # type: ignore[arg-type]
                    else:
                        correct = torch.zeros(len(d), len(IOU_THRESHOLDS), dtype=torch.bool)
                    stats["tp"].append(correct.numpy())
        model.train(was)
        arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in stats.items()}
        if not len(arrays["conf"]) or not len(arrays["target_cls"]):
            self.last = {"map50_95": 0.0, "map50": 0.0}
            return 0.0
        ap = ap_per_class(arrays["tp"].reshape(-1, len(IOU_THRESHOLDS)), arrays["conf"], arrays["pred_cls"],
                          arrays["target_cls"])[5]
        self.last = {"map50_95": float(ap.mean()), "map50": float(ap[:, 0].mean())}
        return self.last["map50_95"]
