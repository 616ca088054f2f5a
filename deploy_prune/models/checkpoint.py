"""Checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and primitives, so loading it never runs pickled
code. It records how to rebuild the model (registry spec, classes, input channels) and the
input shape and normalisation the model was trained with. A whole pickled ``nn.Module`` is
loaded only when the user passes ``--trust-checkpoint``.

A pruned model (``compress`` output) also records ``pruned: {widths, ignore}``: the
registered architecture is built, cut to those per-group widths, then its weights loaded.

A file that is not ours (a plain pickle, a ``torch.save`` of arbitrary objects) is refused in
one line that says what it is; torch's own text would call a malicious file "corrupt" and
suggest ``weights_only=False``, i.e. running it.
"""

from __future__ import annotations

import glob
import pickle
import re
import warnings
from collections.abc import Iterable
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
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if not trust:
            raise UserError(_refused(p, str(e))) from None
        raise UserError(f"checkpoint {str(p)!r} is corrupt or not a torch file ({_first_line(e)})") from None
    except Exception as e:  # zip, EOF, key errors of damaged files; anything a trusted pickle raises
        raise UserError(f"checkpoint {str(p)!r} is corrupt or not a torch file ({_first_line(e)}); "
                        "pass a file written by deploy-prune or torch.save") from None


def _first_line(e: BaseException) -> str:
    """torch's first sentence, without its multi-line advice."""
    if isinstance(e, LookupError) or not str(e).strip():  # KeyError('101'): the name says more
        return type(e).__name__
    line = str(e).strip().splitlines()[0]
    return line.split(". ")[0] if len(line) > 160 else line


def _refused(p: Path, torch_text: str) -> str:
    """One line for a file ``weights_only`` loading refused: what it is, and the way out. Only a
    file that is a pickle (named objects, or a pickle header) is pointed at --trust-checkpoint;
    anything else is damaged."""
    trust = "if you trust the file (e.g. a whole model you saved yourself), pass --trust-checkpoint"
    named = re.search(r"GLOBAL ([\w.]+)", torch_text)
    if named:  # a torch.save of arbitrary objects: unpickling it would import and call them
        return (f"{str(p)!r} is not a deploy-prune checkpoint: it contains pickled Python objects "
                f"({named.group(1)}) that loading would run as code, so they were not loaded; {trust}")
    with open(p, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return (f"{str(p)!r} is not a deploy-prune checkpoint: it is a plain Python pickle, which can run code "
                f"when loaded, so it was not loaded; {trust}")
    return f"checkpoint {str(p)!r} is corrupt or not a torch file; pass a file written by deploy-prune or torch.save"


def _check_ours(ckpt: dict[str, Any], weights: str | Path) -> None:
    """A dict that says it is a deploy-prune checkpoint must hold what ``load_model`` reads."""
    version = ckpt.get("version")
    if isinstance(version, int) and version > VERSION:
        raise UserError(f"{str(weights)!r} is a version {version} checkpoint from a newer deploy-prune "
                        f"(this one reads version {VERSION}); upgrade deploy-prune")
    model = ckpt.get("model")
    ok = (isinstance(model, dict) and isinstance(model.get("spec"), str) and isinstance(model.get("num_classes"), int)
          and isinstance(model.get("in_channels"), int) and isinstance(ckpt.get("state_dict"), dict))
    if not ok:
        raise UserError(f"{str(weights)!r} is a damaged deploy-prune checkpoint (no model spec, classes, input "
                        "channels or state dict); retrain it or pass another file")


def remove_stale_temps(directory: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temp files a killed ``io.atomic_write`` left beside ``names`` in ``directory``
    (``.NAME.XXXXXXXX.tmp``, as ``tempfile.mkstemp`` makes them). Every command that writes a run
    directory calls this first, so a crash leaves no litter for long; two commands writing the
    same file at the same moment are not supported anyway."""
    d = Path(directory)
    removed: list[Path] = []
    for name in names:
        for t in d.glob(f".{glob.escape(name)}.{'?' * 8}.tmp"):
            if t.is_file():
                t.unlink(missing_ok=True)
                removed.append(t)
    return removed


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
        _check_ours(ckpt, weights)
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
