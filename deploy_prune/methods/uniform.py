"""Uniform L1 channel pruning: the baseline every latency-aware method must beat.

The same keep share in every group, channels ranked by torch-pruning's group L1 magnitude
importance (what its ``MagnitudePruner`` uses), snapped to the target's width space. The
share is the largest whose cost meets the budget, so uniform pruning reaches the same
*measured* latency as any other method through the same closed loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deploy_prune.allocate import cheapest_plan
from deploy_prune.errors import BudgetUnreachable
from deploy_prune.importance import CRITERIA, score_groups
from deploy_prune.methods import BUDGET_KINDS, METHODS
from deploy_prune.transforms import Masks

if TYPE_CHECKING:
    from deploy_prune.methods.context import MethodContext


@METHODS.register("uniform", "one keep share in every group, L1 magnitude ranking (torch-pruning's MagnitudePruner)")
class Uniform:
    name = "uniform"
    kind = "structured"
    lowers_latency = True
    default_steps = 1
    budget_kinds = BUDGET_KINDS

    def __init__(self, criterion: str = "l1") -> None:
        CRITERIA.get(criterion)  # an unknown name fails before anything is measured
        self.criterion = criterion

    def settings(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "allocation": "uniform share, bisection on the budget"}

    def setup(self, run: MethodContext) -> None:
        pass

    @staticmethod
    def _share_plan(run: MethodContext, share: float, floor: dict[str, int]) -> dict[str, int]:
        """Every group at ``share`` of its channels, snapped to the width space, and never under
        its cheapest width (``floor``): a narrow width the table prices above the block is both
        slower and less accurate."""
        return {g.name: max(run.graph.space.snap(g.channels * share, g.channels), floor[g.name]) for g in run.graph.groups()}

    def plan(self, run: MethodContext, budget: float) -> dict[str, int]:
        graph, cost = run.graph, run.cost
        floor = cheapest_plan(graph, cost)
        lo_plan = self._share_plan(run, 0.0, floor)
        if cost.total(graph, lo_plan) > budget:
            raise BudgetUnreachable(f"the cheapest uniform widths cost {cost.total(graph, lo_plan):.4g} {cost.unit}, "
                                    f"over the budget {budget:.4g} {cost.unit}")
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            if cost.total(graph, self._share_plan(run, mid, floor)) <= budget:
                lo = mid
            else:
                hi = mid
        return self._share_plan(run, lo, floor)

    def prune(self, run: MethodContext, budget: float) -> None:
        plan = self.plan(run, budget)
        scores = score_groups(run.model, run.graph, self.criterion, run.score_batches(), seed=run.seed)
        run.graph.prune_by_scores(plan, scores)

    def masks(self, run: MethodContext) -> Masks:
        return {}


@METHODS.register("l1-structured", "L1-norm channel pruning, one fixed share per layer (Pruning Pathways' L1StructuredPruning)")
class L1Structured(Uniform):
    """The seed's L1StructuredPruning is uniform pruning by L1 norm: the same engine, its own name."""

    name = "l1-structured"
