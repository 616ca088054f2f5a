"""Ultralytics YOLO models (detect, segment, pose; v8, 11): built from their ``.yaml`` or loaded from a
trusted ``.pt``, and put in the form ultralytics exports for deployment.

ultralytics is an optional extra (``pip install 'deploy-prune[ultralytics]'``, AGPL-3.0), imported
only here and only when a YOLO model is used; nothing of it is vendored. Before the first import
its network use is switched off (``YOLO_OFFLINE``, no auto-install of requirements), unless the
user set those variables. ``deploy_form`` sets every head to export mode: the forward returns the
one decoded tensor (boxes and class scores per anchor, NMS left outside the model), as
ultralytics' ONNX export and its own benchmark do; training mode is unchanged, so ultralytics'
losses take the model as they would the original.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from deploy_prune.errors import UserError

PIP = "pip install 'deploy-prune[ultralytics]'"
UNITS = ("Attention", "AAttn")  # ultralytics' attention blocks (YOLO11's PSA, YOLO12's area attention)
OFFLINE = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_VERBOSE": "0"}


def offline() -> None:
    """Switch ultralytics' network use off before it is imported (``OFFLINE``), unless the user set those variables."""
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)


def import_ultralytics() -> Any:
    """The ultralytics package, with its network use off; one line naming the extra if missing."""
    offline()
    try:
        import ultralytics
    except ImportError:
        raise UserError(f"YOLO models need ultralytics: {PIP}") from None
    _undo_pil_patch()
    return ultralytics


def _undo_pil_patch() -> None:
    """ultralytics replaces ``PIL.Image.open`` on import with one that installs pi-heif from the
    network when a file does not decode; the process gets PIL's own back."""
    try:
        from PIL import Image
        from ultralytics.utils import patches
    except ImportError:
        return
    original = getattr(patches, "_image_open", None)
    if callable(original):
        Image.open = original


def is_ultralytics(model: nn.Module) -> bool:
    return type(model).__module__.startswith("ultralytics.")


def deploy_form(model: nn.Module) -> list[str]:
    """Put an ultralytics model's heads in export mode (module doc); a note for the report, or none
    for any other model."""
    if not is_ultralytics(model):
        return []
    heads = [m for m in model.modules() if type(m).__module__.startswith("ultralytics.") and hasattr(m, "export")
             and hasattr(m, "format")]
    for h in heads:
        for k, v in (("export", True), ("format", "onnx"), ("dynamic", False)):
            setattr(h, k, v)
    for m in model.modules():  # attention inside C2PSA / A2C2f: kept whole until heads are cut
        if type(m).__name__ in UNITS and type(m).__module__.startswith("ultralytics."):
            m.prune_as_unit = True  # type: ignore[assignment]
    kinds = sorted({type(h).__name__ for h in heads})
    return [f"ultralytics {', '.join(kinds) or 'model'}: head in export mode (one decoded output, NMS outside the model, "
            "as ultralytics exports and benchmarks it)"] if heads else []


def build(cfg: str, num_classes: int | None, in_channels: int = 3) -> nn.Module:
    """A random-init YOLO from an ultralytics model ``.yaml`` (a name it ships, such as
    ``yolov8n.yaml`` or ``yolo11s-seg.yaml``, or a local file); ``num_classes`` None keeps the yaml's."""
    import_ultralytics()
    from ultralytics.nn import tasks

    if not cfg.endswith((".yaml", ".yml")):
        raise UserError(f"ultralytics:{cfg} names no model config; use e.g. ultralytics:yolov8n.yaml (a .pt goes in --weights)")
    try:
        task = tasks.guess_model_task(cfg)
        cls = {"detect": tasks.DetectionModel, "segment": tasks.SegmentationModel, "pose": tasks.PoseModel,
               "classify": tasks.ClassificationModel, "obb": tasks.OBBModel}[task]
        model = cls(cfg, ch=in_channels, nc=num_classes, verbose=False)
    except FileNotFoundError:
        raise UserError(f"ultralytics has no model config {cfg!r}; names look like yolov8n.yaml, yolo11n.yaml, yolov8s-seg.yaml") from None
    model.eval()
    deploy_form(model)
    return model  # type: ignore[no-any-return]


def from_checkpoint(ckpt: Any) -> nn.Module | None:
    """The model in an ultralytics training checkpoint (its EMA weights where saved), in float32
    and deployment form; None for anything else."""
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module)):
        return None
    model = (ckpt.get("ema") or ckpt["model"]).float().eval()
    if not is_ultralytics(model):
        return None
    _undo_pil_patch()  # unpickling imported ultralytics
    deploy_form(model)
    return model  # type: ignore[no-any-return]
