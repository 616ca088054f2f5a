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
    if trust:  # a trusted pickle may import ultralytics: with its network use off (models.ultralytics)
        from deploy_prune.models.ultralytics import offline

        offline()
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
    A bare state dict needs ``model_spec``; its classes and input channels are ``num_classes``
    and ``in_channels`` where given, else read from its weights (``state_dict_io``). A
    ``model_spec`` other than the one a checkpoint records may rebuild it (a user model's file
    moved); one whose architecture its weights do not fit is refused naming both.
    """
    if weights is None:
        if model_spec is None or num_classes is None or in_channels is None:
            raise UserError("no --weights given: --model and data are needed to build a model")
        return build_model(model_spec, num_classes, in_channels), {}
    ckpt = load_checkpoint(weights, trust=trust)
    if isinstance(ckpt, nn.Module):
        return ckpt, {}
    from deploy_prune.models.ultralytics import from_checkpoint

    yolo = from_checkpoint(ckpt)
    if yolo is not None:  # an ultralytics training checkpoint (trusted: it is a pickle)
        return yolo, {}
    if not isinstance(ckpt, dict):
        raise UserError(f"{str(weights)!r} holds a {type(ckpt).__name__}, not a checkpoint or state dict")
    read = ""
    if ckpt.get("format") == FORMAT:
        _check_ours(ckpt, weights)
        meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler")}
        state = ckpt["state_dict"]
        recorded = meta["model"]["spec"]
        spec = model_spec or recorded
        nc = meta["model"]["num_classes"] if num_classes is None else num_classes
        ic = meta["model"]["in_channels"] if in_channels is None else in_channels
    else:  # a bare state dict from elsewhere: the user names the architecture
        meta, state, recorded = {}, ckpt.get("state_dict", ckpt), None
        if not isinstance(state, dict):
            raise UserError(f"{str(weights)!r} holds a {type(state).__name__} under 'state_dict', not a state dict")
        if model_spec is None:
            raise UserError(f"{str(weights)!r} is a bare state dict; name its architecture with --model")
        io_read = state_dict_io(state)
        nc = num_classes if num_classes is not None else io_read[0]
        ic = in_channels if in_channels is not None else io_read[1]
        if nc is None or ic is None:
            raise UserError(f"{str(weights)!r} is a bare state dict whose classes and input channels cannot be read "
                            "from its weights; pass the --data it was trained on")
        spec = model_spec
        read = ", read from its weights" if num_classes is None or in_channels is None else ""
    if recorded is not None and spec != recorded:
        try:
            return _rebuild(spec, nc, ic, meta, state, weights, read), meta
        except Exception:  # any failure: the architecture named is not the one trained
            raise UserError(f"{str(weights)!r} was trained as model {recorded!r} and does not fit model {spec!r}; "
                            f"drop --model, or pass --model {recorded}") from None
    return _rebuild(spec, nc, ic, meta, state, weights, read), meta


def _rebuild(spec: str, nc: int, ic: int, meta: dict[str, Any], state: dict[str, Any], weights: str | Path,
             read: str) -> nn.Module:
    """``spec`` built for ``nc`` classes and ``ic`` channels, cut to a compress result's widths, with ``state`` loaded."""
    model = build_model(spec, nc, ic)
    if meta.get("pruned"):  # a compress result: cut the architecture to its widths first
        from deploy_prune.transforms import rebuild_pruned

        try:
            rebuild_pruned(model, meta["pruned"], meta["input_shape"])
        except Exception as e:
            raise UserError(f"checkpoint {str(weights)!r}: its pruned widths do not fit model {spec!r} "
                            f"({type(e).__name__}: {_first_line(e)}); check --model and --data") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {str(weights)!r} does not fit model {spec!r} ({nc} classes, {ic} input channels{read}): "
            f"{_load_problem(e)}; check --model and --data"
        ) from None
    return model


def state_dict_io(state: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(classes, input channels)`` of the model a state dict's weights are for, as far as their
    shapes tell (None where they do not): the rows of the last matrix (else the outputs of the
    last conv) and the inputs of the first conv, in the state dict's order (the modules')."""
    tensors = [v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
               and k.endswith("weight")]
    convs = [t for t in tensors if t.ndim == 4]
    mats = [t for t in tensors if t.ndim == 2]
    head = mats[-1] if mats else (convs[-1] if convs else None)
    classes = int(head.shape[0]) if head is not None else None
    channels = int(convs[0].shape[1]) if convs else None
    return classes, channels


def _load_problem(e: RuntimeError) -> str:
    """The first thing ``load_state_dict`` found wrong (torch's first line only names the class)."""
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
    first = lines[0] if lines else str(e).splitlines()[0] if str(e) else type(e).__name__
    return first if len(first) <= 200 else first[:200] + "..."


def _first_mismatch(model: nn.Module, state: dict[str, Any]) -> str | None:
    """The first key where ``model``'s state dict and ``state`` disagree (missing, unexpected, or
    of another shape), described; None when they fit."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            return f"{k} (in your model, not in the run)"
        got = getattr(state[k], "shape", None)
        if got is not None and tuple(got) != tuple(v.shape):
            return f"{k} (shape {list(v.shape)} in your model, {list(got)} in the run)"
    extra = next((k for k in state if k not in own), None)
    return f"{extra} (in the run, not in your model)" if extra is not None else None


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a compress run's ``model.pt`` into ``model``, a fresh instance of the architecture the
    run compressed: cut to the run's widths, then given its weights (in place; returned). A model
    of another architecture is refused in one line naming the first key that does not fit. A
    model of a known family is put in the form the run pruned first (``ultralytics.deploy_form``)."""
    from deploy_prune.models.ultralytics import deploy_form
    from deploy_prune.transforms import rebuild_pruned

    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or "pruned" not in ck or not isinstance(ck.get("state_dict"), dict):
        raise UserError(f"{str(path)!r} is not the model.pt of a compress run")
    spec = str((ck.get("model") or {}).get("spec") or "the compressed model")
    fix = f"pass a fresh instance of the architecture the run compressed ({spec})"
    unpruned = _first_mismatch(model, ck["state_dict"])
    if unpruned is not None and "shape" not in unpruned:  # widths differ until the model is cut; names do not
        raise UserError(f"{str(path)!r} does not fit this {type(model).__name__}: first mismatch {unpruned}; {fix}")
    deploy_form(model)
    try:
        rebuild_pruned(model, ck["pruned"], ck["input_shape"])
    except UserError as e:
        raise UserError(f"{str(path)!r} does not fit this {type(model).__name__}: {e}; {fix}") from None
    except Exception as e:
        raise UserError(f"{str(path)!r} does not fit this {type(model).__name__}: cutting it to the run's widths failed "
                        f"({type(e).__name__}: {_first_line(e)}); {fix}") from None
    bad = _first_mismatch(model, ck["state_dict"])
    if bad is not None:
        raise UserError(f"{str(path)!r} does not fit this {type(model).__name__}: first mismatch {bad}; {fix}")
    model.load_state_dict(ck["state_dict"])
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
