"""The closed loop as a few calls, for a user who runs their own training between them.

``compress`` plans, prunes, fine-tunes and verifies in one go. ``Planner`` hands the same stages
out one by one: it measures the baseline and builds the budget as ``compress`` does (stages 1-3),
``plan()`` runs the measured closed loop on the plan (stage 4: architectures are measured on the
target as pruned copies, which needs no training), ``apply()`` cuts a model to those widths, the
user trains it however they like, and ``check()`` measures the result against the budget, as
``compress``'s verification does. The decisions are the pipeline's own: the same seed plans the
same widths as ``compress``.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.graph import ModelGraph
from deploy_prune.latency.lut import LatencyTable
from deploy_prune.latency.timing import quiet_of
from deploy_prune.measured_search import between
from deploy_prune.pipeline.config import CompressConfig
from deploy_prune.pipeline.loop import _keeps, _plan_closed_loop, _pooled_over, cut
from deploy_prune.pipeline.run import UserParts
from deploy_prune.pipeline.stages import make_method, open_run, start
from deploy_prune.transforms import group_widths


def _listed(widths: list[int]) -> str:
    return ", ".join(map(str, widths)) if len(widths) <= 8 else f"{', '.join(map(str, widths[:6]))}, ..., {widths[-1]}"


@dataclass(frozen=True)
class Check:
    """A model measured against the budget (interleaved with the unpruned baseline)."""

    met: bool
    latency_ms: float  # the quiet figure (``latency.timing``)
    budget_ms: float | None  # None for budgets that are not latency
    share: float  # measured / budget (<= 1: met)
    measurement: dict[str, Any] = field(repr=False)  # candidate and baseline statistics as measured


class Planner:
    """Plan widths for a budget on the target, cut models to them, check them measured.

    >>> planner = Planner(cfg, parts)                 # doctest: +SKIP  (deploy_prune.planner builds it)
    >>> widths = planner.plan()                       # doctest: +SKIP
    >>> pruned = planner.apply(widths)                # doctest: +SKIP
    >>> my_training(pruned); planner.check(pruned)    # doctest: +SKIP
    """

    def __init__(self, cfg: CompressConfig, parts: UserParts, progress: Callable[[str], None] | None = None) -> None:
        self.method = make_method(cfg)
        if not getattr(self.method, "plans", True):
            raise UserError(f"--method {self.method.name} does not plan widths (it prunes in its own schedule); "
                            "use compress for it")
        self.run = open_run(cfg, progress, parts)
        start(self.run)
        self.method.setup(self.run)

    @property
    def budget(self) -> dict[str, Any]:
        """The budget as the pipeline holds it: kind, value, ``latency_ms``, ``cost_budget``."""
        return dict(self.run.state["budget"])

    @property
    def table(self) -> LatencyTable | None:
        """The target's latency table of the model (latency budgets only)."""
        return LatencyTable(self.run.profile) if self.run.profile is not None else None

    def plan(self) -> dict[str, int]:
        """Channels per group for the budget. For a latency budget this is the measured closed
        loop: planned architectures are measured on the target until one lands just under the
        budget (``compress``'s stage 4); other budgets are exact and are planned on their cost."""
        run, budget = self.run, self.run.state["budget"]
        run.state.pop("pinned", None)
        if budget["measured"]:
            run.state["cost_budget"] = _plan_closed_loop(run, self.method, budget)
        pinned = run.state.get("pinned")
        return dict(pinned["widths"]) if pinned else dict(self.method.plan(run, run.state["cost_budget"]))

    def schedule(self, widths: dict[str, int], steps: int) -> list[dict[str, int]]:
        """``steps`` widths from the unpruned model's to ``widths`` (the last is ``widths``), for
        pruning gradually with training between the cuts."""
        if steps < 1:
            raise UserError(f"steps must be at least 1, got {steps}")
        full = self.run.baseline_widths
        keeps = _keeps(full, self.run.target.width_space())
        return [dict(between(widths, full, 1 - i / steps, keeps)) for i in range(1, steps + 1)]

    def apply(self, widths: dict[str, int], model: nn.Module | None = None) -> nn.Module:
        """A copy of ``model`` (default: the unpruned model) cut to ``widths``; in each group the
        lowest-scoring channels under the method's criterion (L1 without one) go, scored on
        ``model``'s own weights. Groups already at or under their width are left as they are.

        Every width must be one the target allows for its group of the unpruned model (the
        multiples of the target's channel multiple, its narrow widths, the group's full width),
        as ``plan()`` and ``schedule()`` give; any other (< 1, over the group's channels, or
        between allowed widths) is refused, naming the group, never rounded."""
        m = copy.deepcopy(model if model is not None else self.run.teacher).cpu()
        run = self.run
        graph = ModelGraph(m, run.data.input_shape, run.cfg.ignore, run.target.width_space())
        current = group_widths(graph)
        unknown = sorted(set(widths) - set(current))
        if unknown:
            raise UserError(f"widths name groups this model does not have: {', '.join(unknown[:5])}; "
                            "pass widths from plan() or schedule()")
        for g, k in widths.items():
            self._check_width(g, k, run.baseline_widths.get(g, current[g]))
        cut(m, graph, {g: int(k) for g, k in widths.items()}, getattr(self.method, "criterion", "l1"),
            run.score_batches(), run.cfg.seed)
        return m

    def _check_width(self, group: str, width: object, full: int) -> None:
        if isinstance(width, bool) or not isinstance(width, numbers.Integral):
            raise UserError(f"width of group {group!r} must be a whole number of channels, got {width!r}")
        k = int(width)
        keeps = self.run.target.width_space().keeps(full)
        if not 1 <= k <= full:
            raise UserError(f"width {k} of group {group!r} is out of range: the group has {full} channels; give one of "
                            f"{_listed(keeps)}")
        if k not in keeps:
            near = [w for w in (max((w for w in keeps if w < k), default=None), min(w for w in keeps if w > k)) if w]
            raise UserError(f"width {k} of group {group!r} is not one target {self.run.target.name} allows (multiples of "
                            f"{self.run.target.channel_multiple}, its narrow widths, or all {full} channels); "
                            f"the nearest allowed: {' or '.join(map(str, near))}")

    def check(self, model: nn.Module) -> Check:
        """``model`` measured on the target against the budget; for budgets that are not
        latency, its cost in their units against the budget."""
        run, budget = self.run, self.run.state["budget"]
        meas = run.measure(model)
        if budget["measured"]:
            share, _ = _pooled_over([meas], budget)
            return Check(share <= 1.0, quiet_of(meas["candidate"]), budget["latency_ms"], share, meas)
        graph = ModelGraph(model, run.data.input_shape, run.cfg.ignore, run.target.width_space())
        share = run.cost.total(graph, group_widths(graph)) / budget["cost_budget"]
        return Check(share <= 1.0 + 1e-9, quiet_of(meas["candidate"]), None, share, meas)
