"""The state of one compress run (``Run``): the model, data, target and what has happened so far;
measuring, fine-tuning and checkpoints. Methods see it as a ``methods.context.MethodContext``.
``FitJob``/``run_job`` are the one fine-tuning every torchrun rank runs (``pipeline.workers``);
they sit here because ``Run.finetune`` is their only caller on rank 0."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from deploy_prune.allocate import CostModel, flops_cost
from deploy_prune.backends import get_backend
from deploy_prune.config import Target
from deploy_prune.data import DataBundle, load_data, make_loader
from deploy_prune.distributed import world as distributed_world
from deploy_prune.errors import UserError
from deploy_prune.export import onnx_bytes
from deploy_prune.export.timing import timing_onnx
from deploy_prune.graph import ModelGraph
from deploy_prune.io import ensure_dir
from deploy_prune.latency.measure import LocalMeasurer, Measurer, measurer_for
from deploy_prune.latency.timing import QUIET_BAND
from deploy_prune.models import check_runs_on
from deploy_prune.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from deploy_prune.models.ultralytics import deploy_form
from deploy_prune.pipeline.config import CompressConfig
from deploy_prune.target import load_target
from deploy_prune.train import LossFn, TrainConfig, distillation_loss, evaluate, fit, recalibrate_bn
from deploy_prune.transforms import (
    Masks,
    apply_masks,
    architecture_widths,
    group_widths,
    rebuild_pruned,
    sparsity,
)

COLLAPSE = 0.05  # a deployed (int8) metric this far under the fp32 one gets a note in the report
REMEASURE = 2  # extra takes of a measurement that fell wholly inside a contention episode (Run.measure)


@dataclass
class FinetuneContext:
    """What a user's ``finetune(model, epochs, ctx)`` callback is given besides the model."""

    teacher: nn.Module  # the unpruned model, e.g. for distillation (do not train it)
    tag: str  # which fine-tuning this is: step-1, verify-2, final, ...
    seed: int
    masks: Masks  # unstructured masks the method holds: re-apply after each optimiser step
    rank: int = 0  # under torchrun: this process, and how many fine-tune together (wrap in DDP)
    world_size: int = 1

    def apply_masks(self, model: nn.Module) -> None:
        """Zero the masked weights again (call after each optimiser step)."""
        apply_masks(model, self.masks)


@dataclass
class UserParts:
    """What the Python API hands the pipeline in place of names resolved from flags: the user's
    model and data, and callbacks that replace the built-in fine-tuning loop and metric."""

    model: nn.Module | None = None
    spec: str | None = None  # how the model is recorded in reports and profiles
    data: DataBundle | None = None
    target: Target | None = None
    finetune: Callable[[nn.Module, float, FinetuneContext], object] | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    metric: str = "accuracy"  # the name of what ``evaluate`` returns
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None  # (model, (x, y)) -> loss, in the built-in loop
    parity_input: torch.Tensor | None = None  # inputs for the ONNX parity check when there is no val data
    metric_source: str | None = None  # how the report describes the metric, where not the user's evaluate


def task_parts(parts: UserParts, data: DataBundle, model: nn.Module) -> UserParts:
    """The task's own loss and metric where the user gave none: for detection data, ultralytics'
    loss and mAP50-95 (``train.detect``; the model must be an ultralytics YOLO)."""
    if data.task != "detect":
        return parts
    from deploy_prune.models.ultralytics import is_ultralytics
    from deploy_prune.train.detect import DetectionLoss, MeanAP

    if not is_ultralytics(model) and (parts.loss is None or parts.evaluate is None):
        raise UserError(f"detection data ({data.name}) trains and scores ultralytics YOLO models; "
                        "use --model ultralytics:yolov8n.yaml (or another YOLO), or give your own loss and evaluate")
    return replace(parts, loss=parts.loss or DetectionLoss(),
                   evaluate=parts.evaluate or MeanAP(data.val), metric=parts.metric if parts.evaluate else "mAP50-95",
                   metric_source=parts.metric_source or (None if parts.evaluate else "mAP50-95 on the validation split (ultralytics' metric)"))


class ModelChanged(UserError):
    """A user callback left the model it was given other than the pipeline needs it."""


@dataclass(frozen=True)
class Architecture:
    """What a user callback must leave as it found it: the module tree (names and classes) and
    every parameter's and buffer's name, shape and dtype."""

    modules: dict[str, str]
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]

    @classmethod
    def of(cls, model: nn.Module) -> Architecture:
        return cls({n: type(m).__qualname__ for n, m in model.named_modules()},
                   {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()})

    def changes(self, model: nn.Module) -> list[str]:
        """How ``model`` differs from this architecture, the first differences first."""
        now = Architecture.of(model)
        if now == self:
            return []
        out = [f"added {n} ({c})" for n, c in now.modules.items() if n not in self.modules]
        out += [f"removed {n} ({c})" for n, c in self.modules.items() if n not in now.modules]
        out += [f"{n or 'the model'} is now a {c}, not a {self.modules[n]}" for n, c in now.modules.items()
                if n in self.modules and c != self.modules[n]]
        moved = {n for n in {*self.modules, *now.modules} if self.modules.get(n) != now.modules.get(n)}
        recast: dict[tuple[torch.dtype, torch.dtype], list[str]] = {}
        for k, (shape, dtype) in now.tensors.items():
            if k.rpartition(".")[0] in moved:  # said above, with its module
                continue
            if k not in self.tensors:
                out.append(f"added {k}")
                continue
            was_shape, was_dtype = self.tensors[k]
            if shape != was_shape:
                out.append(f"{k} has shape {list(shape)} where the plan has {list(was_shape)}")
            elif dtype != was_dtype:
                recast.setdefault((was_dtype, dtype), []).append(k)
        out += [f"removed {k}" for k in self.tensors if k not in now.tensors and k.rpartition(".")[0] not in moved]
        for (was, dtype), names in recast.items():
            more = f" and {len(names) - 1} more tensor(s)" if len(names) > 1 else ""
            out.append(f"{names[0]}{more} became {str(dtype).removeprefix('torch.')} (was {str(was).removeprefix('torch.')})")
        return out


def non_finite(model: nn.Module) -> str | None:
    """The first parameter or buffer of ``model`` holding NaN or Inf, described; None if none does."""
    for k, v in model.state_dict().items():
        if v.is_floating_point() or v.is_complex():
            bad = ~torch.isfinite(v)
            if bool(bad.any()):
                what = "NaN" if bool(torch.isnan(v).any()) else "Inf"
                return f"{k} holds {what} ({int(bad.sum())} of {v.numel()} values)"
    return None


def check_after_callback(model: nn.Module, before: Architecture, callback: str, finite: bool = True) -> None:
    """One ``ModelChanged`` line naming ``callback`` (e.g. "finetune (the 'step-1' fine-tuning)")
    and what changed, when ``model`` is not ``before``'s architecture (layers added, removed,
    resized, recast) or, with ``finite``, holds NaN or Inf."""
    changed = before.changes(model)
    if changed:
        more = f" and {len(changed) - 3} more change(s)" if len(changed) > 3 else ""
        raise ModelChanged(f"{callback} changed the model it was given: {'; '.join(changed[:3])}{more}; a callback must "
                           "keep the model's layers, widths and dtype (the pipeline's plan) and change only its weights")
    bad = non_finite(model) if finite else None
    if bad:
        raise ModelChanged(f"{callback} left non-finite values in the model: {bad}; lower the learning rate or check "
                           "the loss")


def checked_loss(user_loss: Callable[[nn.Module, Any], torch.Tensor]) -> LossFn:
    """The user's ``loss(model, batch)`` as the built-in loop's ``(model, x, y)`` loss, the model
    checked after every call (``check_after_callback``; finiteness is checked after the
    fine-tuning, as the loop's optimizer step follows the loss)."""
    seen: dict[int, Architecture] = {}

    def loss(mod: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if id(mod) not in seen:
            seen[id(mod)] = Architecture.of(mod)
        before = seen[id(mod)]
        value = user_loss(mod, (x, y))
        check_after_callback(mod, before, "loss", finite=False)
        return value

    return loss


def quietest_take(take: Callable[[], dict[str, Any]], quietest: float) -> tuple[dict[str, Any], float]:
    """One measurement (``take()``: candidate and baseline stats as dicts), taken again, up to
    ``REMEASURE`` more times, while the baseline's quiet figure is over ``1 + QUIET_BAND`` times
    ``quietest`` (the lowest seen in the run): such a take fell wholly inside a contention
    episode. Returns the take with the quietest baseline (``takes``: how many were made) and
    the updated ``quietest``."""
    best: dict[str, Any] | None = None
    for i in range(1 + REMEASURE):
        got = take()
        if best is None or got["baseline"]["quiet"] < best["baseline"]["quiet"]:
            best = got
        best["takes"] = i + 1
        quietest = min(quietest, got["baseline"]["quiet"])
        if best["baseline"]["quiet"] <= quietest * (1.0 + QUIET_BAND):
            break
    assert best is not None
    return best, quietest


def unpruned_model(cfg: CompressConfig, parts: UserParts, data: DataBundle) -> tuple[nn.Module, dict[str, Any]]:
    """The model a run starts from and its checkpoint metadata: a copy of the API's model (the
    user's object stays untouched), else the one ``cfg.weights`` / ``cfg.model`` name. A model of
    a known family is put in the form it deploys in (``models.ultralytics.deploy_form``)."""
    if parts.model is not None:
        model = copy.deepcopy(parts.model).cpu()
        deploy_form(model)
        return model, {}
    return load_model(cfg.weights, cfg.model, num_classes=data.num_classes, in_channels=data.in_channels,
                      trust=cfg.trust)


@dataclass
class FitJob:
    """One fine-tuning the pipeline asks for: what every process needs besides the model, its
    teacher, the data and the settings it already has."""

    epochs: float
    tag: str
    resume: bool
    subset_seed: int  # which share of the training set a fractional epoch uses
    masks: Masks
    meta: dict[str, Any]  # the checkpoint metadata of the model being fine-tuned


def builtin_loss(cfg: CompressConfig, parts: UserParts, teacher: nn.Module) -> LossFn | None:
    """The built-in loop's loss: the user's ``loss``, else distillation from ``teacher`` (unless
    ``--no-kd``), else None (``train.fit``'s cross-entropy)."""
    if parts.loss is not None:
        return checked_loss(parts.loss)
    return distillation_loss(teacher) if cfg.kd else None


def run_job(job: FitJob, model: nn.Module, teacher: nn.Module, data: DataBundle, cfg: CompressConfig, parts: UserParts,
            out: Path, *, stop: Callable[[nn.Module, int], bool] | None = None,
            penalty: Callable[[nn.Module], torch.Tensor] | None = None, distributed: bool = False,
            on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place: the user's ``finetune``, or the built-in loop (KD from
    ``teacher`` unless the user's ``loss`` or ``cfg.kd=False``), masks held. Returns the
    training metrics. Rank 0 and the torchrun workers run this same function; ``on_step``
    follows the built-in loop's optimizer steps. The model the user's ``finetune`` or ``loss``
    was given is checked after it (``check_after_callback``, ``checked_loss``)."""
    rank, world = distributed_world() if distributed else (0, 1)
    if parts.finetune is not None:
        t0 = time.perf_counter()
        model.train()
        before = Architecture.of(model)
        try:
            parts.finetune(model, job.epochs, FinetuneContext(teacher, job.tag, cfg.seed, job.masks, rank, world))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"finetune raised {type(e).__name__}: {e} (in the {job.tag!r} fine-tuning)") from None
        check_after_callback(model, before, f"finetune (the {job.tag!r} fine-tuning)")
        apply_masks(model, job.masks)
        return {"epochs_run": job.epochs, "train_seconds": round(time.perf_counter() - t0, 2), "world_size": world}
    whole = max(1, math.floor(job.epochs))
    if job.epochs < 1:
        n = max(cfg.batch_size, int(len(data.train) * job.epochs))  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(job.subset_seed)
        data = replace(data, train=Subset(data.train, torch.randperm(len(data.train), generator=g)[:n].tolist()))  # type: ignore[arg-type]
    tcfg = TrainConfig(epochs=whole, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    loss = builtin_loss(cfg, parts, teacher)
    if penalty is not None:
        base = loss or (lambda mod, x, y: torch.nn.functional.cross_entropy(mod(x), y))
        loss = lambda mod, x, y: base(mod, x, y) + penalty(mod)  # noqa: E731
    masks = job.masks
    metrics = fit(model, data, tcfg, out / "finetune" / job.tag, job.meta, resume=job.resume, loss_fn=loss,
                  after_step=[lambda mod: apply_masks(mod, masks)] if masks else [], progress=False, stop=stop,
                  distributed=distributed, on_step=on_step)
    if parts.loss is not None:  # the user's loss saw the model at every step: the weights it trained, checked
        bad = non_finite(model)
        if bad:
            raise ModelChanged(f"training with your loss left non-finite values in the model in the {job.tag!r} "
                               f"fine-tuning: {bad}; lower --lr or check the loss")
    return metrics


# ---------------------------------------------------------------------------------------------
# The run: model, data, target and what has happened so far
# ---------------------------------------------------------------------------------------------
class Run:
    """State of one compress run. The pipeline drives it; the method sees it as a
    ``methods.context.MethodContext`` and nothing more."""

    def __init__(self, cfg: CompressConfig, progress: Callable[[str], None] | None = None,
                 parts: UserParts | None = None) -> None:
        self.cfg = cfg
        self.parts = parts or UserParts()
        self.target: Target = self.parts.target or load_target(cfg.target)
        self.data: DataBundle = self.parts.data or load_data(cfg.data, cfg.data_options)
        if cfg.task is not None and cfg.task != self.data.task:
            raise UserError(f"--task {cfg.task}, but --data {cfg.data} holds a {self.data.task} dataset; "
                            + ("give YOLO-format data (--data yolo:DIR/data.yaml)" if cfg.task == "detect"
                               else f"drop --task or give {cfg.task} data"))
        self.model, meta = unpruned_model(cfg, self.parts, self.data)
        self.parts = task_parts(self.parts, self.data, self.model)
        check_runs_on(self.model, self.data.input_shape, self.data.num_classes if self.parts.evaluate is None else None)
        if meta.get("pruned"):
            raise UserError(f"{cfg.weights!r} is already a compress result; compress its original weights instead")
        self.out = ensure_dir(cfg.out)
        self.say = progress or (lambda msg: None)
        # Counted work (``progress.count(task, done, total)``, where the callable has it): what a
        # display turns into bars with an ETA; a plain function gets the lines alone.
        self.count: Callable[[str, int, int], None] = getattr(progress, "count", None) or (lambda task, done, total: None)
        self.spec = self.parts.spec or cfg.model or meta.get("model", {}).get("spec")
        if not self.spec:
            raise UserError("the checkpoint does not record its architecture; pass --model")
        self.meta: dict[str, Any] = {"model": {"spec": self.spec, "num_classes": self.data.num_classes, "in_channels": self.data.in_channels},
                     "input_shape": list(self.data.input_shape), "data": self.data.describe()}
        self.teacher = copy.deepcopy(self.model).eval()
        self.measurer: Measurer = measurer_for(self.target)
        self.graph = ModelGraph(self.model, self.data.input_shape, cfg.ignore, self.target.width_space())
        self.baseline_widths = group_widths(self.graph)
        if not self.baseline_widths:
            raise UserError(nothing_to_prune(self.model, self.spec, cfg.ignore))
        self.cost: CostModel = flops_cost()
        self.profile: dict[str, Any] | None = None
        self.masks: Masks = {}
        self.report: dict[str, Any] = {"steps": [], "stage_seconds": {}, "notes": [*deploy_form(self.model), *self.graph.splits.notes()]}
        self.done: list[str] = []
        self.state: dict[str, Any] = {}
        self.lowrank_profile = False  # the LUT must also time factorised convs (df under a latency budget)
        self.last_fit: dict[str, Any] | None = None  # metrics of the last finetune call
        self._baseline_onnx: bytes | None = None
        self._quietest_baseline = math.inf  # the baseline's lowest quiet figure in this run (ms)
        self._batches: list[Any] | None = None
        self._subset: tuple[torch.Tensor, torch.Tensor] | None = None
        self.world = distributed_world()[1]  # processes fine-tuning together under torchrun
        self._teacher_unsent = True

    # -- what methods see of the run (methods.context.MethodContext) -------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)

    @property
    def train_data(self) -> Any:
        return self.data.train

    @property
    def ignore(self) -> list[str]:
        return self.cfg.ignore

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    @property
    def notes(self) -> list[str]:
        return self.report["notes"]  # type: ignore[no-any-return]

    @property
    def steps_recorded(self) -> int:
        return len(self.report["steps"])

    def record_step(self, stage: str, model: nn.Module | None = None, **rec: Any) -> None:
        record_step(self, stage, model, **rec)

    # -- data helpers used by methods --------------------------------------------------------
    def score_batches(self) -> list[Any]:
        """The same few training batches for every criterion call (seeded)."""
        if self._batches is None:
            it = make_loader(self.data.train, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed)
            self._batches = [b for _, b in zip(range(self.cfg.score_batches), it, strict=False)]
        return self._batches

    def metric(self, model: nn.Module) -> float:
        """The run's metric of ``model`` on the validation data: the user's ``evaluate`` (checked
        to return a finite number and to leave the model as it was: ``check_after_callback``),
        else top-1 accuracy."""
        if self.parts.evaluate is None:
            return float(evaluate(model, self.data.val)["accuracy"])
        before = Architecture.of(model)
        try:
            value = self.parts.evaluate(model)
        except Exception as e:
            raise UserError(f"evaluate raised {type(e).__name__}: {e}") from None
        check_after_callback(model, before, "evaluate")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"evaluate returned {value!r}; it must return a finite number ({self.parts.metric}, higher is better)")
        return float(value)

    def deployed(self, model: nn.Module, fp32_metric: float) -> tuple[bytes, dict[str, Any]] | None:
        """``model`` as the target ships it, and its figures: quantized with activation ranges
        calibrated on the scoring batches (``quantize.calibration_inputs``) and scored by the run's
        metric through the target's backend (where that backend runs here); for a local target
        also the fp32 graph's latency on the same backend, timed interleaved with the artefact;
        ``fp32_metric`` (the caller's
        score of ``model``) is what the deployed metric is compared with. None for an fp32 target,
        whose artefact is the ONNX export itself."""
        if self.target.precision == "fp32":
            return None
        from deploy_prune.latency.timing import measure as interleaved
        from deploy_prune.quantize import DeployedModule, calibration_inputs, calibration_of, deploy_onnx

        t0 = time.perf_counter()
        fp32 = self.onnx(model)
        cal = calibration_inputs(self.score_batches(), self.target)
        want = calibration_of(self.target).samples
        short = f"calibration used the {len(cal)} inputs the scoring batches hold, not the {want} asked for"
        if len(cal) < want and short not in self.notes:
            self.notes.append(short)
        art = deploy_onnx(fp32, self.target, cal)
        figures: dict[str, Any] = {"precision": self.target.precision, "calibration_samples": len(cal)}
        here, why = get_backend(self.target.backend).available()
        if not here:  # a device behind an agent: the artefact is written, its metric is the device's to score
            note = (f"the {self.target.precision} artefact was not scored: backend {self.target.backend} does not run "
                    f"here ({why}); the gate judges the fp32 metric")
            if note not in self.notes:
                self.notes.append(note)
        else:
            figures["accuracy"] = self.metric(DeployedModule(art, self.target))
            drop = fp32_metric - figures["accuracy"]
            if drop > COLLAPSE:  # reported, never hidden: the gate judges this figure
                self.notes.append(f"the {self.target.precision} artefact scores {100 * figures['accuracy']:.2f} %, "
                                  f"{100 * drop:.2f} points under the fp32 model's {self.parts.metric}: calibrate on "
                                  "more samples, another method, or keep sensitive layers unquantized")
        self._add_seconds("deploy", time.perf_counter() - t0)
        if isinstance(self.measurer, LocalMeasurer):
            t0 = time.perf_counter()
            at_fp32 = LocalMeasurer(replace(self.target, precision="fp32"))
            stats = interleaved({"deployed": self.measurer.timer("deployed", art), "fp32": at_fp32.timer("fp32", fp32)},
                                self.target.protocol)
            figures["latency_ms"], figures["fp32_latency_ms"] = stats["deployed"].as_dict(), stats["fp32"].as_dict()
            self._add_seconds("measure", time.perf_counter() - t0)
        return art, figures

    def subset_accuracy(self, model: nn.Module) -> float:
        """Accuracy on the fixed validation subset the sensitivity analysis uses (the user's
        metric on their validation data, when they gave one)."""
        if self.parts.evaluate is not None:
            return self.metric(model)
        if self._subset is None:
            n = min(self.cfg.sensitivity_samples, len(self.data.val))  # type: ignore[arg-type]
            xs, ys = zip(*(self.data.val[i] for i in range(n)), strict=True)
            self._subset = torch.stack(xs), torch.as_tensor(ys)
        x, y = self._subset
        model.eval()
        with torch.no_grad():
            return float(sum(int((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256)) / len(x))

    def recover(self, model: nn.Module, steps: int) -> bool:
        """Train ``model`` (a cut copy, not the run's model) for ``steps`` SGD steps on the
        scoring batches, with the built-in loop's loss (the user's ``loss``, else distillation from
        the unpruned model, else cross-entropy) at ``--lr``: enough to undo the first shock of a
        cut, so that its score says how it will fine-tune (``methods.subnet``). False, and no
        training, where the run has no loss of its own to train with: a user's ``finetune``
        callback without ``loss``."""
        if self.parts.finetune is not None and self.parts.loss is None:
            return False
        loss = builtin_loss(self.cfg, self.parts, self.teacher) or (lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y))
        batches = self.score_batches()
        device = next(model.parameters()).device
        opt = torch.optim.SGD(model.parameters(), lr=self.cfg.lr, momentum=0.9)
        model.train()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            opt.zero_grad()
            loss(model, x.to(device), y.to(device)).backward()
            opt.step()
        model.eval()
        return True

    def sensitivity(self, criterion: str, bn_batches: int = 0) -> dict[str, Any]:
        """The sensitivity analysis of the unpruned model: ``--sensitivity`` or the run's own
        sensitivity.json when they match these weights, data and settings, else computed now
        (``bn_batches``: ``SensitivityConfig.bn_batches``)."""
        from deploy_prune.sensitivity import SensitivityConfig, fingerprint, load_sensitivity, sensitivity_run

        t0 = time.perf_counter()
        for cand in [self.cfg.sensitivity, self.out / "sensitivity.json"]:
            if cand is None:
                continue
            p = Path(cand)
            p = p / "sensitivity.json" if p.is_dir() else p
            if not p.is_file():
                if cand == self.cfg.sensitivity:
                    raise UserError(f"--sensitivity {str(cand)!r}: no sensitivity.json there; run deploy-prune sensitivity first")
                continue
            res = load_sensitivity(p)
            c = res["config"]
            scfg = SensitivityConfig(**{**c, "ratios": tuple(c["ratios"])})
            if scfg.bn_batches != bn_batches and cand == self.cfg.sensitivity:
                raise UserError(f"--sensitivity {str(p)!r} was computed with --bn-batches {scfg.bn_batches}, the method asks for "
                                f"{bn_batches}; rerun sensitivity with --bn-batches {bn_batches}")
            fp = fingerprint(self.teacher, scfg, self.data.name, self.cfg.ignore, self.target.width_space())
            if res["fingerprint"] == fp and scfg.bn_batches == bn_batches:
                self.say(f"sensitivity: reusing {p}")
                self.report["sensitivity"] = {"path": str(p), "reused": True, "criterion": c["criterion"]}
                return res
            if cand == self.cfg.sensitivity:
                raise UserError(f"--sensitivity {str(p)!r} was computed for other weights, data, --ignore or target widths; "
                                f"rerun sensitivity with --target {self.cfg.target}")
        self.say("sensitivity: pruning each group alone on the validation subset")
        scfg = SensitivityConfig(criterion=criterion, val_samples=self.cfg.sensitivity_samples,
                                 score_batches=self.cfg.score_batches, batch_size=self.cfg.batch_size,
                                 workers=self.cfg.workers, seed=self.cfg.seed, bn_batches=bn_batches)
        res = sensitivity_run(self.out, copy.deepcopy(self.teacher), self.data, scfg, ignore=self.cfg.ignore,
                              channel_multiple=self.target.width_space(), meta=self.meta["model"], profile=self.profile,
                              metric=self.metric if self.parts.evaluate is not None else None,
                              on_job=lambda d, n: self.count("sensitivity", d, n))
        self.report["sensitivity"] = {"path": str(self.out / "sensitivity.json"), "reused": False, "criterion": criterion}
        self.report["stage_seconds"]["sensitivity"] = round(time.perf_counter() - t0, 2)
        return res

    # -- measurement ------------------------------------------------------------------------
    def onnx(self, model: nn.Module) -> bytes:
        return onnx_bytes(copy.deepcopy(model).cpu(), self.data.input_shape, self.target.batch)

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """Measure ``model`` on the target, interleaved with the unpruned baseline; the baseline
        is the run's yardstick for contention (``quietest_take``)."""
        t0 = time.perf_counter()
        if self._baseline_onnx is None:
            self._baseline_onnx = timing_onnx(self.teacher, self.data.input_shape, self.target.batch)
        cand = timing_onnx(model, self.data.input_shape, self.target.batch)
        self._add_seconds("export", time.perf_counter() - t0)
        t0 = time.perf_counter()

        rounds = self.target.protocol.rounds

        def take() -> dict[str, Any]:
            stats = self.measurer.time({"baseline": self._baseline_onnx, "candidate": cand},  # type: ignore[dict-item]
                                       on_round=lambda r: self.count("measure", r, rounds))
            return {"candidate": stats["candidate"].as_dict(), "baseline": stats["baseline"].as_dict()}

        best, self._quietest_baseline = quietest_take(take, self._quietest_baseline)
        self._add_seconds("measure", time.perf_counter() - t0)
        return best

    def predicted_ms(self, model: nn.Module | None = None) -> float | None:
        if self.profile is None:
            return None
        from deploy_prune.latency.lut import predict

        try:
            return float(predict(model or self.model, self.profile)["calibrated_ms"])
        except UserError:  # e.g. factorised layers, which the profile has no entries for
            return None

    def _add_seconds(self, stage: str, s: float) -> None:
        self.report["stage_seconds"][stage] = round(self.report["stage_seconds"].get(stage, 0.0) + s, 2)

    def recalibrate(self) -> None:
        """Re-estimate the current model's BatchNorm statistics on the scoring batches (no weight
        update). A cut leaves them stale: pruned in steps with no fine-tuning between them,
        MobileNetV2 scored at chance after its second step, and the next step's criterion then
        scores channels on that broken model."""
        t0 = time.perf_counter()
        recalibrate_bn(self.model, self.score_batches())
        self._add_seconds("structured", time.perf_counter() - t0)

    # -- fine-tuning --------------------------------------------------------------------------
    def finetune(self, epochs: float, tag: str, resume: bool = False, stop: Callable[[nn.Module, int], bool] | None = None,
                 penalty: Callable[[nn.Module], torch.Tensor] | None = None) -> float:
        """Fine-tune the current model (KD from the unpruned one by default), holding the masks.
        A fractional epoch trains once on that share of the training set. Returns the metric;
        ``last_fit`` keeps the training metrics (epochs run, seconds). ``stop`` may end training
        after an epoch; ``penalty(model)`` is added to the loss (regularising methods).

        Under torchrun the job goes to every rank (``pipeline.workers``), which fine-tune their
        shards of the data together with DDP; a job with a ``stop`` rule or a ``penalty`` (a
        method's own training) runs on rank 0 alone, as those callables live only here."""
        self.last_fit = None
        if epochs <= 0:
            return self.metric(self.model)
        t0 = time.perf_counter()
        job = FitJob(epochs=epochs, tag=tag, resume=resume, subset_seed=self.cfg.seed + len(self.report["steps"]),
                     masks=self.masks, meta=self.meta_pruned())
        shared = self.world > 1 and stop is None and penalty is None
        alone = "the method's own training ran on rank 0 alone: its stopping rule or penalty is not sent to other ranks"
        if self.world > 1 and not shared and alone not in self.notes:
            self.notes.append(alone)
        if shared:
            from deploy_prune.pipeline.workers import send_job

            send_job(job, self.model, self.teacher if self._teacher_unsent else None)
            self._teacher_unsent = False
        try:
            m = run_job(job, self.model, self.teacher, self.data, self.cfg, self.parts, self.out, stop=stop,
                        penalty=penalty, distributed=shared, on_step=lambda d, n: self.count(f"fine-tune {tag}", d, n))
        except UserError as e:
            if self.parts.finetune is not None or isinstance(e, ModelChanged):
                raise
            raise UserError(f"{e}; the last good checkpoint is kept in {self.out}/checkpoints (resume with --resume "
                            "and a lower --lr)") from None
        self._add_seconds("finetune", time.perf_counter() - t0)
        self.last_fit = m
        if self.parts.finetune is None and self.parts.evaluate is None:
            return float(m["val_accuracy"])
        return self.metric(self.model)

    # -- checkpoints ----------------------------------------------------------------------------
    def meta_pruned(self) -> dict[str, Any]:
        return {**self.meta, "pruned": {"widths": architecture_widths(self.graph), "ignore": list(self.cfg.ignore)}}

    def checkpoint(self, stage: str) -> None:
        """Save the run after ``stage``. A non-finite number in the run's state or report is
        refused (``UserError``), never saved: a resumed run would read it back, and the report
        cannot be written with it; the last good checkpoint stays."""
        for name, obj in (("state", self.state), ("report", self.report)):
            bad = _non_finite_at(obj, name)
            if bad:
                raise UserError(f"stage {stage!r} produced a non-finite number ({bad}); it was not checkpointed "
                                "(the last good stage is kept): check the inputs it came from, e.g. the latency profile")
        self.done.append(stage)
        save_checkpoint(self.out / "checkpoints" / "state.pt", self.model, self.meta_pruned(),
                        masks={k: v.cpu() for k, v in self.masks.items()}, done=list(self.done),
                        report=json.dumps(self.report, allow_nan=False), run_state=json.dumps(self.state, allow_nan=False))

    def restore(self) -> None:
        """Continue from ``checkpoints/state.pt``: rebuild the pruned architecture, load weights."""
        path = self.out / "checkpoints" / "state.pt"
        if not path.is_file():
            raise UserError(f"nothing to resume: {str(path)!r} does not exist; run without --resume")
        ck = load_checkpoint(path)
        rebuild_pruned(self.model, ck["pruned"], self.data.input_shape)
        self.model.load_state_dict(ck["state_dict"])
        self.graph = ModelGraph(self.model, self.data.input_shape, self.cfg.ignore, self.target.width_space())
        self.masks = dict(ck.get("masks", {}))
        self.done = list(ck["done"])
        self.report, self.state = _strict_json(ck["report"], path), _strict_json(ck["run_state"], path)
        self.say(f"resuming after stage {self.done[-1]!r}")


def nothing_to_prune(model: nn.Module, spec: str, ignore: list[str]) -> str:
    """Why a model with no prunable channel group cannot be compressed, as one line."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        return (f"the model ({spec}) has no Conv2d or Linear layer: deploy-prune prunes the channels of those, so there "
                "is nothing to prune")
    shown = ", ".join(layers[:5]) + (", ..." if len(layers) > 5 else "")
    return (f"the model ({spec}) has no prunable channel group: its conv/linear layers ({shown}) all produce the "
            f"output{' or are in --ignore' if ignore else ''}, and those are never pruned; nothing to prune")


def _non_finite_at(obj: Any, where: str) -> str | None:
    """Where in a JSON-like value the first NaN or Inf is (``state['budget']['cost_budget'] = nan``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where} = {obj}"
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        bad = _non_finite_at(v, f"{where}[{k!r}]")
        if bad:
            return bad
    return None


def _strict_json(text: str, path: Path) -> Any:
    """A run checkpoint's JSON; a NaN or Infinity in it (``Run.checkpoint`` writes none) is refused."""
    def refuse(name: str) -> Any:
        raise UserError(f"{str(path)!r} holds a non-finite number ({name}) from a failed run; it cannot be resumed: rerun "
                        "with --overwrite (profile again first if the latency profile was the cause)")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
def _model_figures(run: Run, model: nn.Module, accuracy: float | None, latency: dict[str, Any] | None) -> dict[str, Any]:
    g = ModelGraph(model, run.data.input_shape, run.cfg.ignore, run.target.width_space())
    flops, params = g.flops_params()
    return {"accuracy": accuracy, "latency_ms": latency, "predicted_latency_ms": run.predicted_ms(model),
            "flops": flops, "params": params, "sparsity": round(sparsity(model), 6)}


def record_step(run: Run, stage: str, model: nn.Module | None = None, **rec: Any) -> None:
    """Record one step; figures are the current model's, or ``model``'s (a planned candidate)."""
    g = run.graph if model is None else ModelGraph(model, run.data.input_shape, run.cfg.ignore, run.target.width_space())
    flops, params = g.flops_params()
    run.report["steps"].append({"step": len(run.report["steps"]) + 1, "stage": stage, "flops": flops, "params": params,
                                "predicted_latency_ms": run.predicted_ms(model), "widths": group_widths(g), **rec})
