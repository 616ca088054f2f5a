"""The measured closed loop: a budget in the cost model's units, plans corrected by what the
target measures, verification after pruning, and the fall-back on measurement alone when the
latency table and the target disagree (``measured_search``)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from deploy_prune.allocate import CostModel, channels_cost, cheapest_plan, flops_cost, latency_cost, params_cost
from deploy_prune.errors import BudgetUnreachable, UserError
from deploy_prune.graph import ModelGraph
from deploy_prune.latency.timing import quiet_estimate, quiet_of
from deploy_prune.measured_search import Point, line_search
from deploy_prune.methods import Method
from deploy_prune.pipeline.config import CompressConfig
from deploy_prune.pipeline.run import Run, record_step
from deploy_prune.transforms import (
    group_widths,
    prune_to_widths,
    sparsity,
)
from deploy_prune.widths import WidthSpace


def cost_model(run: Run) -> CostModel:
    """What the budget is counted in: the latency table's predicted ms for a latency budget,
    else MACs, parameters or channels (a sparsity budget reports FLOPs per step)."""
    kind = run.cfg.budget_kind()[0]
    if kind in ("latency_ms", "latency_ratio"):
        return latency_cost(run.profile or {})
    return {"params_ratio": params_cost, "keep_ratio": channels_cost}.get(kind, flops_cost)()


def _budget(run: Run) -> dict[str, Any]:
    """The user's budget, and the same budget in the cost model's units (computed once, at the
    start of a run; a resumed run reads it from its checkpoint)."""
    kind, value = run.cfg.budget_kind()
    base = run.report["baseline"]
    graph = run.graph
    run.cost = cost_model(run)
    if kind in ("latency_ms", "latency_ratio"):
        base_ms = quiet_of(base["latency_ms"])
        ms = value if kind == "latency_ms" else value * base_ms
        if ms >= base_ms:
            raise UserError(f"the budget {ms:.3f} ms is not below the unpruned model's measured {base_ms:.3f} ms on "
                            f"{run.target.name}: nothing to do")
        # Predicted ms for the budget: scale by the model's own predicted/measured ratio.
        predicted = ms * run.cost.total(graph, group_widths(graph)) / base_ms
        return {"kind": kind, "value": value, "latency_ms": ms, "cost_budget": predicted, "measured": True}
    if kind == "sparsity":  # unstructured: the budget is on weights
        return {"kind": kind, "value": value, "latency_ms": None, "cost_budget": value, "measured": False}
    full = run.cost.total(graph, group_widths(graph))
    return {"kind": kind, "value": value, "latency_ms": None, "cost_budget": value * full, "measured": False}


def _over(run: Run, meas: dict[str, Any], budget: dict[str, Any]) -> float:
    """Measured latency / budget (> 1: over), as ``_pooled_over`` computes it for one measurement."""
    return _pooled_over([meas], budget)[0]


def _measure_widths(run: Run, model: Any, widths: dict[str, int]) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` cut to ``widths`` and its measurement (latency does not depend on the
    weights, so the copy needs no training)."""
    cand = copy.deepcopy(model)
    prune_to_widths(cand, run.data.input_shape, widths, run.cfg.ignore)
    return cand, run.measure(cand)


def _keeps(widths: dict[str, int], space: WidthSpace) -> dict[str, list[int]]:
    """Every allowed width of every group."""
    return {g: space.keeps(c) for g, c in widths.items()}


def _cheapest(run: Run, widths: dict[str, int], aligned: bool = False) -> dict[str, int]:
    """The allowed widths the run's cost model prices lowest, for groups whose full widths are
    ``widths`` (``allocate.cheapest_plan``, priced on the current graph); ``aligned``: the
    narrow widths below the channel multiple left out."""
    return cheapest_plan(run.graph, run.cost, widths, floor=run.graph.space.multiple if aligned else 1)


def _fastest_floor(run: Run, model: nn.Module, widths: dict[str, int], budget: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any], bool]:
    """The fastest *measured* of the floors ``model`` (full widths ``widths``) can be pruned to:
    the cheapest plan the table prices, every group at its narrowest allowed width, and every
    group at the channel multiple. A table can misprice exactly these extremes (OpenVINO's
    one-layer entries rank MobileNetV2's variants at Spearman -0.48; its cheapest plan there
    measured 0.43-0.60 of the baseline), so only measurements decide which floor is lowest.
    Returns its widths, its measurement and whether it has no narrow widths."""
    channels = channels_cost()
    plans = [(_cheapest(run, widths), False),
             (cheapest_plan(run.graph, channels, widths), False),
             (cheapest_plan(run.graph, channels, widths, floor=run.graph.space.multiple), True)]
    best: tuple[dict[str, int], dict[str, Any], bool] | None = None
    seen: list[dict[str, int]] = []
    for plan, aligned in plans:
        if plan in seen:
            continue
        seen.append(plan)
        meas = _measure_widths(run, model, plan)[1]
        if best is None or _pooled_over([meas], budget)[0] < _pooled_over([best[1]], budget)[0]:
            best = (plan, meas, aligned)
    assert best is not None
    return best


def _floor_or_unreachable(run: Run, budget: dict[str, Any]) -> float:
    """The planner put the corrected budget below the cheapest allowed widths' predicted cost.
    Only a measurement decides whether that is so: the floors are measured
    (``_fastest_floor``), and if the fastest is over the budget it is unreachable (exit 3,
    giving the lowest latency reachable); if not, the prediction (or a noisy round) was wrong,
    and that floor's predicted cost is returned to plan at. The measurement is kept
    (``state["narrowest"]``): it is the one architecture known to meet the budget when the
    table misleads (``measured_search``)."""
    if "narrowest" in run.state:  # measured once per run: the loop can hit the floor again and again
        n = run.state["narrowest"]
        plan, meas, aligned = n["widths"], n["meas"], n.get("aligned", False)
    else:
        plan, meas, aligned = _fastest_floor(run, run.teacher, run.baseline_widths, budget)
    r, fig = _pooled_over([meas], budget)
    low = quiet_of(meas["candidate"])
    if r > 1.0:
        got = f"{low:.3f} ms ({fig:.3f} of the baseline timed with it)" if budget["kind"] == "latency_ratio" else f"{low:.3f} ms"
        want = f"ratio {budget['value']:.3f} of the baseline" if budget["kind"] == "latency_ratio" else f"{budget['latency_ms']:.3f} ms"
        raise BudgetUnreachable(f"the budget ({want}) cannot be met on {run.target.name}: even the cheapest allowed "
                                f"widths measure {got}, the lowest reachable; raise the budget")
    run.state["narrowest"] = {"widths": plan, "r": r, "meas": meas, "aligned": aligned}
    which = "every group at the channel multiple" if aligned else "narrow widths allowed"
    run.say(f"the LUT puts the budget below the cheapest widths, but the fastest floor measured ({which}) is "
            f"{100 * r:.0f} % of it: planning from it")
    # The floor is priced on the current graph, whose groups can differ from the baseline's
    # measured above (a factorised layer's rank group): as allocate prices its cheapest plan.
    return run.cost.total(run.graph, _cheapest(run, group_widths(run.graph), aligned)) * (1 + 1e-9)


def _search_measured(run: Run, budget: dict[str, Any], under: Point, over: Point, stage: str) -> Point:
    """``measured_search.line_search`` between two measured architectures of the current model,
    each candidate measured as a pruned copy (latency does not depend on weight values) and
    recorded as a step of ``stage``."""
    def measure(widths: dict[str, int]) -> Point:
        cand, meas = _measure_widths(run, run.model, widths)
        r = _pooled_over([meas], budget)[0]
        record_step(run, stage, cand, candidate=True, measured_latency_ms=meas["candidate"], search="measured",
                    baseline_same_session_ms=quiet_of(meas["baseline"]), cost_budget=None, accuracy=None)
        run.say(f"{stage} (measured search): {quiet_of(meas['candidate']):.3f} ms ({100 * r:.0f} % of the budget)")
        return Point(widths, r)

    keeps = _keeps(group_widths(run.graph), run.graph.space)
    # Groups that add the fewest MACs when widened move first along the line: FLOPs, unlike the
    # table the search is working around, cannot call a wide layer cheap.
    macs = flops_cost()
    base = macs.total(run.graph, under.widths)
    order = sorted(under.widths, key=lambda g: macs.total(run.graph, {**under.widths, g: over.widths.get(g, under.widths[g])}) - base)
    best, _ = line_search(under, over, measure, _window(run.cfg), keeps, run.cfg.max_loops, order)
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
    coarse channel steps make them) pools its measurements and ends the corrections, and so does
    ``max_loops``. A plan that lands is pinned: the structured steps walk to its widths.
    Otherwise measurement alone decides: a ``measured_search`` between the architecture
    measured under the budget (the plans, the cheapest widths when they were measured) that
    keeps the most MACs and the unpruned model, whose widths the steps then prune
    to (``_pin``). Only when nothing measured is under the budget is the fastest plan
    measured taken; never a correction that was not measured."""
    pred = budget["cost_budget"]
    low, high, aim = _window(run.cfg)
    seen: dict[tuple[tuple[str, int], ...], dict[str, Any]] = {}
    for i in range(run.cfg.max_loops):
        try:
            plan = method.plan(run, pred)
        except BudgetUnreachable:
            pred = _floor_or_unreachable(run, budget)
            plan = method.plan(run, pred)
        key = tuple(sorted(plan.items()))
        cand, meas = _measure_widths(run, run.model, plan)
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
            # The steps prune to this measured architecture, not to a re-plan at the same
            # budget: a plan made on a part-pruned model (importance re-scored on what is
            # left) can land far under the budget, and nothing re-grows pruned channels.
            run.state["pinned"] = {"widths": dict(plan), "r": r, "stage": "plan"}
            return float(pred)
        if again:
            break
        pred *= aim / r
    points = [Point(dict(k), v["r"], {"pred": v["pred"]}) for k, v in seen.items()]
    if "narrowest" in run.state:
        points.append(Point(dict(run.state["narrowest"]["widths"]), run.state["narrowest"]["r"]))
    under = [p for p in points if p.r <= high]
    if under:
        # Corrections of the table's budget did not land: the table's prices, or its channel
        # steps, do not match the target. Measurement alone decides, on the line from the
        # architecture measured under the budget that keeps the most MACs to the unpruned model
        # (measured over it), and the steps then prune to those widths. Along that line every
        # group widens in proportion to what it lost, as a uniform pruner's would; a line to a
        # plan the table chose over the budget would keep the lopsided widths of a table that,
        # here, is known to misprice them.
        base = run.report["baseline"]["latency_ms"]
        macs = flops_cost()
        a = max(under, key=lambda p: (macs.total(run.graph, p.widths), p.r))
        b = Point(dict(run.baseline_widths), _pooled_over([{"candidate": base, "baseline": base}], budget)[0])
        run.say(f"plan: no plan the LUT priced lands in {100 * low:.0f}-{100 * high:.0f} % of the budget (measured "
                f"{', '.join(f'{100 * p.r:.0f} %' for p in points)}); searching between the one under it that keeps "
                f"the most MACs ({100 * a.r:.0f} %) and the unpruned model ({100 * b.r:.0f} %) on measured latency alone")
        best = _search_measured(run, budget, a, b, "plan")
        return _pin(run, best, "plan")
    best = min(points, key=lambda p: p.r)  # nothing measured is under the budget: the fastest
    run.say(f"plan: no architecture lands in {100 * low:.0f}-{100 * high:.0f} % of the budget; taking the best "
            f"measured ({100 * best.r:.0f} %)")
    return float(best.info["pred"]) if "pred" in best.info else _pin(run, best, "plan")


def _pin(run: Run, best: Point, stage: str) -> float:
    """From here on the structured steps and the verification prune to ``best``'s measured widths
    instead of re-planning on the table; returns their predicted cost (for the record)."""
    run.state["pinned"] = {"widths": dict(best.widths), "r": best.r, "stage": stage}
    low, high, _ = _window(run.cfg)
    run.report["notes"].append(f"no widths the latency table priced landed within {100 * low:.0f}-"
                               f"{100 * high:.0f} % of the budget; the {stage} stage chose widths on "
                               f"measured latency alone (measured {100 * best.r:.0f} % of the budget)")
    return float(run.cost.total(run.graph, best.widths))


def _verify(run: Run, method: Method, budget: dict[str, Any]) -> None:
    """Measure the pruned architecture; while over ``1 - margin`` of the budget, tighten the
    predicted budget by the measured/predicted ratio and prune further. When the widths were
    chosen on measurement (``_pin``), or a tightening leaves them where they were (the table
    calls the cuts free), the next widths come from a measured search between the cheapest
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
        high = _window(run.cfg)[1]
        if high < r <= 1.0:
            # Under the budget but inside the margin: one reading there is as likely noise as a
            # real overshoot, and pruning further on it costs accuracy for nothing (the search
            # below can only step to the next coarse width). Pool a second measurement first.
            r = _pooled_over([meas, run.measure(run.model)], budget)[0]
            run.say(f"verify {i + 1}: inside the margin; re-measured, pooled {100 * r:.0f} % of the budget")
        # The plan loop's margin, not the budget itself: the final check re-measures, and the
        # steps' re-planning on fine-tuned weights may have moved the architecture off the plan.
        if r <= high:
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
                run.state["cost_budget"] = _floor_or_unreachable(run, budget)
                method.prune(run, run.state["cost_budget"])
        if run.state.get("pinned") or group_widths(run.graph) == before:
            why = ("the widths were chosen on measurement" if run.state.get("pinned")
                   else "the LUT's tightening leaves the widths as they are")
            run.say(f"verify {i + 1}: {why}; searching between the cheapest widths and these on measured latency")
            _prune_to(run, method, _verified_widths(run, budget, Point(before, r), stage).widths)
        run.recalibrate()
        run.state["loop_accuracy"] = run.finetune(run.cfg.step_fraction, stage)
        run.checkpoint(stage)
    run.report["notes"].append(f"the closed loop stopped after {run.cfg.max_loops} tightenings still over budget")


def _verified_widths(run: Run, budget: dict[str, Any], over: Point, stage: str) -> Point:
    """Widths under the budget for the current model, chosen on measurement: a search between its
    cheapest widths (measured here; over the budget: unreachable, exit 3) and ``over``."""
    floor, meas, _ = _fastest_floor(run, run.model, group_widths(run.graph), budget)
    r = _pooled_over([meas], budget)[0]
    if r > _window(run.cfg)[1]:
        raise BudgetUnreachable(f"the budget cannot be met on {run.target.name}: even the cheapest allowed widths "
                                f"measure {100 * r:.0f} % of it; raise the budget")
    best = _search_measured(run, budget, Point(floor, r), over, stage)
    _pin(run, best, stage)
    return best


def _prune_to(run: Run, method: Method, widths: dict[str, int]) -> None:
    """Prune the current model to ``widths`` (never wider than it is), the lowest-scoring channels
    by the method's criterion (L1 for a method without one) going first."""
    cut(run.model, run.graph, widths, getattr(method, "criterion", "l1"), run.score_batches(), run.cfg.seed)


def cut(model: nn.Module, graph: ModelGraph, widths: dict[str, int], criterion: str, batches: list[Any], seed: int) -> None:
    """Cut ``model`` (whose dependency graph is ``graph``) in place to ``widths``: groups already
    at or under their width stay; in the others the channels ``criterion`` scores lowest on the
    model's own weights go first."""
    current = group_widths(graph)
    widths = {g: k for g, k in widths.items() if g in current and k < current[g]}
    if not widths:
        return
    from deploy_prune.importance import score_groups

    graph.prune_by_scores(widths, score_groups(model, graph, criterion, batches, seed=seed))


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


@dataclass(frozen=True)
class PooledVerdict:
    """What a measured budget's verdict was decided on (``_pooled_over`` over the final
    measurements), kept in ``report.json`` as ``final.verdict`` so the gate can recompute it:
    ``pooled`` (the quiet estimate over every round of both measurements: ms, or for a ratio
    budget the candidate's over the baseline's), the ``limit`` it was compared with
    (``budget.latency_ms``, or ``budget.value`` for a ratio budget), and the round medians it
    was computed from, one list per measurement (the baseline's for a ratio budget only)."""

    pooled: float
    limit: float
    candidate_round_medians: list[list[float]]
    baseline_round_medians: list[list[float]] | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _final_measure(run: Run, budget: dict[str, Any]) -> tuple[dict[str, Any], bool, str, PooledVerdict | None]:
    """Measure the exported model twice; the budget is met when the pooled figure is within it.
    Returns the second measurement, the verdict, its words and (measured budgets) what it was
    decided on."""
    meas = run.measure(run.model)
    if budget["kind"] == "sparsity":
        got = sparsity(run.model, run.cfg.ignore)
        met = got >= budget["value"] - 1e-3  # the last iteration rounds counts down, never past the target
        return meas, met, f"sparsity {got:.4f} {'>=' if met else '<'} target {budget['value']:.4f} (conv/linear weights)", None
    if not budget["measured"]:
        got = run.cost.total(run.graph, group_widths(run.graph))
        met = got <= budget["cost_budget"] * (1 + 1e-9)
        return (meas, met, f"{run.cost.kind} {got:.4g} {'<=' if met else '>'} budget {budget['cost_budget']:.4g} {run.cost.unit}",
                None)
    again = run.measure(run.model)
    r, fig = _pooled_over([meas, again], budget)
    ratio = budget["kind"] == "latency_ratio"
    decided = PooledVerdict(
        pooled=fig, limit=budget["value"] if ratio else budget["latency_ms"],
        candidate_round_medians=[list(m["candidate"]["round_medians"]) for m in (meas, again)],
        baseline_round_medians=[list(m["baseline"]["round_medians"]) for m in (meas, again)] if ratio else None)
    ms = (f"measured {quiet_of(meas['candidate']):.3f} ms, re-measured {quiet_of(again['candidate']):.3f} ms "
          f"(quiet rounds; overall medians {meas['candidate']['median']:.3f} and {again['candidate']['median']:.3f} ms)")
    if ratio:
        verdict = f"{ms}; pooled ratio to the baseline {fig:.3f} {'<=' if r <= 1 else '>'} budget {budget['value']:.3f}"
    else:
        verdict = f"{ms}; pooled {fig:.3f} ms {'<=' if r <= 1 else '>'} budget {budget['latency_ms']:.3f} ms"
    if r > 1.0:
        verdict += f" ({100 * r:.0f} % of it): the model is returned anyway, NOT meeting the budget"
    return again, r <= 1.0, verdict, decided
