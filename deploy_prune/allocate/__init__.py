"""Turning a budget into per-group channel counts.

- ``uniform_for_flops``: one keep share for every group, solved so the FLOPs meet the budget.
- ``allocate``: the latency knapsack of DeepLSP (and HALP-style hardware-aware pruning): per
  group, pick one channel count among the target's allowed widths so that the retained value
  is largest while the cost of the plan stays within the budget.

Costs come from a ``CostModel``: predicted latency from the target's LUT, FLOPs, parameters or
channels. Each one prices a single conv/linear layer at (cin, cout) channels; a plan's total
is the sum over layers (for latency, plus the LUT's weight-streaming term, which depends on all
the plan's weights at once, then the LUT's calibration ``a * sum + b``).

A layer's cost depends on two groups at once (its input channels belong to one, its outputs
to another), so the knapsack is not separable. As hardware-aware pruning does, each group is
priced with every other group held at its current width (first order), the multiple-choice
knapsack is solved exactly by dynamic programming on that, and an outer bisection on the
knapsack's capacity makes the *exact* cost of the chosen plan (every layer at its planned
widths) meet the budget. DeepLSP takes a few such steps with fine-tuning between them, so each
step's first-order error stays small.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deploy_prune.errors import BudgetUnreachable, UserError
from deploy_prune.graph import LayerInfo, ModelGraph
from deploy_prune.widths import WidthSpace


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


# ---------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------
def _depthwise(li: LayerInfo) -> bool:
    return li.groups > 1 and li.groups == li.in_channels == li.out_channels


def plan_widths(graph: ModelGraph, plan: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """(cin, cout) of every conv/linear layer once each group keeps ``plan[group]`` channels
    (``ModelGraph.layer_widths``)."""
    return graph.layer_widths(plan)


@dataclass
class CostModel:
    """Prices a layer at (cin, cout); ``a * (sum + plan_term) + b`` is the plan's total (``unit``
    names it). ``plan_term``, when set, prices what no single layer owns: the LUT's
    weight-streaming term, a function of every layer's widths at once."""

    kind: str  # latency | flops | params | channels
    layer_cost: Callable[[LayerInfo, int, int], float]
    unit: str
    a: float = 1.0
    b: float = 0.0
    plan_term: Callable[[ModelGraph, Mapping[str, tuple[int, int]]], float] | None = None

    def total(self, graph: ModelGraph, plan: Mapping[str, int]) -> float:
        if self.kind == "channels":
            return float(sum(plan.get(g.name, g.channels) for g in graph.groups()))
        widths = plan_widths(graph, plan)
        s = sum(self.layer_cost(graph.layers[n], ci, co) for n, (ci, co) in widths.items())
        return self.a * (s + (self.plan_term(graph, widths) if self.plan_term else 0.0)) + self.b


def layer_weights(li: LayerInfo, cin: int, cout: int) -> int:
    """Weights of a conv/linear layer at (cin, cout) (no bias, as ``lut.weight_bytes`` counts)."""
    kh, kw = li.kernel
    per_out = 1 if _depthwise(li) else cin // max(1, li.groups)
    return cout * per_out * kh * kw


def latency_cost(profile: Mapping) -> CostModel:
    """Predicted latency (ms) priced by the profile's ``LatencyTable``: its layer costs, its
    weight-streaming term and its calibration, so a plan's total is what ``lut.predict`` gives
    the pruned model."""
    from deploy_prune.latency.lut import LatencyTable

    table = LatencyTable(profile)
    a, b = table.calibration
    ws = profile.get("weight_stream") or {}
    term = None
    if ws.get("ms_per_mb"):
        bpw = int(ws.get("bytes_per_weight", 4))

        def term(graph: ModelGraph, widths: Mapping[str, tuple[int, int]]) -> float:
            return table.stream_cost(bpw * sum(layer_weights(graph.layers[n], ci, co) for n, (ci, co) in widths.items()))
    return CostModel("latency", lambda li, ci, co: table.layer_cost(li.name, ci, co), "ms", a, b, term)


def _scaled(attr: str) -> Callable[[LayerInfo, int, int], float]:
    def cost(li: LayerInfo, ci: int, co: int) -> float:
        full = getattr(li, attr)
        if _depthwise(li):
            return full * co / li.out_channels
        return full * (ci / li.in_channels) * (co / li.out_channels)
    return cost


def flops_cost() -> CostModel:
    return CostModel("flops", _scaled("flops"), "MACs")


def params_cost() -> CostModel:
    return CostModel("params", _scaled("params"), "params")


def channels_cost() -> CostModel:
    return CostModel("channels", lambda li, ci, co: 0.0, "channels")


# ---------------------------------------------------------------------------------------------
# The knapsack
# ---------------------------------------------------------------------------------------------
def allowed_keeps(channels: int, multiple: int, floor: int = 1, narrow: Sequence[int] = ()) -> list[int]:
    """Every width a group may keep: multiples of the target's channel multiple (at least
    ``floor``), the full width and the ``narrow`` widths below the multiple (``widths``)."""
    return WidthSpace(multiple, tuple(narrow)).keeps(channels, floor)


def cheapest_plan(graph: ModelGraph, cost: CostModel, widths: Mapping[str, int] | None = None, floor: int = 1) -> dict[str, int]:
    """Every group at the allowed width ``cost`` prices lowest, each priced with the others at
    their narrowest (first order; a tie goes to the narrower: a table that prices widths alike,
    as a flat or coarse one does, should not lift the floor, which measurement checks anyway).
    Under FLOPs, parameters or channels
    that is the narrowest width; under a latency table it need not be: a narrow, unaligned width
    can measure slower than the block above it (ONNX Runtime's int8 convs: 8 output channels
    slower than 16), and then the floor of what pruning can reach is the block.
    ``widths`` (default: the graph's) are the groups' full widths; ``floor`` as ``allocate``'s.

    First order can mislead: each group is priced with its neighbours at their narrowest, and
    they may not stay there. Of the first-order plans with and without the narrow widths and the
    narrowest plan itself, the one whose exact cost is lowest is returned, so the floor with the
    narrow widths allowed never costs more than the aligned floor (the closed loop plans at the
    latter's price when measurement puts the budget there)."""
    full = widths if widths is not None else {g.name: g.channels for g in graph.groups()}
    keeps = {n: graph.space.keeps(c, floor) for n, c in full.items()}
    narrowest = {n: ks[0] for n, ks in keeps.items()}
    if cost.kind == "channels":
        return narrowest
    names = {g.name for g in graph.groups()}
    candidates = [_first_order_cheapest(graph, cost, keeps, names), narrowest]
    if graph.space.multiple > floor:
        aligned = {n: graph.space.keeps(c, graph.space.multiple) for n, c in full.items()}
        candidates.append(_first_order_cheapest(graph, cost, aligned, names))
    return min(candidates, key=lambda p: cost.total(graph, p))  # the first of equals: first order's


def _first_order_cheapest(graph: ModelGraph, cost: CostModel, keeps: Mapping[str, Sequence[int]],
                          names: set[str]) -> dict[str, int]:
    """Every group at its cheapest keep, priced with the others at their narrowest."""
    narrowest = {n: ks[0] for n, ks in keeps.items()}
    out = {}
    for n, ks in keeps.items():
        if n not in names or len(ks) == 1:
            out[n] = ks[0]
            continue
        c = group_costs(graph, cost, narrowest, n, ks)
        out[n] = ks[min(range(len(ks)), key=lambda j: (c[j], ks[j]))]
    return out


def group_costs(graph: ModelGraph, cost: CostModel, plan: Mapping[str, int], name: str, keeps: Sequence[int]) -> list[float]:
    """Cost of the layers group ``name`` touches at each keep, every other group as in ``plan``."""
    g = next(x for x in graph.groups() if x.name == name)
    touched = set(g.out_layers) | set(g.in_layers)
    if cost.kind == "channels":
        return [float(k) for k in keeps]
    # the plan-wide term, first order as the layers: its change with this group alone moving
    at_plan = cost.plan_term(graph, plan_widths(graph, plan)) if cost.plan_term else 0.0
    out = []
    for k in keeps:
        widths = plan_widths(graph, {**plan, name: k})
        layers = sum(cost.layer_cost(graph.layers[n], *widths[n]) for n in touched if n in widths)
        out.append(cost.a * (layers + (cost.plan_term(graph, widths) - at_plan if cost.plan_term else 0.0)))
    return out


def solve_mckp(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], capacity: float,
               resolution: int = 4000) -> list[int] | None:
    """Multiple-choice knapsack: one option per item, maximise the value, total cost <= capacity.

    Exact dynamic programming over costs discretised to ``capacity / resolution`` (rounded up,
    so a returned choice never exceeds the capacity). Returns the chosen option per item, or
    None when even the cheapest options do not fit.
    """
    base = sum(min(c) for c in costs)
    room = capacity - base
    if room < -1e-12:
        return None
    unit = room / resolution if room > 0 else 1.0
    R = resolution if room > 0 else 0
    dp = np.zeros(R + 1)
    choice = []
    for val, cst in zip(values, costs, strict=True):
        cmin = min(cst)
        units = [math.ceil((c - cmin) / unit - 1e-9) if room > 0 else (0 if c - cmin <= 1e-12 else R + 1) for c in cst]
        new = np.full(R + 1, -np.inf)
        arg = np.full(R + 1, -1, dtype=np.int64)
        for j, (v, u) in enumerate(zip(val, units, strict=True)):
            if u > R:
                continue
            cand = np.full(R + 1, -np.inf)
            cand[u:] = dp[: R + 1 - u] + v
            better = cand > new
            new[better], arg[better] = cand[better], j
        dp = new
        choice.append(arg)
    r = int(np.argmax(dp))
    if not np.isfinite(dp[r]):
        return None
    picks = []
    for i in range(len(values) - 1, -1, -1):
        j = int(choice[i][r])
        picks.append(j)
        cmin = min(costs[i])
        r -= math.ceil((costs[i][j] - cmin) / unit - 1e-9) if room > 0 else 0
    return picks[::-1]


def allocate(
    graph: ModelGraph,
    value: Callable[[str, int], float],
    cost: CostModel,
    budget: float,
    *,
    floor: int = 1,
    iters: int = 30,
) -> tuple[dict[str, int], float]:
    """Channel counts per group that maximise ``sum value(group, keep)`` with the plan's exact
    cost <= ``budget``. Returns (plan, exact cost). Raises ``BudgetUnreachable`` when the
    narrowest allowed widths already cost more than the budget.
    """
    groups = graph.groups()
    current = {g.name: g.channels for g in groups}
    full_cost = cost.total(graph, current)
    if full_cost <= budget:
        return current, full_cost
    keeps = {g.name: graph.space.keeps(g.channels, floor) for g in groups}
    narrow = cheapest_plan(graph, cost, floor=floor)
    min_cost = cost.total(graph, narrow)
    if min_cost > budget:
        raise BudgetUnreachable(f"the cheapest allowed widths cost {min_cost:.4g} {cost.unit}, over the budget "
                                f"{budget:.4g} {cost.unit}; the lowest reachable is {min_cost:.4g} {cost.unit}")
    names = [g.name for g in groups]
    vals = [[value(n, k) for k in keeps[n]] for n in names]
    csts = [group_costs(graph, cost, current, n, keeps[n]) for n in names]
    # First-order capacity: the budget minus what no group's choice changes.
    fixed = full_cost - sum(c[-1] for c in csts)

    def solve(cap: float) -> tuple[dict[str, int], float] | None:
        picks = solve_mckp(vals, csts, cap - fixed)
        if picks is None:
            return None
        plan = {n: keeps[n][j] for n, j in zip(names, picks, strict=True)}
        return plan, cost.total(graph, plan)

    def worth(plan: Mapping[str, int]) -> float:
        return sum(value(n, k) for n, k in plan.items())

    # Bisection on the capacity between one that fits exactly (lo) and one that does not (hi).
    best = (narrow, min_cost)
    lo, hi = fixed + sum(min(c) for c in csts), full_cost
    first = solve(budget)
    if first is not None and first[1] <= budget:
        best, lo = first, budget
    else:
        hi = budget  # first order was optimistic: shrink the capacity
    for _ in range(iters):
        if hi - lo <= 1e-4 * abs(budget):
            break
        mid = (lo + hi) / 2
        got = solve(mid)
        if got is not None and got[1] <= budget:
            if worth(got[0]) >= worth(best[0]):
                best = got
            lo = mid
        else:
            hi = mid
    return best


def weighted_retained_value(scores: Mapping[str, np.ndarray | Sequence[float]],
                            weights: Mapping[str, float]) -> Callable[[str, int], float]:
    """DeepLSP's value of keeping ``k`` channels of a group: ``-w * (1 - R(k))``, the group's
    sensitivity weight ``w`` times the share of its importance lost, where ``R(k)`` is the share
    of the group's total score held by its ``k`` best channels."""
    shares: dict[str, np.ndarray] = {}
    for n, s in scores.items():
        a = np.sort(np.clip(np.asarray(s, dtype=np.float64), 0, None))[::-1]
        tot = a.sum()
        shares[n] = np.concatenate([[0.0], np.cumsum(a) / tot]) if tot > 0 else np.linspace(0, 1, len(a) + 1)

    def value(name: str, k: int) -> float:
        return -weights.get(name, 1.0) * max(0.0, 1.0 - float(shares[name][k]))

    return value
