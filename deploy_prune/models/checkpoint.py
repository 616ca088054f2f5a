"""Checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and primitives, so loading it never runs pickled
code. It records how to rebuild the model (registry spec, classes, input channels) and the
input shape and normalisation the model was trained with. A whole pickled ``nn.Module`` is
loaded only when the user passes ``--trust-checkpoint``.

A pruned model (``compress`` output) also records ``pruned: {widths, ignore}``: the
registered architecture is built, cut to those per-group widths, then its weights loaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.io import atomic_write
from deploy_prune.models import build_model

FORMAT = "deploy-prune/checkpoint"
VERSION = 1


def resolve_weights(weights: str | Path) -> Path:
    """A checkpoint file, or a run directory (``train``/``compress`` output) holding ``model.pt``."""
    p = Path(weights)
    if p.is_dir():
        cand = p / "model.pt"
        if not cand.is_file():
            raise UserError(f"run directory {str(p)!r} has no model.pt; pass a checkpoint file or a finished run")
        return cand
    if not p.is_file():
        raise UserError(f"checkpoint {str(p)!r} not found")
    return p


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any], **extra: Any) -> Path:
    """Write ``meta`` + the model's state dict (+ optimizer state etc. in ``extra``) atomically."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    obj = {"format": FORMAT, "version": VERSION, **meta, "state_dict": state, **extra}
    return atomic_write(path, lambda p: torch.save(obj, p))


def load_checkpoint(path: str | Path, trust: bool = False) -> Any:
    """Read a checkpoint safely; a pickled module needs ``trust=True``."""
    p = resolve_weights(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a valid pickle that names classes: code would run
            raise UserError(
                f"{str(p)!r} contains pickled Python objects (e.g. a whole model); "
                "load it only if you trust its source, with --trust-checkpoint"
            ) from None
        raise UserError(f"checkpoint {str(p)!r} is corrupt or not a torch file ({e})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"checkpoint {str(p)!r} is corrupt or not a torch file ({msg})") from None


def load_model(
    weights: str | Path | None,
    model_spec: str | None = None,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    trust: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint (or build a fresh one when ``weights`` is None).

    Returns ``(model, meta)``; ``meta`` carries the model spec, classes, input shape and data
    normalisation recorded at training time (empty for a bare state dict or pickled module).
    """
    if weights is None:
        if model_spec is None or num_classes is None or in_channels is None:
            raise UserError("no --weights given: --model and data are needed to build a model")
        return build_model(model_spec, num_classes, in_channels), {}
    ckpt = load_checkpoint(weights, trust=trust)
    if isinstance(ckpt, nn.Module):
        return ckpt, {}
    if not isinstance(ckpt, dict):
        raise UserError(f"{str(weights)!r} holds a {type(ckpt).__name__}, not a checkpoint or state dict")
    if ckpt.get("format") == FORMAT:
        meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler")}
        state = ckpt["state_dict"]
        spec = model_spec or meta["model"]["spec"]
        nc = meta["model"]["num_classes"] if num_classes is None else num_classes
        ic = meta["model"]["in_channels"] if in_channels is None else in_channels
    else:  # a bare state dict from elsewhere: the user names the architecture
        meta, state = {}, ckpt.get("state_dict", ckpt)
        if model_spec is None or num_classes is None or in_channels is None:
            raise UserError(f"{str(weights)!r} is a bare state dict; name the architecture with --model and --data")
        spec, nc, ic = model_spec, num_classes, in_channels
    model = build_model(spec, nc, ic)
    if meta.get("pruned"):  # a compress result: cut the architecture to its widths first
        from deploy_prune.transforms import rebuild_pruned

        rebuild_pruned(model, meta["pruned"], meta["input_shape"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(
            f"checkpoint {str(weights)!r} does not fit model {spec!r} ({nc} classes, {ic} input channels): "
            f"{first}; check --model and --data"
        ) from None
    return model, meta


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
