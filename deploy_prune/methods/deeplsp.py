"""DeepLSP: latency- and sensitivity-aware hybrid (structured + unstructured) pruning.

From the "Pruning Pathways" collection of pruning methods: "structured + unstructured pruning
guided by layer sensitivity and latency", with ``keep_ratio`` (default 0.5) and ``amount``
(default 0.05, or adaptive). The collection gives no equations; the choices made here:

- **Sensitivity from real data.** The collection's DeepLSP feeds dummy inputs; this one runs
  ``deploy_prune.sensitivity`` on the validation subset: each group pruned alone at several
  ratios, accuracy drop measured (reused from ``sensitivity.json`` when given).
- **Value of keeping k channels of group g** = ``-w_g * (1 - R_g(k))``: ``R_g(k)`` is the share
  of the group's importance (criterion of choice, re-scored on the current model at every step)
  held by its k best channels, and ``w_g`` the group's sensitivity scale, fitted by least squares
  so that the value matches the measured accuracy drops of that group. The criterion gives the
  order and shape at every width, the measurement the scale in accuracy points. ``w_g`` is
  floored at a tenth of the median so no group is treated as free. The value is linear in the
  lost share: a per-group exponent ``(1 - R)^p`` fits the one-shot curves better but scored
  0.35-1.1 points lower after fine-tuning (benchmarks/results/compress_vs_uniform_power.md
  against compress_vs_uniform_linear.md, ResNet-20 on Fashion-MNIST, one seed each).
- **Structured allocation** = the latency knapsack of ``allocate.allocate``: per group one
  allowed width (multiples of the target's ``channel_multiple``), maximum total value within
  the LUT-predicted latency (or FLOPs / params / channels for other budgets).
- **Whole-subnet choice** (``candidates`` > 1): the knapsack scores each group on its own, so
  its plan is one of many that cost the same and differ in where the cut falls. At the first
  budget planned, ``candidates`` allocations each plan: the knapsack, the knapsack again
  ``candidates - 2`` times with each group's weight scaled by a log-normal factor (``spread``:
  its sigma; drawn from the run's seed), and one keep share for every group (``uniform``).
  Every distinct plan is scored as a whole: a copy of the model cut to it, BatchNorm statistics
  re-estimated, ``recover_steps`` training steps on the scoring batches, the run's metric on the
  validation subset (``subnet.choose``). The best allocation then plans for the whole run.
- **Unstructured part**: magnitude masks of ``amount`` of the remaining weights in every
  conv/linear layer (the output layer included), or ``adaptive``: per layer, the largest share
  in a ladder whose accuracy drop, that layer alone masked, stays within ``tolerance`` on the
  validation subset. The masks are held during the final fine-tuning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from deploy_prune.allocate import allocate, weighted_retained_value
from deploy_prune.checks import check_number
from deploy_prune.errors import BudgetUnreachable, UserError
from deploy_prune.importance import CRITERIA, score_groups
from deploy_prune.methods import BUDGET_KINDS, METHODS
from deploy_prune.methods.subnet import choose
from deploy_prune.methods.uniform import Uniform
from deploy_prune.transforms import Masks, apply_masks, magnitude_masks, weight_layers

if TYPE_CHECKING:
    from deploy_prune.methods.context import MethodContext

ADAPTIVE_LADDER = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def sensitivity_weights(sens: dict[str, Any], scores: dict[str, Any], floor_share: float = 0.1) -> dict[str, float]:
    """Per group, the scale ``w`` with ``drop(k) ~ w * (1 - R(k))`` over the measured ratios
    (least squares), floored at ``floor_share`` of the median positive scale."""
    lost = weighted_retained_value(scores, {})  # -(1 - R(k))
    w: dict[str, float] = {}
    for g in sens["groups"]:
        if g["name"] not in scores:
            continue
        x = np.array([-lost(g["name"], e["kept_channels"]) for e in g["entries"]])
        d = np.array([max(0.0, e["accuracy_drop"]) for e in g["entries"]])
        w[g["name"]] = max(0.0, float(x @ d) / float(x @ x)) if x @ x > 0 else 0.0
    pos = [v for v in w.values() if v > 0]
    floor = floor_share * float(np.median(pos)) if pos else 1.0
    return {k: max(v, floor) for k, v in w.items()}


@METHODS.register("deeplsp", "latency knapsack weighted by measured sensitivity + unstructured magnitude masks")
class DeepLSP:
    name = "deeplsp"
    kind = "hybrid"
    lowers_latency = True
    default_steps = 3
    budget_kinds: tuple[str, ...] = BUDGET_KINDS

    def __init__(self, criterion: str = "taylor", amount: float | str = 0.05, tolerance: float = 0.005,
                 candidates: int = 1, spread: float = 0.5, recover_steps: int = 24, sensitivity_bn: int = 0) -> None:
        if isinstance(amount, str) and amount != "adaptive":
            try:
                amount = float(amount)
            except ValueError:
                raise UserError(f"--amount must be a share in [0, 1) or 'adaptive', got {amount!r}") from None
        if isinstance(amount, float) and not 0.0 <= amount < 1.0:
            raise UserError(f"--amount must be a share in [0, 1) or 'adaptive', got {amount}")
        CRITERIA.get(criterion)  # an unknown name fails now, not after profiling and sensitivity
        check_number("--tolerance", tolerance, lo=0.0, hi=1.0)
        check_number(f"--method {self.name}: candidates", candidates, lo=1, integer=True)
        check_number(f"--method {self.name}: spread", spread, lo=0.0)
        check_number(f"--method {self.name}: recover_steps", recover_steps, lo=0, integer=True)
        check_number(f"--method {self.name}: sensitivity_bn", sensitivity_bn, lo=0, integer=True)
        self.sensitivity_bn = int(sensitivity_bn)
        self.criterion, self.amount, self.tolerance = criterion, amount, tolerance
        self.candidates, self.spread, self.recover_steps = int(candidates), float(spread), int(recover_steps)
        self.chosen: list[dict[str, Any]] = []
        self.allocation: dict[str, float] | str | None = None  # the chosen one (``_choose``)
        self.weights: dict[str, float] = {}
        self.chosen_amounts: dict[str, float] = {}

    def settings(self) -> dict[str, Any]:
        return {**self._common_settings(), "sensitivity_bn": self.sensitivity_bn,
                "sensitivity_weights": {k: round(v, 6) for k, v in self.weights.items()}}

    def _common_settings(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "amount": self.amount, "tolerance": self.tolerance,
                "candidates": self.candidates, "spread": self.spread, "recover_steps": self.recover_steps,
                "adaptive_amounts": self.chosen_amounts or None,
                "subnet_choices": self.chosen or None}

    def setup(self, run: MethodContext) -> None:
        import copy

        from deploy_prune.graph import ModelGraph

        sens = run.sensitivity(self.criterion, self.sensitivity_bn)
        # The sensitivity was measured on the unpruned model: fit its weights with that model's
        # scores (also when a resumed run's model is already pruned).
        base = copy.deepcopy(run.teacher)
        graph = ModelGraph(base, run.input_shape, run.ignore, run.graph.space)
        self.weights = sensitivity_weights(sens, self._scores(run, base, graph))

    def _scores(self, run: MethodContext, model: Any = None, graph: Any = None) -> dict[str, Any]:
        return {k: v.numpy() for k, v in score_groups(model or run.model, graph or run.graph, self.criterion,
                                                       run.score_batches(), seed=run.seed).items()}

    def value_weights(self, scores: dict[str, Any]) -> dict[str, float]:
        """Per group, the weight of its importance in the knapsack's value: the sensitivity fit."""
        return self.weights

    def plan(self, run: MethodContext, budget: float, scores: dict[str, Any] | None = None) -> dict[str, int]:
        scores = scores or self._scores(run)
        if self.candidates > 1 and self.allocation is None:
            self.allocation = self._choose(run, budget, scores)
        return self._allocate(run, budget, scores, self.allocation or {})

    def _allocate(self, run: MethodContext, budget: float, scores: dict[str, Any], how: dict[str, float] | str) -> dict[str, int]:
        """The plan at ``budget`` of one allocation: ``"uniform"`` (one keep share for every group,
        ``methods.uniform``), or the knapsack with each group's value weight scaled by its factor
        in ``how`` (1 when absent)."""
        if how == "uniform":
            return Uniform().plan(run, budget)
        assert isinstance(how, dict)
        weights = self.value_weights(scores)
        value = weighted_retained_value(scores, {g: w * how.get(g, 1.0) for g, w in weights.items()})
        return allocate(run.graph, value, run.cost, budget)[0]

    def allocations(self, run: MethodContext, scores: dict[str, Any]) -> list[dict[str, float] | str]:
        """The knapsack's own allocation (no factors), ``candidates - 2`` draws of per-group
        factors ``exp(spread * z)`` with z from the run's seed, and the uniform share."""
        rng = np.random.default_rng(run.seed)
        draws: list[dict[str, float] | str] = [{g: float(np.exp(self.spread * rng.standard_normal())) for g in scores}
                                               for _ in range(self.candidates - 2)]
        return [{}, *draws, "uniform"]

    def candidate_plans(self, run: MethodContext, budget: float, scores: dict[str, Any]) -> list[tuple[dict[str, float] | str, dict[str, int]]]:
        """(allocation, plan) for every allocation whose plan at ``budget`` is new (a uniform
        share that cannot meet the budget is left out)."""
        out: list[tuple[dict[str, float] | str, dict[str, int]]] = []
        for how in self.allocations(run, scores):
            try:
                p = self._allocate(run, budget, scores, how)
            except BudgetUnreachable:
                continue
            if all(p != q for _, q in out):
                out.append((how, p))
        return out

    def _choose(self, run: MethodContext, budget: float, scores: dict[str, Any]) -> dict[str, float] | str | None:
        """The allocation whose plan scores best as a whole subnet (``subnet.choose``), at the
        first budget planned where the plans differ (None before). It is kept for the rest of
        the run: the closed loop's corrections and the steps plan with it, so the subnets are
        scored once."""
        cands = self.candidate_plans(run, budget, scores)
        if len(cands) == 1:  # a light cut where every allocation plans alike: choose at a later, deeper one
            return None
        best, metrics = choose(run, [p for _, p in cands], scores, self.recover_steps)
        names = ["knapsack" if how == {} else how if isinstance(how, str) else f"draw {i}" for i, (how, _) in enumerate(cands)]
        self.chosen.append({"budget": round(float(budget), 6), "plans": len(cands), "chosen": best, "allocations": names,
                            "metrics": [round(m, 5) for m in metrics]})
        run.say(f"{len(cands)} plans scored whole (adaptive BN, {self.recover_steps} recovery steps, validation subset): "
                f"{', '.join(f'{n} {100 * m:.1f} %' for n, m in zip(names, metrics, strict=True))}; {names[best]} chosen")
        return cands[best][0]

    def prune(self, run: MethodContext, budget: float) -> None:
        import torch

        scores = self._scores(run)
        plan = self.plan(run, budget, scores)
        run.graph.prune_by_scores(plan, {k: torch.as_tensor(v) for k, v in scores.items()})

    def masks(self, run: MethodContext) -> Masks:
        if self.amount == "adaptive":
            return self._adaptive(run)
        return magnitude_masks(run.model, float(self.amount))

    def _adaptive(self, run: MethodContext) -> Masks:
        """Per layer, the largest share of the ladder within ``tolerance`` of accuracy drop, alone."""
        import copy

        base = run.subset_accuracy(run.model)
        amounts: dict[str, float] = {}
        for name in weight_layers(run.model):
            best = 0.0
            for a in ADAPTIVE_LADDER:
                trial = copy.deepcopy(run.model)
                apply_masks(trial, magnitude_masks(trial, {name: a}))
                if base - run.subset_accuracy(trial) > self.tolerance:
                    break
                best = a
            amounts[name] = best
        self.chosen_amounts = amounts
        return magnitude_masks(run.model, amounts)


@METHODS.register("hybrid", "sensitivity-weighted channel allocation (FLOPs/params/channels, no latency) + adaptive magnitude masks")
class Hybrid(DeepLSP):
    """The seed's HybridPruner: sensitivity decides where channels go, weight magnitude what else is
    zeroed. It is DeepLSP without the latency table: the same sensitivity fit and knapsack, priced in
    FLOPs, parameters or channels, with ``--amount adaptive`` by default."""

    name = "hybrid"
    budget_kinds = ("flops_ratio", "params_ratio", "keep_ratio")

    def __init__(self, criterion: str = "taylor", amount: float | str = "adaptive", tolerance: float = 0.005) -> None:
        super().__init__(criterion, amount, tolerance)
