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
   absorbs the re-measurement noise of the final check); when no plan the table prices lands
   there, measurement alone chooses the widths (``loop``, ``measured_search``).
5. **structured pruning** in ``steps`` steps walking to the widths measured in stage 4 (the
   method's criterion, re-scored on the current weights, choosing which channels go; a method
   whose plan was not measured follows a geometric schedule of budgets), each followed by a
   short fine-tuning; or, for a ``--sparsity`` budget, the unstructured method's own
   prune-retrain schedule (``methods.imp``), checkpointed per iteration.
6. **verification**: the pruned model is measured; over budget, the predicted budget is
   tightened by the measured/predicted ratio and the model pruned further (or, where the table
   cannot, to widths found on measurement).
7. **final fine-tuning** (the API user's ``finetune``, else the built-in loop with knowledge
   distillation from the unpruned model) with the method's unstructured masks held. Under
   ``torchrun`` every rank fine-tunes its shard with DDP; rank 0 alone does everything else
   (``workers``).
8. **export and final measurement**, re-measured before the budget is declared met; reports.

Each stage ends with a checkpoint (``checkpoints/state.pt``), so ``--resume`` continues an
interrupted run; the final fine-tuning checkpoints every epoch too. One process at a time writes
a run directory (``io.RunLock``), and ``--overwrite`` replaces the old run only once the new one
finishes (``_Claim``).
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy_prune.distributed import backend as distributed_backend
from deploy_prune.distributed import world as distributed_world
from deploy_prune.errors import BudgetUnreachable, UserError
from deploy_prune.export import export_onnx
from deploy_prune.io import (
    ASIDE,
    RunLock,
    SetAside,
    atomic_write,
    is_disk_full,
    provenance,
    refuse_input_as_output,
    remove_if_empty,
    write_json,
)
from deploy_prune.latency.timing import quiet_of
from deploy_prune.measured_search import between
from deploy_prune.methods import Method, get_method
from deploy_prune.models.checkpoint import save_checkpoint
from deploy_prune.pipeline.config import CompressConfig, parse_nm
from deploy_prune.pipeline.loop import (
    _budget,
    _final_measure,
    _floor_or_unreachable,
    _keeps,
    _plan_closed_loop,
    _prune_to,
    _verify,
    cost_model,
)
from deploy_prune.pipeline.run import Run, UserParts, _model_figures, record_step
from deploy_prune.report import RUN_DIRS, RUN_FILES, SCHEMA_VERSION
from deploy_prune.transforms import (
    Masks,
    apply_masks,
    combine_masks,
    group_widths,
    nm_masks,
    sparsity,
)

UNSTRUCTURED_NOTE = ("Unstructured zeros (magnitude masks) do not lower dense latency on {backend}: it runs every "
                     "weight, zero or not. They shrink the compressed file and help only on sparse-aware runtimes.")


def _ensure_profile(run: Run) -> None:
    """The target's LUT of this model: found under ``profiles/``, or measured now."""
    from deploy_prune.latency.profile import ProfileSpec, find_profile, run_profile

    t0 = time.perf_counter()
    prof = find_profile(run.teacher, run.spec, run.data.input_shape, run.target, run.cfg.profiles, run.cfg.ignore,
                        run.cfg.force_profile)
    lowrank = run.lowrank_profile and not (prof and any("lowrank" in la for la in prof["layers"].values()))
    if prof is None or lowrank:
        run.say(f"profiling {run.target.name}: no latency table{' with low-rank entries' if lowrank else ''} "
                f"of this model under {run.cfg.profiles}/")
        _, prof = run_profile(ProfileSpec(copy.deepcopy(run.teacher), run.spec, tuple(run.data.input_shape), run.target,
                                          ignore=run.cfg.ignore, lowrank=run.lowrank_profile), run.cfg.profiles,
                              seed=run.cfg.seed, reuse=True, progress=lambda stage, d, n: run.count(f"profile: {stage}", d, n))
    run.profile = prof
    run.report["profile"] = {"fingerprint": prof["fingerprint"], "calibration": prof.get("calibration"),
                             "validation": {k: v for k, v in (prof.get("validation") or {}).items() if k == "calibrated"}}
    run._add_seconds("profile", time.perf_counter() - t0)


def _baseline(run: Run) -> None:
    t0 = time.perf_counter()
    run.say("baseline: accuracy and latency of the unpruned model")
    acc = run.metric(run.model)
    run._add_seconds("evaluate", time.perf_counter() - t0)  # stages are disjoint: profile/export/measure apart
    _ensure_profile(run)
    meas = run.measure(run.model)
    run.report["baseline"] = _model_figures(run, run.model, acc, meas["candidate"])
    deployed = run.deployed(run.model, acc)
    if deployed is not None:
        run.report["baseline"]["deployed"] = deployed[1]


def start(run: Run) -> None:
    """Stages 1-2: the baseline measured, and the budget in the cost model's units."""
    _baseline(run)
    run.state["budget"] = _budget(run)
    run.state["cost_budget"] = run.state["budget"]["cost_budget"]
    run.checkpoint("baseline")


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
            _prune_to(run, method, between(start_w, pinned["widths"], i / steps, _keeps(start_w, run.graph.space)))
        else:
            method.prune(run, b)
        t_prune = time.perf_counter() - t0
        run._add_seconds("structured", t_prune)
        run.recalibrate()
        acc = run.finetune(run.cfg.step_fraction, stage) if i < steps or budget["measured"] else None
        # Walking to measured widths, the steps before the last decide nothing by latency: only
        # the last is measured (verification starts from it).
        meas = run.measure(run.model) if i == steps or not pinned else None
        if meas is not None:
            run.state["last_measurement"] = meas
        record_step(run, "structured", cost_budget=b, accuracy=acc, measured_latency_ms=meas and meas["candidate"],
                    baseline_same_session_ms=meas and quiet_of(meas["baseline"]), seconds=round(time.perf_counter() - t0, 2))
        run.say(f"step {i}/{steps}: {run.cost.kind} {run.cost.total(run.graph, group_widths(run.graph)):.4g} "
                f"{run.cost.unit}" + (f", {run.parts.metric} {100 * acc:.2f} %" if acc is not None else ""))
        run.checkpoint(stage)


def compress(cfg: CompressConfig, progress: Callable[[str], None] | None = None, parts: UserParts | None = None,
             return_model: bool = False) -> Any:
    """Run the whole pipeline; returns the report (also written to ``OUT/report.json``), and the
    pruned model with it when ``return_model``. ``parts`` carries the API's in-memory model, data
    and callbacks (``UserParts``); the CLI passes none.

    ``OUT`` is locked for the run (``io.RunLock``). With ``overwrite`` the old run goes only when
    the new one finishes: its files wait in ``OUT/.replaced-run/`` meanwhile and are put back if
    the new run fails with an exception (a killed or interrupted run leaves them there: ``resume``
    finishes the replacement). A failed run in a new ``OUT`` leaves no empty directory; a full
    disk is a ``UserError`` naming the file."""
    t_start = time.perf_counter()
    method = make_method(cfg)
    if distributed_world()[0] > 0:  # under torchrun: rank 0 runs the pipeline, this rank fine-tunes with it
        from deploy_prune.pipeline.workers import serve

        rep, model = serve(cfg, parts or UserParts())
        return (rep, model) if return_model else rep
    claim = _Claim(cfg)
    run = claim.open(progress, parts)
    try:
        _criterion_for_the_task(run, method)
        rep = _pipeline(run, method, t_start)
        claim.finish()
        if run.world > 1:
            from deploy_prune.pipeline.workers import send_done

            send_done(rep, run.model, run.meta_pruned()["pruned"])
        return (rep, run.model) if return_model else rep
    except Exception as e:
        err = _failure(e, run.out, restored=claim.fail())
        if err is e:
            raise
        raise err from None
    finally:
        claim.release()


def _failure(e: Exception, out: Path, restored: bool) -> Exception:
    """What a failed run raises: ``e``, its message saying what of the run is kept."""
    state = out / "checkpoints" / "state.pt"
    if is_disk_full(e):
        where = f" writing {getattr(e, 'filename', None) or out}"
        if restored:
            return UserError(f"no space left on device{where}; the previous run in {str(out)!r} is restored; free space and rerun")
        return UserError(f"no space left on device{where}; free space and rerun" + (RESUME_TAIL if state.is_file() else ""))
    if not isinstance(e, UserError):
        return e
    if restored:  # the new run's checkpoints are gone with it: no resume hint
        return type(e)(SetAside.restored(without_resume_hint(str(e)), out))
    if isinstance(e, BudgetUnreachable) or not state.is_file() or "--resume" in str(e):
        return e
    # e.g. the agent became unreachable mid-run: what was done is kept
    return type(e)(f"{e} (stages done so far are kept in {state}; fix this and rerun with --resume)")


# How a failed run's message ends when its checkpoints are kept for --resume.
RESUME_HINTS = (" (stages done so far are kept in ", "; the last good checkpoint is kept in ")
RESUME_TAIL = " with --resume"


def without_resume_hint(message: str) -> str:
    """``message`` without the words that point at checkpoints for ``--resume`` (for a run whose
    checkpoints did not survive its failure)."""
    for hint in RESUME_HINTS:
        message = message.split(hint)[0]
    return message[: -len(RESUME_TAIL)] if message.endswith(RESUME_TAIL) else message


DATA_FREE_CRITERION = "bn-scale"  # every conv of a YOLO has a BatchNorm: network slimming's score


def _criterion_for_the_task(run: Run, method: Method) -> None:
    """A method's default criterion that scores classifier batches (cross-entropy on labels)
    becomes ``DATA_FREE_CRITERION`` on other data (detection); a criterion the user chose stays,
    and ``importance.score_groups`` refuses it in one line if it cannot score these batches."""
    from deploy_prune.importance import CRITERIA

    crit = getattr(method, "criterion", None)
    chosen = run.cfg.criterion is not None or "criterion" in run.cfg.method_options
    if run.data.task == "classify" or chosen or not isinstance(crit, str) or crit not in CRITERIA \
            or not CRITERIA.get(crit).needs_data:
        return
    method.criterion = DATA_FREE_CRITERION  # type: ignore[attr-defined]
    run.notes.append(f"criterion {DATA_FREE_CRITERION} (the method's {crit} scores classifiers; this is {run.data.task} data)")


def make_method(cfg: CompressConfig) -> Method:
    """The run's method with its settings, checked against the budget before anything loads."""
    kind, _ = cfg.budget_kind()  # conflicting or empty budgets fail here too
    if cfg.nm:
        parse_nm(cfg.nm)
    common = {k: v for k, v in (("criterion", cfg.criterion), ("amount", cfg.amount), ("tolerance", cfg.tolerance))
              if v is not None}
    method = get_method(cfg.method, **{**common, **cfg.method_options})
    if kind not in method.budget_kinds:
        takes = ", ".join("--" + k.replace("_", "-") for k in method.budget_kinds)
        raise UserError(f"--method {method.name} cannot honour --{kind.replace('_', '-')}; it takes {takes}")
    return method


def open_run(cfg: CompressConfig, progress: Callable[[str], None] | None, parts: UserParts | None) -> Run:
    """The run in ``cfg.out``, once the directory is claimed (``_Claim``), for a caller that drives
    the stages itself and never finishes a run (``Planner``): ``overwrite`` replaces the old run
    as soon as the new one's inputs are good, and the directory is not kept locked. A run that
    fails to start leaves no directory it made."""
    claim = _Claim(cfg)
    try:
        run = claim.open(progress, parts)
        claim.finish()
        return run
    finally:
        claim.release()


MARKS = ("report.json", "checkpoints/state.pt")  # files only a compress run leaves


class _Claim:
    """This process's hold on a compress run directory ``OUT``: its lock (``io.RunLock``), the
    checks that keep two runs from mixing in it, and, with ``--overwrite``, the old run set aside
    (``io.SetAside``) once the new run's inputs are good, deleted when it finishes (``finish``)
    and put back when it fails (``fail``)."""

    def __init__(self, cfg: CompressConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self.old = SetAside(cfg.out, "compress", (*RUN_FILES, *RUN_DIRS), ("*.png",))
        self.fresh = not cfg.out.exists()
        self.lock = RunLock(cfg.out)

    def open(self, progress: Callable[[str], None] | None, parts: UserParts | None) -> Run:
        """Lock and check ``OUT``, load the run's inputs; then (overwrite) set the old run aside."""
        try:
            self.lock.acquire()
            self._check()
            run = Run(self.cfg, progress, parts)
            if self.old.replacing:
                self.old.set_aside()
            return run
        except BaseException:
            self.release()
            raise

    def _check(self) -> None:
        """Refuse to mix two runs in one directory: one that holds a run needs ``--resume``
        (continue it) or ``--overwrite`` (replace it); files of another command's run (a train
        run's model.pt, also when its interrupted --overwrite set it aside) are refused; and
        ``--weights`` may not be a file the run writes."""
        cfg, out = self.cfg, self.out
        refuse_input_as_output("--out", out, [out / n for n in (*RUN_FILES, *RUN_DIRS, ASIDE)],
                               [("--weights", cfg.weights or None)])
        held = [n for n in MARKS if (out / n).is_file()]
        if (held or self.old.aside.is_dir()) and cfg.resume and cfg.overwrite:
            raise UserError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        if self.old.interrupted(cfg.resume, cfg.overwrite, resumable="checkpoints/state.pt" in held):
            return
        if held and not (cfg.resume or cfg.overwrite):
            raise UserError(f"{str(out)!r} already holds a compress run ({held[0]}); pass --resume to continue it, "
                            "--overwrite to replace it, or another --out")
        if not held:
            theirs = [n for n in RUN_FILES if n != "sensitivity.json" and (out / n).is_file()]
            if theirs:
                raise UserError(f"{str(out)!r} holds {', '.join(theirs)}, which compress writes, but no compress run "
                                f"(no {' or '.join(MARKS)}); choose another --out")
        self.old.replacing = bool(held) and cfg.overwrite

    def finish(self) -> None:
        """The new run is complete: the one it replaces goes."""
        self.old.finish()

    def fail(self) -> bool:
        """The new run failed: its files go and the old run comes back. True if there was one to restore."""
        return self.old.fail()

    def release(self) -> None:
        """Unlock; a directory this run made and left empty goes too."""
        self.lock.release()
        if self.fresh:
            remove_if_empty(self.out)


def _pipeline(run: Run, method: Method, t_start: float) -> dict[str, Any]:
    cfg = run.cfg
    run.lowrank_profile = getattr(method, "lowrank_profile", False) and cfg.budget_kind()[0].startswith("latency")
    if cfg.resume:
        run.restore()
    # 1-2. baseline and budget
    if "baseline" not in run.done:
        start(run)
    else:
        _ensure_profile(run)
        run.cost = cost_model(run)  # the budget itself is in the checkpoint
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
            run.state["cost_budget"] = _floor_or_unreachable(run, budget)
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
        how = " with your finetune" if run.parts.finetune else " with distillation" if cfg.kd and not run.parts.loss else ""
        run.say(f"fine-tuning {cfg.epochs} epoch(s){how}")
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


def _finish(run: Run, method: Method, budget: dict[str, Any], t_start: float) -> dict[str, Any]:
    cfg = run.cfg
    t0 = time.perf_counter()
    meta = run.meta_pruned()
    save_checkpoint(run.out / "model.pt", run.model, meta)
    _save_program(run)
    exp = export_onnx(run.model, run.data.input_shape, run.out / "model.onnx", batch=run.target.batch,
                      parity_inputs=_parity_inputs(run), model_spec=run.spec, mean=run.data.mean, std=run.data.std,
                      class_names=run.data.classes)
    run._add_seconds("export", time.perf_counter() - t0)
    meas, met, why, decided = _final_measure(run, budget)
    t0 = time.perf_counter()
    acc = run.metric(run.model)
    run._add_seconds("evaluate", time.perf_counter() - t0)
    final = _model_figures(run, run.model, acc, meas["candidate"])
    deployed = run.deployed(run.model, acc)
    if deployed is not None:  # the artefact that ships, beside the fp32 ONNX it came from
        art = run.out / f"model.{run.target.precision}.onnx"
        atomic_write(art, lambda p: p.write_bytes(deployed[0]))
        final["deployed"] = {**deployed[1], "path": str(art)}
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
        "metric": {"name": run.parts.metric, "higher_is_better": True,
                   "source": run.parts.metric_source or ("evaluate callback" if run.parts.evaluate is not None
                                                         else "top-1 accuracy on the validation split")},
        "baseline": run.report["baseline"],
        "final": {**final, "baseline_same_session_ms": quiet_of(meas["baseline"]),
                  **({"verdict": decided.as_dict()} if decided is not None else {})},
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
        "distributed": {"world_size": run.world, "backend": distributed_backend()},
        "provenance": provenance(target=run.target.name, measure_threads=run.target.resolved_threads(),
                                 training_threads=torch.get_num_threads()),
    }
    write_json(run.out / "report.json", rep)
    run.checkpoint("done")
    try:
        from deploy_prune.report import write_reports

        write_reports(run.out)
    except ImportError:  # reports are optional extras; report.json is the truth
        pass
    if cfg.log:
        from deploy_prune.report.tracking import parse_trackers, record

        for line in record(parse_trackers(cfg.log), rep, run.out):
            run.say(f"recorded in {line}")
    return rep


def _parity_inputs(run: Run) -> torch.Tensor:
    """A few validation inputs for the ONNX parity check, or the API's example input."""
    n = min(8, len(run.data.val))  # type: ignore[arg-type]
    if n == 0 or run.parts.parity_input is not None:
        assert run.parts.parity_input is not None, "no validation data and no example input"
        return run.parts.parity_input
    return torch.stack([run.data.val[i][0] for i in range(n)])


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
