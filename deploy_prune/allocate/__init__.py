"""Turning a budget into per-group channel counts.

So far: ``uniform_for_flops``, one keep share for every group, solved so the predicted FLOPs
meet the budget. Latency-knapsack (DeepLSP) and differentiable (DF) allocators follow.
"""

from __future__ import annotations

from deploy_prune.errors import BudgetUnreachable, UserError
from deploy_prune.graph import ModelGraph


def uniform_plan(graph: ModelGraph, keep_share: float) -> dict[str, int]:
    return {g.name: max(1, round(g.channels * keep_share)) for g in graph.groups()}


def uniform_for_flops(graph: ModelGraph, flops_ratio: float, tol: float = 1e-3) -> tuple[dict[str, int], float]:
    """The largest uniform keep share whose predicted FLOPs are <= ``flops_ratio`` x today's.

    Bisection on the share (FLOPs fall monotonically with it, in steps because channel
    counts are whole and rounded to the target's multiple). Returns (plan, share).
    """
    if not 0.0 < flops_ratio <= 1.0:
        raise UserError(f"--flops-ratio must be in (0, 1], got {flops_ratio}")
    flops0, _ = graph.flops_params()
    budget = flops_ratio * flops0
    floor_plan = uniform_plan(graph, 0.0)
    if graph.predict_flops(floor_plan) > budget:
        reach = graph.predict_flops(floor_plan) / flops0
        raise BudgetUnreachable(f"FLOPs ratio {flops_ratio} is below the reachable minimum {reach:.3f} (one channel per group)")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if graph.predict_flops(uniform_plan(graph, mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return uniform_plan(graph, lo), lo
