"""deploy-prune as a library: the user's own model, data, training loop and metric, pruned until
its latency *measured on the target* meets a budget.

The functions here only turn Python objects into the pipeline's inputs and call it; the CLI calls
the same pipeline (``deploy_prune.pipeline``), so a notebook gets exactly what the CLI gets.

    import torch, deploy_prune as dp

    result = dp.compress(model, torch.zeros(1, 3, 32, 32), target="cpu-ort-1t", budget=dp.Latency(ms=5),
                         train=train_set, val=val_set, out="runs/mine", epochs=2)
    result.model              # the pruned nn.Module
    result.report["met_budget"], result.paths["onnx"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deploy_prune.budget import Budget
from deploy_prune.config import Target
from deploy_prune.data import DataBundle
from deploy_prune.errors import UserError
from deploy_prune.latency.lut import LatencyTable
from deploy_prune.latency.timing import Stats
from deploy_prune.pipeline import CompressConfig, FinetuneContext, UserParts
from deploy_prune.pipeline import compress as _run_pipeline

if TYPE_CHECKING:
    from deploy_prune.pipeline.planner import Planner

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(CompressConfig)}
# Set by compress() itself from its own arguments, never through **settings.
_RESERVED = {"out", "weights", "model", "data", "data_options", "target", "method", "method_options",
             "latency_ms", "latency_ratio", "flops_ratio", "params_ratio", "sparsity", "keep_ratio"}


SCRATCH = "<a new temporary directory>"  # the out of a run given out=None, until _scratch makes it
BUDGETS = "dp.Latency(ms=...), dp.LatencyRatio(r), dp.Flops(r), dp.Params(r), dp.Channels(r) or dp.Sparsity(r)"


def _check_args(model: Any, example_input: Any, target: Any, budget: Any) -> None:
    """The Python API's model, example input, target and budget are of the kinds it takes (an
    ``nn.Module``; a floating-point ``(N, C, H, W)`` tensor; a target name or ``Target``; one of
    the ``budget`` objects), else one ``UserError`` line naming the argument and what it takes."""
    import torch
    from torch import nn

    from deploy_prune.budget import Channels, Flops, Latency, LatencyRatio, Params, Sparsity
    from deploy_prune.config import Target

    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch nn.Module, got {type(model).__name__}")
    want = "one batch of images (N, C, H, W) as a float tensor, e.g. torch.zeros(1, 3, 224, 224)"
    if not isinstance(example_input, torch.Tensor):
        raise UserError(f"example_input must be {want}, got a {type(example_input).__name__}")
    if example_input.ndim != 4 or not example_input.is_floating_point():
        raise UserError(f"example_input must be {want}, got a {str(example_input.dtype).removeprefix('torch.')} "
                        f"tensor of shape {list(example_input.shape)}")
    if not isinstance(target, (str, Target)):
        raise UserError(f"target must be a target name (dp.list_targets()) or a loaded Target, got {target!r}")
    if not isinstance(budget, (Latency, LatencyRatio, Flops, Params, Channels, Sparsity)):
        raise UserError(f"budget must be one of {BUDGETS}, got {budget!r} ({type(budget).__name__}); "
                        "a bare number does not say what it budgets: e.g. budget=dp.Flops(0.5)")


def _scratch(cfg: CompressConfig) -> CompressConfig:
    """``cfg`` with a new ``deploy-prune-*`` temporary directory as ``out`` where none was given."""
    if str(cfg.out) != SCRATCH:
        return cfg
    return dataclasses.replace(cfg, out=Path(tempfile.mkdtemp(prefix="deploy-prune-")))


@contextlib.contextmanager
def _scratch_removed_on_failure(cfg: CompressConfig, scratch: bool) -> Iterator[None]:
    """A run in a temporary directory (``out=None``) that fails leaves nothing: the directory
    goes, and the error no longer points at checkpoints in it."""
    try:
        yield
    except BaseException as e:
        if not scratch:
            raise
        shutil.rmtree(cfg.out, ignore_errors=True)
        from deploy_prune.pipeline.stages import without_resume_hint

        if not isinstance(e, UserError) or without_resume_hint(str(e)) == str(e):
            raise
        raise type(e)(f"{without_resume_hint(str(e))} (the run's temporary directory is removed; pass out= to keep "
                      "the checkpoints of a failed run for resume=True)") from None


@dataclass
class Result:
    """What ``compress`` returns: the pruned model, the report (``report.json``'s content) and the
    files written in the run directory."""

    model: nn.Module
    report: dict[str, Any]
    out: Path
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def met_budget(self) -> bool:
        return bool(self.report["met_budget"])


def model_spec(model: nn.Module) -> str:
    """How a user's model is recorded: its class, and a hash of its architecture and weights (never
    a path on this machine)."""
    h = hashlib.sha256(repr(model).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(model).__module__}.{type(model).__qualname__}@{h.hexdigest()[:12]}"


def _dataset(data: Dataset | DataLoader | None) -> Dataset | None:
    return data.dataset if isinstance(data, DataLoader) else data


def _check_items(ds: Dataset, what: str, example: torch.Tensor) -> None:
    """Without a ``loss``, the built-in loop and metric read ``(input, target)`` items, and images
    of ``example``'s size: latency is measured at that size."""
    try:
        item = ds[0]
    except Exception as e:
        raise UserError(f"{what}[0] cannot be read ({type(e).__name__}: {e}); pass a Dataset of (input, target) items") from None
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)):
        raise UserError(f"{what} items must be (input tensor, target) pairs, got {type(item).__name__}; "
                        "pass loss=(model, batch) -> Tensor and evaluate=(model) -> float for other items")
    image = item[0]
    if image.ndim == 3 and tuple(image.shape) != tuple(example.shape[1:]):
        raise UserError(f"example_input is {list(example.shape)} but {what} images are {list(image.shape)}: latency is "
                        f"measured at example_input's size; pass torch.zeros(1, {', '.join(map(str, image.shape))})")


def _bundle(model: nn.Module, example: torch.Tensor, train: Dataset | None, val: Dataset | None, items_checked: bool) -> DataBundle:
    if example.ndim != 4:
        raise UserError(f"example_input must be one batch of images (N, C, H, W), got shape {list(example.shape)}")
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as e:
        raise UserError(f"the model cannot run on example_input of shape {list(example.shape)}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    classes = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.ndim == 2 else 0
    if items_checked:
        for ds, what in ((train, "train"), (val, "val")):
            if ds is not None:
                _check_items(ds, what, example)
    c, h, w = (int(d) for d in example.shape[1:])
    from deploy_prune.data import underlying
    from deploy_prune.data.yolo import DetectionSet

    return DataBundle(name="user", train=train if train is not None else [], val=val if val is not None else [],  # type: ignore[arg-type]
                      test=None, num_classes=classes, in_channels=c, image_size=(h, w), mean=[], std=[],
                      task="detect" if train is not None and isinstance(underlying(train), DetectionSet) else "classify")


def _prepare(model: nn.Module, example_input: torch.Tensor, *, target: str | Target, budget: Budget, method: str,
             train: Dataset | DataLoader | None, val: Dataset | DataLoader | None,
             finetune: Callable[[nn.Module, float, FinetuneContext], object] | None,
             evaluate: Callable[[nn.Module], float] | None, loss: Callable[[nn.Module, Any], torch.Tensor] | None,
             metric: str | None, out: str | Path | None, settings: dict[str, Any]) -> tuple[CompressConfig, UserParts]:
    """The pipeline's settings and the user's parts, from the API's arguments (checked); with
    ``out=None`` the settings' ``out`` is ``SCRATCH``, for ``_scratch`` to replace."""
    _check_args(model, example_input, target, budget)
    train_ds, val_ds = _dataset(train), _dataset(val)
    if train_ds is None:
        raise UserError("compress needs train data (a Dataset or DataLoader): its first batches rank the channels")
    if val_ds is None and evaluate is None:
        raise UserError("give val (a Dataset of (input, target)) for the built-in accuracy, or evaluate=(model) -> float")
    reserved = sorted(set(settings) & _RESERVED)
    if reserved:
        raise UserError(f"compress takes {', '.join(reserved)} as its own arguments (budget=, method=, target=, out=), "
                        "not as settings")
    config = {k: v for k, v in settings.items() if k in _CONFIG_FIELDS}
    method_options = {k: v for k, v in settings.items() if k not in _CONFIG_FIELDS}
    if loss is not None:
        config.setdefault("kd", False)  # the user's loss is the task's; distillation would replace it
    data = _bundle(model, example_input, train_ds, val_ds, items_checked=loss is None)
    name = metric or (str(getattr(evaluate, "__name__", "metric")) if evaluate is not None else "accuracy")
    given: dict[str, Any] = {**budget.settings(), **config}
    cfg = CompressConfig(out=Path(out) if out is not None else Path(SCRATCH), weights="", data="user",
                         target=target if isinstance(target, str) else target.name, method=method,
                         method_options=method_options, **given)
    parts = UserParts(model=model, spec=model_spec(model), data=data, target=target if isinstance(target, Target) else None,
                      finetune=finetune, evaluate=evaluate, metric=name if name != "<lambda>" else "metric", loss=loss,
                      parity_input=example_input)
    return cfg, parts


def compress(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    target: str | Target,
    budget: Budget,
    method: str = "deeplsp",
    train: Dataset | DataLoader | None = None,
    val: Dataset | DataLoader | None = None,
    finetune: Callable[[nn.Module, float, FinetuneContext], object] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    metric: str | None = None,
    out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    **settings: Any,
) -> Result:
    """Prune ``model`` (not modified: a copy is pruned) until its latency measured on ``target``
    meets ``budget``, fine-tune, export ONNX and report.

    - ``train``: a Dataset or DataLoader; its first batches score channels, and the built-in loop
      fine-tunes on it when no ``finetune`` is given. Items are ``(input, target)`` unless ``loss``
      is given.
    - ``val``: held-out data for the built-in metric (top-1 accuracy) when no ``evaluate`` is given.
    - ``finetune(model, epochs, ctx)``: your training loop, called for every fine-tuning the
      method and the pipeline ask for (``epochs`` may be a fraction; call ``ctx.apply_masks(model)``
      after each optimiser step to hold unstructured masks).
    - ``evaluate(model) -> float``: your metric, higher is better, named ``metric`` in the report
      (default: the function's name).
    - ``loss(model, batch) -> Tensor``: your task's loss inside the built-in loop.
    - ``out``: the run directory (as the CLI's ``--out``; ``overwrite=True`` / ``resume=True`` as
      there). ``out=None`` runs in a new temporary directory (``deploy-prune-*`` under
      ``tempfile.gettempdir()``): after success it holds the result's files (``result.out``,
      ``result.paths``; its resume checkpoints are removed) and is yours to delete; a run that
      fails removes it. A failed run in a new ``out`` leaves no empty directory.
    - ``**settings``: pipeline settings (``epochs``, ``lr``, ``steps``, ``seed``, ``criterion``, ...,
      as the CLI's flags) and the method's own (``deploy-prune methods``); an unknown one is an error.

    Under ``torchrun`` call it on every rank: rank 0 profiles, measures, plans and writes; the
    built-in loop fine-tunes every rank's shard with DDP, and your ``finetune`` is called on every
    rank (``ctx.rank``, ``ctx.world_size``: wrap the model in DDP and shard the data yourself);
    ``evaluate`` runs on rank 0 alone. Every rank returns the same pruned model and report.

    >>> result = compress(model, torch.zeros(1, 3, 32, 32), target="cpu-ort-1t", budget=LatencyRatio(0.5),
    ...                   train=train_set, val=val_set, epochs=1)   # doctest: +SKIP
    """
    cfg, parts = _prepare(model, example_input, target=target, budget=budget, method=method, train=train, val=val,
                          finetune=finetune, evaluate=evaluate, loss=loss, metric=metric, out=out, settings=settings)
    cfg = _scratch(cfg)
    out_dir = cfg.out
    with _scratch_removed_on_failure(cfg, out is None):
        report, pruned = _run_pipeline(cfg, progress, parts=parts, return_model=True)
    if out is None:  # nothing to resume: only the result's files stay
        from deploy_prune.pipeline.stages import RUN_DIRS

        for d in RUN_DIRS:
            shutil.rmtree(out_dir / d, ignore_errors=True)
    paths = {k: out_dir / f for k, f in (("onnx", "model.onnx"), ("checkpoint", "model.pt"), ("program", "model.pt2"),
                                         ("report", "report.json"), ("markdown", "report.md"), ("html", "report.html"))
             if (out_dir / f).is_file()}
    deployed = (report["final"].get("deployed") or {}).get("path")
    if deployed:  # the quantized artefact of an int8 target
        paths["deployed"] = Path(deployed)
    return Result(model=pruned, report=report, out=out_dir, paths=paths)


def planner(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    target: str | Target,
    budget: Budget,
    method: str = "deeplsp",
    train: Dataset | DataLoader | None = None,
    val: Dataset | DataLoader | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    metric: str | None = None,
    out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    **settings: Any,
) -> Planner:
    """The closed loop step by step, for your own training between the steps. Measures the
    baseline and sets the budget as ``compress`` does (arguments as there); then ``plan()`` gives
    widths measured to meet the budget, ``apply(widths)`` cuts a copy of the model to them,
    ``schedule(widths, steps)`` gives intermediate widths for gradual pruning, and
    ``check(model)`` measures a model against the budget.

    >>> p = planner(model, torch.zeros(1, 3, 32, 32), target="cpu-ort-1t", budget=Latency(ms=5),
    ...             train=train_set, val=val_set)          # doctest: +SKIP
    >>> pruned = p.apply(p.plan())                          # doctest: +SKIP
    >>> my_training(pruned); assert p.check(pruned).met     # doctest: +SKIP
    """
    from deploy_prune.pipeline.planner import Planner

    cfg, parts = _prepare(model, example_input, target=target, budget=budget, method=method, train=train, val=val,
                          finetune=None, evaluate=evaluate, loss=None, metric=metric, out=out, settings=settings)
    cfg = _scratch(cfg)
    with _scratch_removed_on_failure(cfg, out is None):
        return Planner(cfg, parts, progress)


def load(run_dir: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The pruned model of a compress run. A registered architecture is rebuilt by name; a model
    of your own needs a fresh instance of it (``model=``), which is cut to the run's widths and
    loaded with its weights. Weights are loaded with ``weights_only=True``."""
    from deploy_prune.models.checkpoint import load_checkpoint, load_into, load_model

    path = Path(run_dir)
    path = path / "model.pt" if path.is_dir() else path
    if model is None:
        ck = load_checkpoint(path)
        spec = str(((ck.get("model") or {}).get("spec") or "") if isinstance(ck, dict) else "")
        if "@" in spec:  # recorded by the API as class@hash: no name to rebuild it by
            raise UserError(f"{str(path)!r} holds your own model ({spec}); pass a fresh instance: load(run_dir, model=...)")
        return load_model(path)[0]
    return load_into(model, path)


def profile(model: nn.Module, example_input: torch.Tensor, target: str | Target, profiles: str | Path = "profiles") -> LatencyTable:
    """The target's latency table of ``model`` (found under ``profiles/`` or measured now);
    ``table.predict(pruned_model)`` prices any pruned variant of it."""
    from deploy_prune.latency.profile import ProfileSpec, run_profile
    from deploy_prune.target import load_target

    t = load_target(target) if isinstance(target, str) else target
    _, table = run_profile(ProfileSpec(model, model_spec(model), tuple(int(d) for d in example_input.shape[1:]), t),
                           Path(profiles), reuse=True)
    return LatencyTable(table)


def measure(model: nn.Module | str | Path | bytes, target: str | Target, example_input: torch.Tensor | None = None) -> Stats:
    """Latency of one model on the target (an ``nn.Module`` with its ``example_input``, or ONNX)."""
    from deploy_prune.export import onnx_bytes
    from deploy_prune.latency.measure import measurer_for
    from deploy_prune.target import load_target

    t = load_target(target) if isinstance(target, str) else target
    if isinstance(model, nn.Module):
        if example_input is None:
            raise UserError("measure(model, target, example_input): a module needs an example input to be exported")
        model = onnx_bytes(model, tuple(int(d) for d in example_input.shape[1:]), int(example_input.shape[0]))
    return measurer_for(t).time({"model": model})["model"]


def list_targets() -> list[str]:
    """Names of the targets found (``targets/``, ``$DEPLOY_PRUNE_TARGETS``)."""
    from deploy_prune.config import list_targets

    return sorted(list_targets())


def list_methods() -> list[str]:
    """Names of the registered compression methods (``list_``: ``deploy_prune.methods`` is the
    subpackage that holds them)."""
    from deploy_prune.methods import METHODS

    return METHODS.names()
