"""``deploy-prune doctor``: what this installation can do here."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from deploy_prune import __version__
from deploy_prune.backends import backend_status
from deploy_prune.config import list_targets
from deploy_prune.data import data_available
from deploy_prune.io import cpu_model


def doctor_report() -> dict[str, Any]:
    cuda = "no"
    if torch.cuda.is_available():
        cuda = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    versions = {}
    for mod in ("onnx", "onnxruntime", "openvino", "tensorrt", "torch_pruning", "torchvision"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed or broken: report as missing
            versions[mod] = None
    return {
        "deploy_prune": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": cuda, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "packages": versions,
        "backends": backend_status(), "datasets": data_available(), "targets": sorted(list_targets()),
    }
