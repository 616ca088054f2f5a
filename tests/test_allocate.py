"""The knapsack allocator, cost models, masks and rebuilding pruned models."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from deploy_prune.allocate import (
    CostModel,
    allocate,
    allowed_keeps,
    channels_cost,
    cheapest_plan,
    flops_cost,
    plan_widths,
    solve_mckp,
    weighted_retained_value,
)
from deploy_prune.errors import BudgetUnreachable
from deploy_prune.graph import LayerInfo, ModelGraph
from deploy_prune.models import build_model
from deploy_prune.train import distillation_loss
from deploy_prune.transforms import apply_masks, magnitude_masks, prune_to_widths, sparsity
from deploy_prune.widths import WidthSpace, auto_narrow


def test_mckp_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_items, n_opts = 4, 3
        vals = rng.uniform(0, 1, (n_items, n_opts)).tolist()
        costs = rng.uniform(0, 1, (n_items, n_opts)).tolist()
        cap = float(rng.uniform(1.0, 2.5))
        best = -np.inf
        for combo in itertools.product(range(n_opts), repeat=n_items):
            c = sum(costs[i][j] for i, j in enumerate(combo))
            if c <= cap:
                best = max(best, sum(vals[i][j] for i, j in enumerate(combo)))
        picks = solve_mckp(vals, costs, cap, resolution=20000)
        if best == -np.inf:
            assert picks is None
            continue
        assert picks is not None
        assert sum(costs[i][j] for i, j in enumerate(picks)) <= cap + 1e-9
        # discretisation (costs rounded up) may lose a hair of value, never feasibility
        assert sum(vals[i][j] for i, j in enumerate(picks)) >= best - 0.05


def test_mckp_infeasible() -> None:
    assert solve_mckp([[1.0, 2.0]], [[3.0, 4.0]], 2.0) is None


def test_allowed_keeps_honour_the_multiple() -> None:
    assert allowed_keeps(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert allowed_keeps(20, 8) == [8, 16, 20]
    assert allowed_keeps(5, 1) == [1, 2, 3, 4, 5]


def test_width_space_adds_narrow_widths_below_the_multiple_and_snaps_to_them() -> None:
    assert auto_narrow(16) == (4, 8, 12) and auto_narrow(8) == (4,) and auto_narrow(4) == () and auto_narrow(32) == (8, 16, 24)
    space = WidthSpace(16, auto_narrow(16))
    assert space.keeps(64) == [4, 8, 12, 16, 32, 48, 64] and space.keeps(10) == [4, 8, 10]
    assert space.keeps(64, floor=16) == [16, 32, 48, 64]
    assert space.snap(5, 64) == 4 and space.snap(10, 64) == 12 and space.snap(14, 64) == 16 and space.snap(41, 64) == 48
    assert WidthSpace(16).snap(5, 64) == 16  # no narrow widths: the multiple is the floor, as before
    assert allowed_keeps(64, 16, narrow=(8,)) == [8, 16, 32, 48, 64]


def _blocked_cost(graph: ModelGraph, narrow_extra: float) -> CostModel:
    """A latency-like cost: work in blocks of 16 channels, a width below 16 costing its share
    plus ``narrow_extra`` (an unaligned kernel's penalty) per layer."""
    def layer(li: LayerInfo, ci: int, co: int) -> float:
        def blocks(c: int) -> float:
            return c / 16 + narrow_extra if c < 16 else float(math.ceil(c / 16))
        return li.flops / (li.in_channels * li.out_channels) * blocks(ci) * blocks(co) * 1e-6
    return CostModel("latency", layer, "ms")


def test_allocate_takes_a_narrow_width_only_where_it_is_cheaper() -> None:
    """A budget under the aligned floor is met with narrow widths when they cost less; when they
    cost more than the block, the block is the floor and the budget is out of reach."""
    graph = ModelGraph(build_model("tiny-cnn", 10, 1), (1, 32, 32), channel_multiple=WidthSpace(16, (4, 8, 12)))
    value = weighted_retained_value({g.name: np.ones(g.channels) for g in graph.groups()}, {})
    cheap, dear = _blocked_cost(graph, 0.0), _blocked_cost(graph, 2.0)
    aligned_floor = cheap.total(graph, {g.name: 16 for g in graph.groups()})
    plan, got = allocate(graph, value, cheap, 0.8 * aligned_floor)
    assert got <= 0.8 * aligned_floor and any(k < 16 for k in plan.values())
    assert cheapest_plan(graph, dear) == {g.name: 16 for g in graph.groups()}
    assert cheapest_plan(graph, flops_cost()) == {g.name: 4 for g in graph.groups()}
    with pytest.raises(BudgetUnreachable, match="cheapest allowed widths"):
        allocate(graph, value, dear, 0.8 * aligned_floor)


def test_allocate_meets_the_flops_budget_and_spends_it_where_value_is_low() -> None:
    model = build_model("tiny-cnn", 10, 1)
    graph = ModelGraph(model, (1, 32, 32), channel_multiple=8)
    cost = flops_cost()
    full = cost.total(graph, {g.name: g.channels for g in graph.groups()})
    assert full == pytest.approx(graph.flops_params()[0], rel=1e-6)
    scores = {g.name: np.ones(g.channels) for g in graph.groups()}
    precious = "features.6"
    weights = {g.name: (100.0 if g.name == precious else 1.0) for g in graph.groups()}
    plan, got = allocate(graph, weighted_retained_value(scores, weights), cost, 0.5 * full)
    assert got <= 0.5 * full
    assert got == pytest.approx(cost.total(graph, plan))
    assert plan[precious] == 32  # the heavily weighted group keeps every channel
    assert all(k % 8 == 0 for k in plan.values())
    # The plan's FLOPs are what the graph predicts and what pruning produces.
    assert graph.predict_flops(plan) == pytest.approx(got, rel=1e-6)
    prune_to_widths(model, (1, 32, 32), plan)
    assert ModelGraph(model, (1, 32, 32)).flops_params()[0] == pytest.approx(got, rel=1e-6)


def test_allocate_unreachable_says_the_lowest_cost() -> None:
    graph = ModelGraph(build_model("tiny-cnn", 10, 1), (1, 32, 32), channel_multiple=8)
    value = weighted_retained_value({g.name: np.ones(g.channels) for g in graph.groups()}, {})
    with pytest.raises(BudgetUnreachable, match="lowest reachable"):
        allocate(graph, value, channels_cost(), 3)


def test_plan_widths_keep_depthwise_in_step() -> None:
    model = build_model("mobilenet_v2", 10, 3)
    graph = ModelGraph(model, (3, 32, 32), channel_multiple=8)
    g = next(g for g in graph.groups() if any(graph.layers[n].groups > 1 for n in g.out_layers))
    widths = plan_widths(graph, {g.name: 8})
    dw = next(n for n in g.out_layers if graph.layers[n].groups > 1)
    assert widths[dw] == (8, 8)


def test_magnitude_masks_and_sparsity() -> None:
    model = build_model("tiny-cnn", 10, 1)
    masks = magnitude_masks(model, 0.3)
    apply_masks(model, masks)
    assert sparsity(model) == pytest.approx(0.3, abs=0.01)
    assert magnitude_masks(model, 0.3).keys() == masks.keys()  # idempotent on already-zero weights
    apply_masks(model, magnitude_masks(model, 0.3))
    assert sparsity(model) == pytest.approx(0.3, abs=0.01)


def test_distillation_loss_reduces_to_cross_entropy() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ce = nn.functional.cross_entropy(student(x), y)
    assert distillation_loss(teacher, alpha=0.0)(student, x, y).item() == pytest.approx(ce.item())
    # A student identical to its teacher pays no distillation term.
    twin = nn.Linear(4, 3)
    twin.load_state_dict(student.state_dict())
    assert distillation_loss(twin, alpha=1.0)(student, x, y).item() == pytest.approx(0.0, abs=1e-6)


def test_sensitivity_fit_recovers_the_scale_of_each_group() -> None:
    from deploy_prune.methods.deeplsp import sensitivity_weights

    n = 32
    scores = {"a": np.ones(n), "b": np.ones(n), "c": np.ones(n)}
    kept = [28, 24, 16, 8, 4]
    # drop = w * lost share: a steep, b gentle, c free (floored at a tenth of the median)
    sens = {"groups": [
        {"name": g, "entries": [{"kept_channels": k, "accuracy_drop": w * (1 - k / n)} for k in kept]}
        for g, w in (("a", 0.5), ("b", 0.1), ("c", 0.0))
    ]}
    w = sensitivity_weights(sens, scores)
    assert w["a"] == pytest.approx(0.5) and w["b"] == pytest.approx(0.1) and w["c"] == pytest.approx(0.1 * 0.3)
    value = weighted_retained_value(scores, w)
    assert value("a", 16) == pytest.approx(-0.5 * 0.5) and value("b", n) == 0.0


def test_halp_value_is_importance_kept_so_the_knapsack_cuts_the_least_important_channels() -> None:
    """HALP's value: channels of every group compete on their own scores, with no per-group
    rescaling, so at equal cost the knapsack removes the globally lowest-scoring channels."""
    from deploy_prune.methods.halp import importance_weights

    scores = {"a": np.array([4.0, 3.0, 0.1, 0.1]), "b": np.array([2.0, 2.0, 2.0, 2.0])}
    value = weighted_retained_value(scores, importance_weights(scores))
    assert value("a", 2) == pytest.approx(-0.2) and value("b", 2) == pytest.approx(-4.0)
    keeps = [[1, 2, 3, 4]] * 2
    vals = [[value(g, k) for k in ks] for g, ks in zip("ab", keeps, strict=True)]
    costs = [[float(k) for k in ks] for ks in keeps]  # one unit per channel kept
    picks = solve_mckp(vals, costs, 6.0)
    assert picks is not None and [keeps[0][picks[0]], keeps[1][picks[1]]] == [2, 4]


def test_the_floor_with_narrow_widths_never_costs_more_than_the_aligned_floor() -> None:
    """First order prices each group with its neighbours at their narrowest; on an irregular
    table (seed 8 here) that picks a floor with narrow widths dearer than the aligned one, and
    the closed loop, which plans at the aligned floor's price when measurement puts the budget
    there, then found the budget below the floor and stopped as unreachable."""
    graph = ModelGraph(build_model("tiny-cnn", 10, 1), (1, 32, 32), channel_multiple=WidthSpace(16, (4, 8, 12)))
    index = {n: i for i, n in enumerate(graph.layers)}

    def layer(li: LayerInfo, ci: int, co: int) -> float:  # the same price for a configuration, whatever the call order
        return float(np.random.default_rng([8, index[li.name], ci, co]).uniform(0.1, 1.0)) * (1 + ci * co / 256)

    cost = CostModel("latency", layer, "ms")
    narrow, aligned = cheapest_plan(graph, cost), cheapest_plan(graph, cost, floor=16)
    assert cost.total(graph, narrow) <= cost.total(graph, aligned)
    value = weighted_retained_value({g.name: np.ones(g.channels) for g in graph.groups()}, {})
    plan, got = allocate(graph, value, cost, cost.total(graph, aligned) * (1 + 1e-9))  # what the loop asks for
    assert got <= cost.total(graph, aligned) * (1 + 1e-9)
