"""``deploy-prune compress``: prune a trained model until its latency, *measured on the target*,
meets a budget, then fine-tune, export and report.

``compress(cfg)`` reads top to bottom:

1. **baseline**: accuracy, FLOPs, params; the model exported and measured on the target; the
   target's latency profile (LUT) of this model, made on the spot when missing.
2. **budget**: ``--latency-ms`` / ``--latency-ratio`` (of the measured baseline) become a budget
   in *predicted* ms on the LUT; ``--flops-ratio`` / ``--params-ratio`` / ``--keep-ratio``
   budget MACs, parameters or channels (exact, so no measuring loop is needed for them).
3. **method setup** (DeepLSP: the sensitivity analysis on real validation data).
4. **closed loop on the plan**: the method plans widths for the predicted budget; that
   architecture is exported and measured (latency does not depend on weight values, so no
   training is needed to know it); the predicted budget is corrected by measured/predicted
   until the measurement lands between ``slack`` and ``margin`` under the budget (the margin
   absorbs the re-measurement noise of the final check).
5. **structured pruning** in ``steps`` steps (geometric schedule of budgets), each followed by
   a short fine-tuning; or, for a ``--sparsity`` budget, the unstructured method's own
   prune-retrain schedule (``methods.imp``), checkpointed per iteration.
6. **verification**: the pruned model is measured; over budget, the predicted budget is
   tightened by the measured/predicted ratio and the model pruned further.
7. **final fine-tuning** (knowledge distillation from the unpruned model by default) with the
   method's unstructured masks held.
8. **export and final measurement**, re-measured before the budget is declared met; reports.

Each stage ends with a checkpoint (``checkpoints/state.pt``), so ``--resume`` continues an
interrupted run; the final fine-tuning checkpoints every epoch too.
"""

from __future__ import annotations

import copy
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from deploy_prune.allocate import CostModel, allowed_keeps, channels_cost, flops_cost, latency_cost, params_cost
from deploy_prune.checks import check_number
from deploy_prune.config import Target, load_target
from deploy_prune.data import DataBundle, DataOptions, load_data, make_loader
from deploy_prune.errors import BudgetUnreachable, UserError
from deploy_prune.export import export_onnx, onnx_bytes
from deploy_prune.graph import ModelGraph
from deploy_prune.io import atomic_write, ensure_dir, provenance, write_json
from deploy_prune.latency.measure import Measurer, measurer_for
from deploy_prune.latency.timing import QUIET_BAND, quiet_estimate, quiet_of
from deploy_prune.measured_search import Point, between, line_search
from deploy_prune.methods import Method, get_method
from deploy_prune.models import check_runs_on
from deploy_prune.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from deploy_prune.train import TrainConfig, distillation_loss, evaluate, fit
from deploy_prune.transforms import (
    Masks,
    apply_masks,
    architecture_widths,
    combine_masks,
    group_widths,
    nm_masks,
    prune_to_widths,
    rebuild_pruned,
    sparsity,
)

SCHEMA_VERSION = 1
REMEASURE = 2  # extra takes of a measurement that fell wholly inside a contention episode (Run.measure)
UNSTRUCTURED_NOTE = ("Unstructured zeros (magnitude masks) do not lower dense latency on {backend}: it runs every "
                     "weight, zero or not. They shrink the compressed file and help only on sparse-aware runtimes.")


@dataclass
class CompressConfig:
    """Everything ``compress`` needs; the CLI fills it from flags."""

    out: Path
    weights: str
    model: str | None = None
    data: str = "digits"
    data_options: DataOptions = field(default_factory=DataOptions)
    target: str = "cpu-ort-1t"
    latency_ms: float | None = None
    latency_ratio: float | None = None
    flops_ratio: float | None = None
    params_ratio: float | None = None
    sparsity: float | None = None  # unstructured methods: share of the weights zeroed
    nm: str | None = None  # "2:4": N:M semi-structured masks on top of the method's, held in the final fine-tuning
    keep_ratio: float = 0.5
    method: str = "deeplsp"
    method_options: dict[str, Any] = field(default_factory=dict)  # method-specific settings (e.g. df's mode)
    # Settings several methods share; None: the method's own default. A method that does not take
    # one that is set refuses the run (methods.check_options).
    criterion: str | None = None
    amount: float | str | None = None
    tolerance: float | None = None  # adaptive amount: accuracy drop allowed per layer (0.005 = half a point)
    steps: int | None = None  # None: the method's default
    step_fraction: float = 0.25  # share of an epoch of fine-tuning after each structured step
    epochs: int = 3
    kd: bool = True
    lr: float = 0.01
    batch_size: int = 128
    slack: float = 0.1  # aim for a measured latency within this share under the budget
    # A plan is accepted only this far under the budget: re-measuring the same architecture here
    # moved it by a few per cent (plans accepted at 98-99 % measured 102-110 % at the end).
    margin: float = 0.03
    max_loops: int = 5
    sensitivity: str | None = None  # a sensitivity.json (or its run dir) to reuse
    sensitivity_samples: int = 1000
    score_batches: int = 8
    workers: int = 1
    ignore: list[str] = field(default_factory=list)
    profiles: Path = Path("profiles")
    force_profile: bool = False
    trust: bool = False
    resume: bool = False
    overwrite: bool = False  # replace the run already in ``out`` (else it is refused, unless resumed)
    seed: int = 0

    def __post_init__(self) -> None:
        """Every number checked here, where it enters (the CLI and the API build this), before
        anything loads: NaN passes every comparison, so a budget of NaN would run the whole
        pipeline to the narrowest widths."""
        share = dict(lo=0.0, hi=1.0, lo_open=True, hi_open=True, optional=True)
        for name, rng in (("latency_ms", dict(lo=0.0, lo_open=True, optional=True)), ("latency_ratio", share),
                          ("flops_ratio", share), ("params_ratio", share), ("sparsity", share),
                          ("keep_ratio", dict(lo=0.0, hi=1.0, lo_open=True)), ("tolerance", dict(lo=0.0, hi=1.0, optional=True)),
                          ("step_fraction", dict(lo=0.0, hi=100.0)), ("lr", dict(lo=0.0, lo_open=True)),
                          ("slack", dict(lo=0.0, hi=1.0, lo_open=True, hi_open=True)),
                          ("margin", dict(lo=0.0, hi=1.0, hi_open=True))):
            check_number(_flag(name), getattr(self, name), **rng)  # type: ignore[arg-type]
        for name, lo in (("epochs", 0), ("batch_size", 1), ("max_loops", 1), ("sensitivity_samples", 1),
                         ("score_batches", 1), ("workers", 1), ("seed", 0)):
            check_number(_flag(name), getattr(self, name), lo=lo, integer=True)
        check_number("--steps", self.steps, lo=1, integer=True, optional=True)
        if self.margin >= self.slack:
            raise UserError(f"--margin {self.margin} must be below --slack {self.slack}: the window a measured latency "
                            "must land in is between them under the budget")

    def budget_kind(self) -> tuple[str, float]:
        given = {k: v for k, v in (("latency_ms", self.latency_ms), ("latency_ratio", self.latency_ratio),
                                   ("flops_ratio", self.flops_ratio), ("params_ratio", self.params_ratio),
                                   ("sparsity", self.sparsity)) if v is not None}
        if len(given) > 1:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UserError(f"conflicting budgets {flags}: give one of --latency-ms, --latency-ratio, --flops-ratio, "
                            "--params-ratio, --sparsity")
        kind, value = next(iter(given.items())) if given else ("keep_ratio", self.keep_ratio)
        if value <= 0:
            raise UserError(f"--{kind.replace('_', '-')} must be > 0, got {value}: nothing can run in no time")
        if kind == "sparsity" and value >= 1:
            raise UserError(f"--sparsity {value} would zero every weight; give a share below 1")
        if kind not in ("latency_ms", "sparsity") and value >= 1:
            raise UserError(f"--{kind.replace('_', '-')} {value} keeps the whole model: nothing to do (give a share below 1)")
        return kind, float(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


# ---------------------------------------------------------------------------------------------
# The run: model, data, target and what has happened so far
# ---------------------------------------------------------------------------------------------
class Run:
    """State of one compress run, shared by the pipeline and the method."""

    def __init__(self, cfg: CompressConfig, progress: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.out = ensure_dir(cfg.out)
        self.say = progress or (lambda msg: None)
        self.target: Target = load_target(cfg.target)
        self.data: DataBundle = load_data(cfg.data, cfg.data_options)
        self.model, meta = load_model(cfg.weights, cfg.model, num_classes=self.data.num_classes,
                                      in_channels=self.data.in_channels, trust=cfg.trust)
        check_runs_on(self.model, self.data.input_shape, self.data.num_classes)
        if meta.get("pruned"):
            raise UserError(f"{cfg.weights!r} is already a compress result; compress its original weights instead")
        self.spec = cfg.model or meta.get("model", {}).get("spec")
        if not self.spec:
            raise UserError("the checkpoint does not record its architecture; pass --model")
        self.meta: dict[str, Any] = {"model": {"spec": self.spec, "num_classes": self.data.num_classes, "in_channels": self.data.in_channels},
                     "input_shape": list(self.data.input_shape), "data": self.data.describe()}
        self.teacher = copy.deepcopy(self.model).eval()
        self.measurer: Measurer = measurer_for(self.target)
        self.graph = ModelGraph(self.model, self.data.input_shape, cfg.ignore, self.target.channel_multiple)
        self.baseline_widths = group_widths(self.graph)
        self.cost: CostModel = flops_cost()
        self.profile: dict[str, Any] | None = None
        self.masks: Masks = {}
        self.report: dict[str, Any] = {"steps": [], "stage_seconds": {}, "notes": []}
        self.done: list[str] = []
        self.state: dict[str, Any] = {}
        self.lowrank_profile = False  # the LUT must also time factorised convs (df under a latency budget)
        self.last_fit: dict[str, Any] | None = None  # metrics of the last finetune call
        self._baseline_onnx: bytes | None = None
        self._quietest_baseline = math.inf  # the baseline's lowest quiet figure in this run (ms)
        self._batches: list[Any] | None = None
        self._subset: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- data helpers used by methods --------------------------------------------------------
    def score_batches(self) -> list[Any]:
        """The same few training batches for every criterion call (seeded)."""
        if self._batches is None:
            it = make_loader(self.data.train, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed)
            self._batches = [b for _, b in zip(range(self.cfg.score_batches), it, strict=False)]
        return self._batches

    def subset_accuracy(self, model: nn.Module) -> float:
        """Accuracy on the fixed validation subset the sensitivity analysis uses."""
        if self._subset is None:
            n = min(self.cfg.sensitivity_samples, len(self.data.val))  # type: ignore[arg-type]
            xs, ys = zip(*(self.data.val[i] for i in range(n)), strict=True)
            self._subset = torch.stack(xs), torch.as_tensor(ys)
        x, y = self._subset
        model.eval()
        with torch.no_grad():
            return float(sum(int((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256)) / len(x))

    def sensitivity(self, criterion: str) -> dict[str, Any]:
        """The sensitivity analysis of the unpruned model: ``--sensitivity`` or the run's own
        sensitivity.json when they match these weights and data, else computed now."""
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
            fp = fingerprint(self.teacher, scfg, self.data.name, self.cfg.ignore, self.target.channel_multiple)
            if res["fingerprint"] == fp:
                self.say(f"sensitivity: reusing {p}")
                self.report["sensitivity"] = {"path": str(p), "reused": True, "criterion": c["criterion"]}
                return res
            if cand == self.cfg.sensitivity:
                raise UserError(f"--sensitivity {str(p)!r} was computed for other weights, data or --ignore; rerun sensitivity")
        self.say("sensitivity: pruning each group alone on the validation subset")
        scfg = SensitivityConfig(criterion=criterion, val_samples=self.cfg.sensitivity_samples,
                                 score_batches=self.cfg.score_batches, batch_size=self.cfg.batch_size,
                                 workers=self.cfg.workers, seed=self.cfg.seed)
        res = sensitivity_run(self.out, copy.deepcopy(self.teacher), self.data, scfg, ignore=self.cfg.ignore,
                              channel_multiple=self.target.channel_multiple, meta=self.meta["model"], profile=self.profile)
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
            self._baseline_onnx = self.onnx(self.teacher)
        cand = self.onnx(model)
        self._add_seconds("export", time.perf_counter() - t0)
        t0 = time.perf_counter()

        def take() -> dict[str, Any]:
            stats = self.measurer.time({"baseline": self._baseline_onnx, "candidate": cand})  # type: ignore[dict-item]
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

    # -- fine-tuning --------------------------------------------------------------------------
    def finetune(self, epochs: float, tag: str, resume: bool = False, stop: Callable[[nn.Module, int], bool] | None = None,
                 penalty: Callable[[nn.Module], torch.Tensor] | None = None) -> float:
        """Fine-tune the current model (KD from the unpruned one by default), holding the masks.
        A fractional epoch trains once on that share of the training set. Returns val accuracy;
        ``last_fit`` keeps the training metrics (epochs run, seconds). ``stop`` may end training
        after an epoch; ``penalty(model)`` is added to the loss (regularising methods)."""
        self.last_fit = None
        if epochs <= 0:
            return float(evaluate(self.model, self.data.val)["accuracy"])
        t0 = time.perf_counter()
        data = self.data
        whole = max(1, math.floor(epochs))
        if epochs < 1:
            n = max(self.cfg.batch_size, int(len(data.train) * epochs))  # type: ignore[arg-type]
            g = torch.Generator().manual_seed(self.cfg.seed + len(self.report["steps"]))
            data = replace(data, train=Subset(data.train, torch.randperm(len(data.train), generator=g)[:n].tolist()))  # type: ignore[arg-type]
        cfg = TrainConfig(epochs=whole, batch_size=self.cfg.batch_size, lr=self.cfg.lr, seed=self.cfg.seed)
        loss = distillation_loss(self.teacher) if self.cfg.kd else None
        if penalty is not None:
            base = loss or (lambda mod, x, y: torch.nn.functional.cross_entropy(mod(x), y))
            loss = lambda mod, x, y: base(mod, x, y) + penalty(mod)  # noqa: E731
        masks = self.masks
        try:
            m = fit(self.model, data, cfg, self.out / "finetune" / tag, self.meta_pruned(), resume=resume, loss_fn=loss,
                    after_step=[lambda mod: apply_masks(mod, masks)] if masks else [], progress=False, stop=stop)
        except UserError as e:
            raise UserError(f"{e}; the last good checkpoint is kept in {self.out}/checkpoints (resume with --resume "
                            "and a lower --lr)") from None
        self._add_seconds("finetune", time.perf_counter() - t0)
        self.last_fit = m
        return float(m["val_accuracy"])

    # -- checkpoints ----------------------------------------------------------------------------
    def meta_pruned(self) -> dict[str, Any]:
        return {**self.meta, "pruned": {"widths": architecture_widths(self.graph), "ignore": list(self.cfg.ignore)}}

    def checkpoint(self, stage: str) -> None:
        self.done.append(stage)
        save_checkpoint(self.out / "checkpoints" / "state.pt", self.model, self.meta_pruned(),
                        masks={k: v.cpu() for k, v in self.masks.items()}, done=list(self.done),
                        report=json.dumps(self.report), run_state=json.dumps(self.state))

    def restore(self) -> None:
        """Continue from ``checkpoints/state.pt``: rebuild the pruned architecture, load weights."""
        path = self.out / "checkpoints" / "state.pt"
        if not path.is_file():
            raise UserError(f"nothing to resume: {str(path)!r} does not exist; run without --resume")
        ck = load_checkpoint(path)
        rebuild_pruned(self.model, ck["pruned"], self.data.input_shape)
        self.model.load_state_dict(ck["state_dict"])
        self.graph = ModelGraph(self.model, self.data.input_shape, self.cfg.ignore, self.target.channel_multiple)
        self.masks = dict(ck.get("masks", {}))
        self.done = list(ck["done"])
        self.report = json.loads(ck["report"])
        self.state = json.loads(ck["run_state"])
        self.say(f"resuming after stage {self.done[-1]!r}")


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
def _model_figures(run: Run, model: nn.Module, accuracy: float | None, latency: dict[str, Any] | None) -> dict[str, Any]:
    g = ModelGraph(model, run.data.input_shape, run.cfg.ignore, run.target.channel_multiple)
    flops, params = g.flops_params()
    return {"accuracy": accuracy, "latency_ms": latency, "predicted_latency_ms": run.predicted_ms(model),
            "flops": flops, "params": params, "sparsity": round(sparsity(model), 6)}


def record_step(run: Run, stage: str, model: nn.Module | None = None, **rec: Any) -> None:
    """Record one step; figures are the current model's, or ``model``'s (a planned candidate)."""
    g = run.graph if model is None else ModelGraph(model, run.data.input_shape, run.cfg.ignore, run.target.channel_multiple)
    flops, params = g.flops_params()
    run.report["steps"].append({"step": len(run.report["steps"]) + 1, "stage": stage, "flops": flops, "params": params,
                                "predicted_latency_ms": run.predicted_ms(model), "widths": group_widths(g), **rec})


def _ensure_profile(run: Run) -> None:
    """The target's LUT of this model: found under ``profiles/``, or measured now."""
    from deploy_prune.latency.profile import ProfileSpec, find_profile, run_profile

    t0 = time.perf_counter()
    prof = find_profile(run.teacher, run.spec, run.data.input_shape, run.target, run.cfg.profiles, run.cfg.ignore,
                        run.cfg.force_profile)
    lowrank = run.lowrank_profile and not (prof and any("lowrank" in la for la in prof["layers"].values()))
    if prof is None or lowrank:
        run.say(f"no latency profile of {run.spec} for {run.target.name} under {run.cfg.profiles}/"
                f"{' with low-rank tables' if lowrank else ''}: profiling now")
        _, prof = run_profile(ProfileSpec(copy.deepcopy(run.teacher), run.spec, tuple(run.data.input_shape), run.target,
                                          ignore=run.cfg.ignore, lowrank=run.lowrank_profile), run.cfg.profiles,
                              seed=run.cfg.seed, reuse=True)
    run.profile = prof
    run.report["profile"] = {"fingerprint": prof["fingerprint"], "calibration": prof.get("calibration"),
                             "validation": {k: v for k, v in (prof.get("validation") or {}).items() if k == "calibrated"}}
    run._add_seconds("profile", time.perf_counter() - t0)


def _baseline(run: Run) -> None:
    t0 = time.perf_counter()
    run.say("baseline: accuracy and latency of the unpruned model")
    acc = float(evaluate(run.model, run.data.val)["accuracy"])
    run._add_seconds("evaluate", time.perf_counter() - t0)  # stages are disjoint: profile/export/measure apart
    _ensure_profile(run)
    meas = run.measure(run.model)
    run.report["baseline"] = _model_figures(run, run.model, acc, meas["candidate"])


def _budget(run: Run) -> dict[str, Any]:
    """The user's budget, and the same budget in the cost model's units."""
    kind, value = run.cfg.budget_kind()
    base = run.report["baseline"]
    graph = run.graph
    if kind in ("latency_ms", "latency_ratio"):
        base_ms = quiet_of(base["latency_ms"])
        ms = value if kind == "latency_ms" else value * base_ms
        if ms >= base_ms:
            raise UserError(f"the budget {ms:.3f} ms is not below the unpruned model's measured {base_ms:.3f} ms on "
                            f"{run.target.name}: nothing to do")
        run.cost = latency_cost(run.profile or {})
        # Predicted ms for the budget: scale by the model's own predicted/measured ratio.
        predicted = ms * run.cost.total(graph, group_widths(graph)) / base_ms
        return {"kind": kind, "value": value, "latency_ms": ms, "cost_budget": predicted, "measured": True}
    if kind == "sparsity":  # unstructured: the budget is on weights; FLOPs stay the cost reported per step
        run.cost = flops_cost()
        return {"kind": kind, "value": value, "latency_ms": None, "cost_budget": value, "measured": False}
    if kind == "flops_ratio":
        run.cost = flops_cost()
    elif kind == "params_ratio":
        run.cost = params_cost()
    else:
        run.cost = channels_cost()
    full = run.cost.total(graph, group_widths(graph))
    return {"kind": kind, "value": value, "latency_ms": None, "cost_budget": value * full, "measured": False}


def _over(run: Run, meas: dict[str, Any], budget: dict[str, Any]) -> float:
    """Measured latency / budget (> 1: over), as ``_pooled_over`` computes it for one measurement."""
    return _pooled_over([meas], budget)[0]


def _keeps(widths: dict[str, int], multiple: int) -> dict[str, list[int]]:
    """Every allowed width of every group."""
    return {g: allowed_keeps(c, multiple) for g, c in widths.items()}


def _narrowest(widths: dict[str, int], multiple: int) -> dict[str, int]:
    """The narrowest allowed width of every group."""
    return {g: ks[0] for g, ks in _keeps(widths, multiple).items()}


def _narrowest_or_unreachable(run: Run, budget: dict[str, Any]) -> float:
    """The planner put the corrected budget below the narrowest allowed widths' predicted cost.
    Only a measurement decides whether that is so: the narrowest widths are measured, and if they
    are over the budget it is unreachable (exit 3, giving the lowest latency reachable); if not,
    the prediction (or a noisy round) was wrong, and their predicted cost is returned as the floor
    to plan at. The measurement is kept (``state["narrowest"]``): it is the one architecture
    known to meet the budget when the table misleads (``measured_search``)."""
    plan = _narrowest(run.baseline_widths, run.target.channel_multiple)
    if "narrowest" in run.state:  # measured once per run: the loop can hit the floor again and again
        meas = run.state["narrowest"]["meas"]
    else:
        narrow = copy.deepcopy(run.teacher)
        prune_to_widths(narrow, run.data.input_shape, plan, run.cfg.ignore)
        meas = run.measure(narrow)
    r, fig = _pooled_over([meas], budget)
    low = quiet_of(meas["candidate"])
    if r > 1.0:
        got = f"{low:.3f} ms ({fig:.3f} of the baseline timed with it)" if budget["kind"] == "latency_ratio" else f"{low:.3f} ms"
        want = f"ratio {budget['value']:.3f} of the baseline" if budget["kind"] == "latency_ratio" else f"{budget['latency_ms']:.3f} ms"
        raise BudgetUnreachable(f"the budget ({want}) cannot be met on {run.target.name}: even the narrowest allowed "
                                f"widths measure {got}, the lowest reachable; raise the budget")
    run.state["narrowest"] = {"widths": plan, "r": r, "meas": meas}
    run.say(f"the LUT puts the budget below the narrowest widths, but they measure {100 * r:.0f} % of it: planning from them")
    # The floor is priced on the current graph, whose groups can differ from the baseline's
    # measured above (a factorised layer's rank group): as allocate's narrowest plan.
    floor = _narrowest(group_widths(run.graph), run.graph.channel_multiple)
    return run.cost.total(run.graph, floor) * (1 + 1e-9)


def _search_measured(run: Run, budget: dict[str, Any], under: Point, over: Point, stage: str) -> Point:
    """``measured_search.line_search`` between two measured architectures of the current model,
    each candidate measured as a pruned copy (latency does not depend on weight values) and
    recorded as a step of ``stage``."""
    def measure(widths: dict[str, int]) -> Point:
        cand = copy.deepcopy(run.model)
        prune_to_widths(cand, run.data.input_shape, widths, run.cfg.ignore)
        meas = run.measure(cand)
        r = _pooled_over([meas], budget)[0]
        record_step(run, stage, cand, candidate=True, measured_latency_ms=meas["candidate"], search="measured",
                    baseline_same_session_ms=quiet_of(meas["baseline"]), cost_budget=None, accuracy=None)
        run.say(f"{stage} (measured search): {quiet_of(meas['candidate']):.3f} ms ({100 * r:.0f} % of the budget)")
        return Point(widths, r)

    keeps = _keeps(group_widths(run.graph), run.graph.channel_multiple)
    best, _ = line_search(under, over, measure, _window(run.cfg), keeps, run.cfg.max_loops)
    return best


def _window(cfg: CompressConfig) -> tuple[float, float, float]:
    """Where a measured latency should land, as shares of the budget: (low, high, aim). Between
    ``slack`` and ``margin`` under it; a correction aims at the middle."""
    low, high = 1.0 - cfg.slack, 1.0 - cfg.margin
    return low, high, (low + high) / 2


def _plan_closed_loop(run: Run, method: Method, budget: dict[str, Any]) -> float:
    """Correct the predicted budget until the planned architecture, measured, lands between
    ``slack`` and ``margin`` under the real budget. Returns the corrected predicted budget.

    A plan met again (the corrections oscillate between two neighbouring architectures, as
    coarse channel steps make them) pools its measurements and ends the search, and so does
    ``max_loops``: then the best plan *measured* is taken (the widest one under the margin, else
    the fastest), never a correction that was not measured."""
    pred = budget["cost_budget"]
    low, high, aim = _window(run.cfg)
    seen: dict[tuple[tuple[str, int], ...], dict[str, Any]] = {}
    for i in range(run.cfg.max_loops):
        try:
            plan = method.plan(run, pred)
        except BudgetUnreachable:
            pred = _narrowest_or_unreachable(run, budget)
            plan = method.plan(run, pred)
        key = tuple(sorted(plan.items()))
        cand = copy.deepcopy(run.model)
        prune_to_widths(cand, run.data.input_shape, plan, run.cfg.ignore)
        meas = run.measure(cand)
        again = key in seen
        rec = seen.setdefault(key, {"pred": pred, "meas": []})
        rec["meas"].append(meas)
        r = rec["r"] = _pooled_over(rec["meas"], budget)[0]
        p = run.predicted_ms(cand)
        record_step(run, "plan", cand, candidate=True, measured_latency_ms=meas["candidate"],
              baseline_same_session_ms=quiet_of(meas["baseline"]), cost_budget=pred, accuracy=None)
        run.say(f"plan {i + 1}: predicted {p:.3f} ms, measured {quiet_of(meas['candidate']):.3f} ms "
                f"({100 * r:.0f} % of the budget{', pooled with its earlier measurements' if again else ''})")
        if low <= r <= high:
            return float(pred)
        if again:
            break
        pred *= aim / r
    points = [Point(dict(k), v["r"], {"pred": v["pred"]}) for k, v in seen.items()]
    if "narrowest" in run.state:
        points.append(Point(dict(run.state["narrowest"]["widths"]), run.state["narrowest"]["r"]))
    under = [p for p in points if p.r <= high]
    over = [p for p in points if p.r > high]
    if under and over:
        # Corrections of the table's budget did not land: the table and the target disagree.
        # Measurement alone decides between the widest architecture measured under the budget
        # and the fastest one over it, and the steps then prune to those widths.
        a, b = max(under, key=lambda p: p.r), min(over, key=lambda p: p.r)
        run.say(f"plan: no plan the LUT priced lands in {100 * low:.0f}-{100 * high:.0f} % of the budget (measured "
                f"{', '.join(f'{100 * p.r:.0f} %' for p in points)}); searching between the architectures measured at "
                f"{100 * a.r:.0f} % and {100 * b.r:.0f} % on measured latency alone")
        best = _search_measured(run, budget, a, b, "plan")
        return _pin(run, best, "plan")
    best = max(under, key=lambda p: p.r) if under else min(points, key=lambda p: p.r)
    run.say(f"plan: no architecture lands in {100 * low:.0f}-{100 * high:.0f} % of the budget; taking the best "
            f"measured ({100 * best.r:.0f} %)")
    return float(best.info["pred"]) if "pred" in best.info else _pin(run, best, "plan")


def _pin(run: Run, best: Point, stage: str) -> float:
    """From here on the structured steps and the verification prune to ``best``'s measured widths
    instead of re-planning on the table; returns their predicted cost (for the record)."""
    run.state["pinned"] = {"widths": dict(best.widths), "r": best.r, "stage": stage}
    run.report["notes"].append(f"the latency table and the measurements disagreed; the {stage} stage chose widths on "
                               f"measured latency alone (measured {100 * best.r:.0f} % of the budget)")
    return float(run.cost.total(run.graph, best.widths))


def _structured(run: Run, method: Method, budget: dict[str, Any]) -> None:
    steps = run.cfg.steps or method.default_steps
    start = run.cost.total(run.graph, group_widths(run.graph))
    goal = run.state["cost_budget"]
    pinned = run.state.get("pinned")
    if pinned:  # the widths before the first step, for resumed runs too
        run.state.setdefault("step_start_widths", group_widths(run.graph))
    for i in range(1, steps + 1):
        stage = f"step-{i}"
        if stage in run.done:
            continue
        t0 = time.perf_counter()
        b = start * (goal / start) ** (i / steps)  # geometric: equal relative cuts per step
        if pinned:  # widths chosen on measurement: walk to them, the method choosing which channels go
            start_w = run.state["step_start_widths"]
            _prune_to(run, method, between(start_w, pinned["widths"], i / steps, _keeps(start_w, run.graph.channel_multiple)))
        else:
            method.prune(run, b)
        t_prune = time.perf_counter() - t0
        run._add_seconds("structured", t_prune)
        acc = run.finetune(run.cfg.step_fraction, stage) if i < steps or budget["measured"] else None
        meas = run.measure(run.model)
        run.state["last_measurement"] = meas
        record_step(run, "structured", cost_budget=b, accuracy=acc, measured_latency_ms=meas["candidate"],
              baseline_same_session_ms=quiet_of(meas["baseline"]), seconds=round(time.perf_counter() - t0, 2))
        run.say(f"step {i}/{steps}: {run.cost.kind} {run.cost.total(run.graph, group_widths(run.graph)):.4g} "
                f"{run.cost.unit}" + (f", accuracy {acc:.4f}" if acc is not None else ""))
        run.checkpoint(stage)


def _verify(run: Run, method: Method, budget: dict[str, Any]) -> None:
    """Measure the pruned architecture; while over ``1 - margin`` of the budget, tighten the
    predicted budget by the measured/predicted ratio and prune further. When the widths were
    chosen on measurement (``_pin``), or a tightening leaves them where they were (the table
    calls the cuts free), the next widths come from a measured search between the narrowest
    widths and the current ones instead."""
    if run.state.get("verified"):  # a resumed run that had already met the budget
        return
    for i in range(run.cfg.max_loops):
        stage = f"verify-{i + 1}"
        if stage in run.done:
            continue
        # The last structured step was just measured; later rounds measure the further-pruned model.
        meas = run.state.pop("last_measurement", None) or run.measure(run.model)
        r = _over(run, meas, budget)
        if i > 0:
            record_step(run, "closed-loop", measured_latency_ms=meas["candidate"], accuracy=run.state.get("loop_accuracy"),
                  baseline_same_session_ms=quiet_of(meas["baseline"]))
        run.say(f"verify {i + 1}: measured {quiet_of(meas['candidate']):.3f} ms ({100 * r:.0f} % of the budget)")
        # The plan loop's margin, not the budget itself: the final check re-measures, and the
        # steps' re-planning on fine-tuned weights may have moved the architecture off the plan.
        if r <= _window(run.cfg)[1]:
            run.state["verified"] = True
            run.checkpoint(stage)
            return
        before = group_widths(run.graph)
        if not run.state.get("pinned"):
            pred = run.cost.total(run.graph, before)
            run.state["cost_budget"] = pred * _window(run.cfg)[2] / r
            try:
                method.prune(run, run.state["cost_budget"])
            except BudgetUnreachable:
                run.state["cost_budget"] = _narrowest_or_unreachable(run, budget)
                method.prune(run, run.state["cost_budget"])
        if run.state.get("pinned") or group_widths(run.graph) == before:
            run.say(f"verify {i + 1}: the LUT's tightening leaves the widths as they are; choosing them on measured latency")
            _prune_to(run, method, _verified_widths(run, budget, Point(before, r), stage).widths)
        run.state["loop_accuracy"] = run.finetune(run.cfg.step_fraction, stage)
        run.checkpoint(stage)
    run.report["notes"].append(f"the closed loop stopped after {run.cfg.max_loops} tightenings still over budget")


def _verified_widths(run: Run, budget: dict[str, Any], over: Point, stage: str) -> Point:
    """Widths under the budget for the current model, chosen on measurement: a search between its
    narrowest widths (measured here; over the budget: unreachable, exit 3) and ``over``."""
    floor = _narrowest(group_widths(run.graph), run.graph.channel_multiple)
    narrow = copy.deepcopy(run.model)
    prune_to_widths(narrow, run.data.input_shape, floor, run.cfg.ignore)
    meas = run.measure(narrow)
    r = _pooled_over([meas], budget)[0]
    if r > _window(run.cfg)[1]:
        raise BudgetUnreachable(f"the budget cannot be met on {run.target.name}: even the narrowest allowed widths "
                                f"measure {100 * r:.0f} % of it; raise the budget")
    best = _search_measured(run, budget, Point(floor, r), over, stage)
    _pin(run, best, stage)
    return best


def _prune_to(run: Run, method: Method, widths: dict[str, int]) -> None:
    """Prune the current model to ``widths`` (never wider than it is), the method choosing which
    channels go (``prune_to``), else its criterion's lowest-scoring channels (L1 without one)."""
    current = group_widths(run.graph)
    widths = {g: min(k, current[g]) for g, k in widths.items() if g in current and k < current[g]}
    if not widths:
        return
    fn = getattr(method, "prune_to", None)
    if fn is not None:
        fn(run, widths)
        return
    from deploy_prune.importance import score_groups

    scores = score_groups(run.model, run.graph, getattr(method, "criterion", "l1"), run.score_batches(), seed=run.cfg.seed)
    run.graph.prune_by_scores(widths, scores)


def _pooled_over(meas: list[dict[str, Any]], budget: dict[str, Any]) -> tuple[float, float]:
    """(measured / budget, the figure compared) pooled over several measurements: the quiet
    estimate (``latency.timing``) over all their rounds; for a ratio budget, the candidate's over
    the baseline's, both from the same measurements. Contention episodes on a shared machine
    slow a small model by a larger share than the baseline, so pairing rounds does not cancel
    them; dropping the contended rounds does."""
    cand = quiet_estimate([v for m in meas for v in m["candidate"]["round_medians"]])
    if budget["kind"] == "latency_ratio":
        r = cand / quiet_estimate([v for m in meas for v in m["baseline"]["round_medians"]])
        return r / budget["value"], r
    return cand / budget["latency_ms"], cand


def _final_measure(run: Run, budget: dict[str, Any]) -> tuple[dict[str, Any], bool, str]:
    """Measure the exported model twice; the budget is met when the pooled figure is within it."""
    meas = run.measure(run.model)
    if budget["kind"] == "sparsity":
        got = sparsity(run.model, run.cfg.ignore)
        met = got >= budget["value"] - 1e-3  # the last iteration rounds counts down, never past the target
        return meas, met, f"sparsity {got:.4f} {'>=' if met else '<'} target {budget['value']:.4f} (conv/linear weights)"
    if not budget["measured"]:
        got = run.cost.total(run.graph, group_widths(run.graph))
        met = got <= budget["cost_budget"] * (1 + 1e-9)
        return meas, met, f"{run.cost.kind} {got:.4g} {'<=' if met else '>'} budget {budget['cost_budget']:.4g} {run.cost.unit}"
    again = run.measure(run.model)
    r, fig = _pooled_over([meas, again], budget)
    ms = (f"measured {quiet_of(meas['candidate']):.3f} ms, re-measured {quiet_of(again['candidate']):.3f} ms "
          f"(quiet rounds; overall medians {meas['candidate']['median']:.3f} and {again['candidate']['median']:.3f} ms)")
    if budget["kind"] == "latency_ratio":
        verdict = f"{ms}; pooled ratio to the baseline {fig:.3f} {'<=' if r <= 1 else '>'} budget {budget['value']:.3f}"
    else:
        verdict = f"{ms}; pooled {fig:.3f} ms {'<=' if r <= 1 else '>'} budget {budget['latency_ms']:.3f} ms"
    if r > 1.0:
        verdict += f" ({100 * r:.0f} % of it): the model is returned anyway, NOT meeting the budget"
    return again, r <= 1.0, verdict


def compress(cfg: CompressConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the report (also written to ``OUT/report.json``)."""
    t_start = time.perf_counter()
    kind, _ = cfg.budget_kind()  # conflicting or empty budgets fail before anything loads
    if cfg.nm:
        parse_nm(cfg.nm)
    common = {k: v for k, v in (("criterion", cfg.criterion), ("amount", cfg.amount), ("tolerance", cfg.tolerance))
              if v is not None}
    method = get_method(cfg.method, **{**common, **cfg.method_options})
    if kind not in method.budget_kinds:
        takes = ", ".join("--" + k.replace("_", "-") for k in method.budget_kinds)
        raise UserError(f"--method {method.name} cannot honour --{kind.replace('_', '-')}; it takes {takes}")
    fresh = _claim_out(cfg)
    try:
        run = Run(cfg, progress)
    except BaseException:
        if fresh and cfg.out.is_dir() and not any(cfg.out.iterdir()):  # nothing half-made left behind
            cfg.out.rmdir()
        raise
    try:
        return _pipeline(run, method, t_start)
    except UserError as e:
        state = run.out / "checkpoints" / "state.pt"
        if isinstance(e, BudgetUnreachable) or not state.is_file() or "--resume" in str(e):
            raise
        # e.g. the agent became unreachable mid-run: what was done is kept
        raise type(e)(f"{e} (stages done so far are kept in {state}; fix this and rerun with --resume)") from None


# What a compress run writes in its directory: --overwrite removes these, and nothing else.
RUN_FILES = ("model.onnx", "model.onnx.json", "model.pt", "model.pt2", "report.json", "report.md", "report.html",
             "sensitivity.json")
RUN_DIRS = ("checkpoints", "finetune")


def _claim_out(cfg: CompressConfig) -> bool:
    """Refuse to mix two runs in one directory: one that holds a run needs ``--resume`` (continue
    it) or ``--overwrite`` (replace it). Returns whether the directory is new."""
    import shutil

    held = [n for n in ("report.json", "checkpoints/state.pt") if (cfg.out / n).is_file()]
    if held and cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if held and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{str(cfg.out)!r} already holds a compress run ({held[0]}); pass --resume to continue it, "
                        "--overwrite to replace it, or another --out")
    if held and cfg.overwrite:
        for name in RUN_FILES:
            (cfg.out / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(cfg.out / name, ignore_errors=True)
        for stale in cfg.out.glob("*.png"):
            stale.unlink()
    return not cfg.out.exists()


def _pipeline(run: Run, method: Method, t_start: float) -> dict[str, Any]:
    cfg = run.cfg
    run.lowrank_profile = getattr(method, "lowrank_profile", False) and cfg.budget_kind()[0].startswith("latency")
    if cfg.resume:
        run.restore()
    # 1-2. baseline and budget
    if "baseline" not in run.done:
        _baseline(run)
        run.state["budget"] = _budget(run)
        run.state["cost_budget"] = run.state["budget"]["cost_budget"]
        run.checkpoint("baseline")
    else:
        _ensure_profile(run)
        _budget(run)  # sets the cost model again
    budget = run.state["budget"]
    # 3. method setup
    method.setup(run)
    # 4. closed loop on the plan (latency budgets only)
    if budget["measured"] and "plan" not in run.done and getattr(method, "plans", True):
        t0, sec = time.perf_counter(), run.report["stage_seconds"]
        io_before = sec.get("export", 0.0) + sec.get("measure", 0.0)
        run.state["cost_budget"] = _plan_closed_loop(run, method, budget)
        io_spent = sec.get("export", 0.0) + sec.get("measure", 0.0) - io_before
        run._add_seconds("plan", time.perf_counter() - t0 - io_spent)  # planning only; its measurements count apart
        run.checkpoint("plan")
    # 5. structured steps, or the unstructured method's own prune-retrain schedule
    if budget["kind"] == "sparsity":
        if "sparsify" not in run.done:
            method.prune(run, budget["value"])
            run.checkpoint("sparsify")
    else:
        try:
            _structured(run, method, budget)
        except BudgetUnreachable:
            if not budget["measured"]:
                raise
            run.state["cost_budget"] = _narrowest_or_unreachable(run, budget)
            _structured(run, method, budget)
    # 6. verification
    if budget["measured"]:
        _verify(run, method, budget)
    # 7. final fine-tuning with the unstructured masks
    if "finetune" not in run.done:
        run.masks = method.masks(run)
        if cfg.nm:
            run.masks = _with_nm(run, run.masks)
        apply_masks(run.model, run.masks)
        resume = (run.out / "finetune" / "final" / "checkpoints" / "last.pt").is_file() and cfg.resume
        run.say(f"fine-tuning {cfg.epochs} epoch(s){' with distillation' if cfg.kd else ''}")
        acc = run.finetune(cfg.epochs, "final", resume=resume)
        record_step(run, "finetune", accuracy=acc, sparsity=round(sparsity(run.model), 6))
        run.checkpoint("finetune")
    # 8. export, final measurement, report
    return _finish(run, method, budget, t_start)


def _with_nm(run: Run, masks: Masks) -> Masks:
    n, m = parse_nm(run.cfg.nm or "")
    nm, skipped = nm_masks(run.model, n, m, run.cfg.ignore)
    note = (f"{n}:{m} semi-structured masks: dense backends run them as ordinary zeros; sparse tensor cores (NVIDIA "
            f"Ampere+, TensorRT with sparse weights) can run them faster")
    if skipped:
        note += f"; left dense (input channels not a multiple of {m}): {', '.join(skipped)}"
    run.report["notes"].append(note)
    return combine_masks(masks, nm)


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4), or a UserError naming the form."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--nm must be N:M such as 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise UserError(f"--nm {text}: need 0 < N < M (2:4 is what sparse tensor cores run)")
    return n, m


def _finish(run: Run, method: Method, budget: dict[str, Any], t_start: float) -> dict[str, Any]:
    cfg = run.cfg
    t0 = time.perf_counter()
    meta = run.meta_pruned()
    save_checkpoint(run.out / "model.pt", run.model, meta)
    _save_program(run)
    exp = export_onnx(run.model, run.data.input_shape, run.out / "model.onnx", batch=run.target.batch,
                      parity_inputs=torch.stack([run.data.val[i][0] for i in range(min(8, len(run.data.val)))]))  # type: ignore[arg-type]
    run._add_seconds("export", time.perf_counter() - t0)
    meas, met, why = _final_measure(run, budget)
    t0 = time.perf_counter()
    acc = float(evaluate(run.model, run.data.val)["accuracy"])
    run._add_seconds("evaluate", time.perf_counter() - t0)
    final = _model_figures(run, run.model, acc, meas["candidate"])
    if run.masks and final["sparsity"] > 0 and UNSTRUCTURED_NOTE.format(backend=run.target.backend) not in run.report["notes"]:
        run.report["notes"].append(UNSTRUCTURED_NOTE.format(backend=run.target.backend))
    if not exp.get("parity_ok", True):
        run.report["notes"].append(f"ONNX parity over tolerance: max |diff| {exp['max_abs_diff']:.2e}")
    run.report["stage_seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    rep = {
        "schema_version": SCHEMA_VERSION,
        "run_dir": str(run.out),
        "model": {**run.meta["model"], "input_shape": run.meta["input_shape"]},
        "data": run.meta["data"],
        "target": run.target.as_dict(),
        "measurer": run.measurer.info(),
        "budget": {"kind": budget["kind"], "value": budget["value"], "latency_ms": budget["latency_ms"],
                   "cost_model": run.cost.kind, "cost_budget": run.state["cost_budget"]},
        "method": {"name": method.name, "settings": {**method.settings(), **_run_settings(cfg, method)}},
        "baseline": run.report["baseline"],
        "final": {**final, "baseline_same_session_ms": quiet_of(meas["baseline"])},
        "met_budget": met,
        "budget_note": why,
        "steps": run.report["steps"],
        "layers": [{"group": n, "channels_before": c, "channels_after": group_widths(run.graph).get(n, c)}
                   for n, c in run.baseline_widths.items()],
        "ranks": _ranks(run.model),
        "stage_seconds": run.report["stage_seconds"],
        "notes": run.report["notes"],
        "sensitivity": run.report.get("sensitivity"),
        "profile": run.report.get("profile"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "data_options"},
        "provenance": provenance(threads=torch.get_num_threads(), target=run.target.name),
    }
    write_json(run.out / "report.json", rep)
    run.checkpoint("done")
    try:
        from deploy_prune.report import write_reports

        write_reports(run.out)
    except ImportError:  # reports are optional extras; report.json is the truth
        pass
    return rep


def _ranks(model: nn.Module) -> list[dict[str, Any]]:
    """Factorised layers: their rank, and the rank of the dense conv they replace."""
    from deploy_prune.transforms.lowrank import LowRankConv2d

    return [{"layer": n, "rank": m.rank, "full_rank": m.full_rank} for n, m in model.named_modules() if isinstance(m, LowRankConv2d)]


def _run_settings(cfg: CompressConfig, method: Method) -> dict[str, Any]:
    return {"steps": cfg.steps or method.default_steps, "step_fraction": cfg.step_fraction, "epochs": cfg.epochs,
            "kd": cfg.kd, "lr": cfg.lr, "batch_size": cfg.batch_size, "slack": cfg.slack, "margin": cfg.margin, "seed": cfg.seed}


def _save_program(run: Run) -> None:
    """``model.pt2``: the pruned model as a ``torch.export`` program, loadable with
    ``torch.export.load`` without deploy-prune or the model's code."""
    example = torch.zeros(run.target.batch, *run.data.input_shape)
    try:
        ep = torch.export.export(copy.deepcopy(run.model).eval().cpu(), (example,))
    except Exception as e:  # a model torch.export cannot capture still has model.pt and model.onnx
        run.report["notes"].append(f"model.pt2 not written: torch.export failed ({type(e).__name__})")
        return
    buf = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; the temp file has neither
    torch.export.save(ep, buf)
    atomic_write(run.out / "model.pt2", lambda p: p.write_bytes(buf.getvalue()))
