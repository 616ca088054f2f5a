"""DF: a differentiable framework for hybrid filter + low-rank compression ("A Differentiable Framework for End-to-End Learning of Hybrid Structured Compression").

Filters and ranks are chosen together by gradient descent on Eq. (7) with the pre-trained
weights frozen (Algorithm 1), then the model is materialised and fine-tuned:

- **DML-S** (Eq. 8-9): one learnable mask value ``M`` per channel of every prunable group
  (initialised to 1); the rows of every layer producing those channels are scaled by the
  scheduled sigmoid ``phi_s(M) = sigmoid(mu (M - 0.5))``, ``mu_i = min(alpha, mu_{i-1} + beta)``.
- **DTL-S** (Eq. 10-11): one threshold ``gamma`` per conv (groups == 1); the masked weight,
  matricised C_out x (C_in k k) (scheme 1), is replaced by its singular-value soft-threshold
  ``U diag((sigma - gamma)_+) V^T``.
- **Budget** (Eq. 12-14; for latency budgets the target's LUT, see ``Measured``):
  ``g_c = sum phi_s(M)`` filters per group, ``g_r = sum tanh(ReLU(sigma -
  gamma) tau)`` per layer with ``tau = C / sigma_1``; each layer costs its dense MACs at
  ``(g_c(in), g_c(out))`` or, where ranks are learned, ``A r (k k g_c(in) + g_c(out))``; the loss
  is ``CE + lambda (B / B_full - B_d / B_full)^2`` starting from the paper's ``lambda = 1``.
- **Materialise**: keep the channels with ``M > 0.5``, truncate each layer to ``round(g_r)``
  by SVD and split it into two convs (``transforms.lowrank``), skipping the factorisation of
  any layer where it would not lower that layer's cost.

Where the paper leaves a choice open, ours (each can be changed by a setting):

- ``mu`` rises by ``beta`` per *epoch* of mask learning (linearly within it), from ``mu0 = 5``
  to ``alpha = 50``. Per step, with beta = 4, the sigmoid saturates within 12 steps and the
  masks stop receiving gradient before they can move.
- ``g_c`` counts filters with the scheduled sigmoid (Eq. 12 writes the plain one), so that
  the count the budget sees converges to the count that is materialised (``M > 0.5``).
- A layer's cost is the *smaller* of its dense and factorised costs (Eq. 14 counts every layer
  factorised), because the materialisation keeps a layer dense where factorising does not pay.
- ``gamma = g * sigma_1`` is learned through ``g`` (initialised to 0, as ``z_r = 0``), so one
  learning rate suits layers whose singular values differ in scale.
- Gradients do not flow through the singular *vectors* (``U``, ``V`` are taken without
  gradient; the singular values are recomputed as ``diag(U^T W V)`` with it): the SVD's vector
  gradients divide by ``sigma_i^2 - sigma_j^2``, which explodes once masked rows make singular
  values coincide. Masks still receive the weight's own gradient (the SVT is written as
  ``W - U diag(min(sigma, gamma)) V^T``).
- ``lambda`` doubles after every quarter epoch that ends with the surrogate still more than
  ``eps`` over the target (the while-loop of Algorithm 1 asks for the budget to be reached, and a fixed
  ``lambda = 1`` did not get there: on tiny-cnn / digits the surrogate sat at 0.83 of the FLOPs
  for a 0.5 target through 10 epochs, CE outweighing the budget term). ``lam_growth = 1``
  restores the paper's fixed multiplier.
- Masks and thresholds are trained with Adam (``lr`` 0.01), CE on the training set, BatchNorm
  statistics frozen; the while-loop of Algorithm 1 runs at most ``max_epochs`` epochs
  (default twice ``df_epochs``).
- The learned structure is rounded to the target's channel multiple; if the rounded structure
  is over the budget, thresholds are raised together (mask threshold ``0.5 + d``, ranks at
  ``gamma + d sigma_1``) by bisection on ``d`` until it fits; then channel/rank blocks the
  shift removed are given back, most valuable first, while the budget still holds.
- Ranks are materialised by plain truncated SVD of the (filter-pruned) weight: the best
  rank-r approximation, which fine-tuning starts from.

This is one module, over the usual length, because it is one method: the surrogate costs
(``Counted``, ``Measured``), the learning of Algorithm 1 and the materialisation all implement the
equations and choices above, and each choice changes how the others must count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from deploy_prune.errors import BudgetUnreachable, UserError
from deploy_prune.graph import ModelGraph
from deploy_prune.methods import METHODS
from deploy_prune.transforms import Masks
from deploy_prune.transforms.lowrank import LowRankConv2d, factorize, full_rank
from deploy_prune.widths import round_channels

if TYPE_CHECKING:
    from deploy_prune.methods.context import MethodContext

MODES = ("hybrid", "filters", "ranks")


@dataclass
class _Layer:
    """One conv/linear layer as the surrogate budget sees it."""

    name: str
    full: float  # cost at today's widths (MACs or params)
    area: float  # output pixels (FLOPs) or 1 (params): the factorised cost's multiplier
    cin: int
    cout: int
    k2: int  # kernel area
    in_group: str | None
    out_group: str | None
    depthwise: bool
    rank: bool  # thresholds learned for this layer


def _layers(graph: ModelGraph, kind: str, rankable: set[str]) -> list[_Layer]:
    ins = {n: g.name for g in graph.groups() for n in g.in_layers}
    outs = {n: g.name for g in graph.groups() for n in g.out_layers}
    res = []
    for n, li in graph.layers.items():
        dw = li.groups > 1 and li.groups == li.in_channels == li.out_channels
        area = li.out_hw[0] * li.out_hw[1] if kind == "flops" else 1
        res.append(_Layer(n, float(li.flops if kind == "flops" else li.params), float(area), li.in_channels,
                          li.out_channels, li.kernel[0] * li.kernel[1], ins.get(n), outs.get(n), dw, n in rankable))
    return res


class Counted:
    """Prices layers in MACs or parameters (Eq. 14; ``area`` = 1 for parameters)."""

    def dense(self, li: _Layer, ci: Any, co: Any) -> Any:
        return li.full * co / li.cout if li.depthwise else li.full * (ci / li.cin) * (co / li.cout)

    def factorized(self, li: _Layer, ci: Any, r: Any, co: Any) -> Any:
        return li.area * r * (li.k2 * ci + co)


class Measured:
    """Prices layers by the target's LUT, interpolated bilinearly between its grid points; the
    interpolation weights are differentiable in the (continuous) channel counts and ranks, which
    is the latency surrogate DF learns against. Factorised layers use the profile's low-rank
    tables (``profile --lowrank``)."""

    def __init__(self, profile: Mapping[str, Any]) -> None:
        self.profile = profile

    def _at(self, name: str, ci: Any, co: Any) -> Any:
        from deploy_prune.latency.lut import interpolate, layer_grid

        grid = layer_grid(self.profile, name)
        if grid is None:
            raise UserError(f"the profile has no low-rank tables for layer {name!r}; profile with --lowrank")
        fam, gin, gout, _, _ = grid
        return interpolate(self.profile["entries"], fam, gin, gout, ci, co)

    def dense(self, li: _Layer, ci: Any, co: Any) -> Any:
        return self._at(li.name, ci, co)

    def factorized(self, li: _Layer, ci: Any, r: Any, co: Any) -> Any:
        return self._at(f"{li.name}.0", ci, r) + self._at(f"{li.name}.1", r, co)


def _value(x: Any) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _cost(layers: list[_Layer], count: Mapping[str, Any], rank: Mapping[str, Any], pricer: Any = None,
          chosen: set[str] | None = None) -> Any:
    """Sum of layer costs with ``count[group]`` channels per group and ``rank[layer]`` for the
    layers that may be factorised, each at the cheaper of dense and factorised (floats or
    tensors: the same formula serves the surrogate and the rounded plan). Layers for which the
    factorisation is cheaper are added to ``chosen``."""
    pricer = pricer or Counted()
    total: Any = 0.0
    for li in layers:
        co = count.get(li.out_group, li.cout) if li.out_group else li.cout
        ci = count.get(li.in_group, li.cin) if li.in_group and not li.depthwise else li.cin
        cost = pricer.dense(li, ci, co)
        if li.name in rank:
            fact = pricer.factorized(li, ci, rank[li.name], co)
            if chosen is not None and _value(fact) < _value(cost):
                chosen.add(li.name)
            if isinstance(cost, torch.Tensor) or isinstance(fact, torch.Tensor):
                cost = torch.minimum(torch.as_tensor(cost), torch.as_tensor(fact))
            else:
                cost = min(cost, fact)
        total = total + cost
    return total


@METHODS.register("df", "differentiable hybrid: learned filter masks (DML-S) + singular-value thresholds (DTL-S), then low-rank factorisation")
class DF:
    name = "df"
    kind = "low-rank"
    lowers_latency = True
    default_steps = 1
    budget_kinds = ("flops_ratio", "params_ratio", "latency_ms", "latency_ratio")
    plans = False  # the structure is learned, not planned: the measured loop tightens and re-learns
    lowrank_profile = True  # latency budgets need the LUT's low-rank tables

    def __init__(self, mode: str = "hybrid", df_epochs: float = 2.0, df_lr: float = 0.01, beta: float = 4.0,
                 alpha: float = 50.0, mu0: float = 5.0, c: float = 2.0, lam: float = 1.0, lam_growth: float = 2.0, eps: float = 0.01,
                 max_epochs: float | None = None) -> None:
        if mode not in MODES:
            raise UserError(f"--df-mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not df_epochs > 0:
            raise UserError(f"--df-epochs must be > 0, got {df_epochs}")
        if not (df_lr > 0 and math.isfinite(df_lr)):
            raise UserError(f"--df-lr must be a positive number, got {df_lr}")
        self.mode, self.epochs, self.lr = mode, float(df_epochs), df_lr
        self.beta, self.alpha, self.mu0, self.c, self.lam, self.eps = beta, alpha, mu0, c, lam, eps
        self.lam_growth = lam_growth
        self.max_epochs = float(max_epochs) if max_epochs is not None else 2 * self.epochs
        self.rounds: list[dict[str, Any]] = []  # every round: the measured loop may re-learn on the pruned model

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "df_epochs": self.epochs, "max_epochs": self.max_epochs, "df_lr": self.lr,
                "alpha": self.alpha, "beta": self.beta, "mu0": self.mu0, "C": self.c, "lambda": self.lam, "lambda_growth": self.lam_growth,
                "eps": self.eps, **(self.rounds[-1] if self.rounds else {}), "rounds": len(self.rounds),
                "history": [h for r in self.rounds for h in r["history"]],
                "factorized": sorted({n for r in self.rounds for n in r.get("factorized", [])})}

    def setup(self, run: MethodContext) -> None:
        pass

    def plan(self, run: MethodContext, budget: float) -> dict[str, int]:
        raise UserError("df learns its structure during pruning; it has no separate plan for a latency loop")

    def masks(self, run: MethodContext) -> Masks:
        return {}

    # -- which layers ---------------------------------------------------------------------------
    def _rankable(self, run: MethodContext) -> set[str]:
        if self.mode == "filters":
            return set()
        inside = {f"{n}.{i}" for n, m in run.model.named_modules() if isinstance(m, LowRankConv2d) for i in (0, 1)}
        skip = run.graph.frozen_layers | inside
        mods = dict(run.model.named_modules())
        grouped = sorted(n for n, li in run.graph.layers.items() if li.kind == "conv" and li.groups > 1)
        note = (f"df: {len(grouped)} grouped/depthwise conv(s) cannot be factorised (scheme 1 needs groups = 1); "
                f"they lose filters only: {', '.join(grouped[:5])}{' ...' if len(grouped) > 5 else ''}")
        if grouped and note not in run.notes:
            run.notes.append(note)
        return {n for n, li in run.graph.layers.items()
                if li.kind == "conv" and li.groups == 1 and n not in skip and isinstance(mods[n], nn.Conv2d)}

    def prune(self, run: MethodContext, budget: float) -> None:
        graph = run.graph
        rankable = self._rankable(run)
        layers = _layers(graph, run.cost.kind, rankable)
        pricer = Measured(run.profile or {}) if run.cost.kind == "latency" else Counted()
        a, b = run.cost.a, run.cost.b  # the LUT's calibration (1, 0 for counted costs)

        def price(keep: Mapping[str, Any], ranks: Mapping[str, Any], chosen: set[str] | None = None) -> Any:
            return a * _cost(layers, keep, ranks, pricer, chosen) + b

        full = float(price({}, {}))
        groups = {g.name: g for g in graph.groups()} if self.mode != "ranks" else {}
        low = float(price({g: graph.space.snap(1, x.channels) for g, x in groups.items()}, {n: 1 for n in rankable}))
        if low > budget:
            raise BudgetUnreachable(f"the budget {budget:.4g} {run.cost.unit} ({budget / full:.3f} of the model) is below "
                                    f"what df can reach in mode {self.mode!r}: {low:.4g} ({low / full:.3f}) with the fewest "
                                    "filters and rank 1; raise the budget")
        mask, gam, sig1, learned = self._learn(run, groups, rankable, budget / full, lambda k, r: price(k, r) / full)
        keep, ranks, shift = self._materialise(run, groups, mask, gam, sig1, budget, lambda k, r: float(price(k, r)))
        remove = {g: torch.argsort(mask[g], descending=True)[keep[g]:].tolist() for g in keep if keep[g] < groups[g].channels}
        chosen: set[str] = set()
        price(keep, ranks, chosen)  # factorise only where it is cheaper than the dense layer at its new widths
        graph.prune(remove)
        fact = {n: ranks[n] for n in sorted(chosen)}
        factorize(run.model, fact)
        run.graph = ModelGraph(run.model, run.input_shape, run.ignore, graph.space)
        done = run.cost.total(run.graph, {g.name: g.channels for g in run.graph.groups()})
        self.rounds.append({
            **learned, "threshold_shift": shift, "cost_ratio": round(done / full, 4),
            "learned_ranks": {n: r for n, r in sorted(ranks.items())},  # before the does-it-pay check
            "factorized": sorted(fact),
        })
        run.say(f"df: materialised {len(fact)} low-rank layer(s), {sum(len(v) for v in remove.values())} filter(s) removed; "
                f"{run.cost.kind} {done / full:.3f} of the model")

    # -- learning (Algorithm 1) -----------------------------------------------------------------
    def _learn(self, run: MethodContext, groups: dict[str, Any], rankable: set[str], target: float,
               ratio_of: Callable[[dict[str, Any], dict[str, Any]], Any],
               ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float], dict[str, Any]]:
        """Masks, normalised thresholds and sigma_1 per layer, and a record of the learning."""
        from deploy_prune.data import make_loader
        from deploy_prune.train import default_device

        device = default_device()
        model = run.model.to(device).eval()  # BatchNorm statistics frozen with the weights
        mods = dict(model.named_modules())
        frozen = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        out_rows = {n: g.name for g in groups.values() for n in g.out_layers}
        touched = sorted(set(out_rows) | rankable)
        weights = {n: mods[n].weight.detach() for n in touched}  # type: ignore[union-attr]
        sig1 = {n: float(torch.linalg.matrix_norm(weights[n].flatten(1), ord=2)) for n in rankable}
        mask = {g: torch.ones(x.channels, device=device, requires_grad=True) for g, x in groups.items()}
        gnorm = {n: torch.zeros((), device=device, requires_grad=True) for n in rankable}
        opt = torch.optim.Adam([*mask.values(), *gnorm.values()], lr=self.lr)
        loader = make_loader(run.train_data, run.batch_size, shuffle=True, seed=run.seed)
        per_epoch = max(1, len(loader))
        quarter = max(1, per_epoch // 4)
        steps, cap = math.ceil(self.epochs * per_epoch), math.ceil(self.max_epochs * per_epoch)
        torch.manual_seed(run.seed)
        step, ratio, history, lam = 0, 1.0, [], self.lam
        while step < cap and (step < steps or abs(ratio - target) >= self.eps):
            for x, y in loader:
                mu = min(self.alpha, self.mu0 + self.beta * step / per_epoch)
                soft = {g: torch.sigmoid(mu * (v - 0.5)) for g, v in mask.items()}
                over, g_r = {}, {}
                for n in touched:
                    w = weights[n]
                    if n in out_rows:
                        w = w * soft[out_rows[n]].view(-1, *([1] * (w.dim() - 1)))
                    if n in rankable:
                        w, g_r[n] = _svt(w, gnorm[n] * sig1[n], self.c / max(sig1[n], 1e-12))
                    over[f"{n}.weight"] = w
                logits = torch.func.functional_call(model, over, (x.to(device),), strict=False)
                ce = F.cross_entropy(logits, y.to(device))
                ratio_t = ratio_of({g: s.sum() for g, s in soft.items()}, g_r)
                loss = ce + lam * (ratio_t - target) ** 2
                if not torch.isfinite(loss):
                    self._restore(model, frozen)
                    raise UserError(f"df mask learning diverged (loss {float(loss.detach())} at step {step}); lower --df-lr "
                                    f"(now {self.lr}) or check the weights")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step, ratio = step + 1, float(ratio_t.detach())
                if step % quarter == 0 and ratio - target >= self.eps:
                    lam *= self.lam_growth
                if step % per_epoch == 0 or step >= cap or (step >= steps and abs(ratio - target) < self.eps):
                    history.append({"step": step, "epoch": round(step / per_epoch, 3), "mu": round(mu, 3), "lambda": lam,
                                    "ce": round(float(ce.detach()), 4), "cost_ratio": round(ratio, 4)})
                    run.say(f"df: epoch {step / per_epoch:.2f}, mu {mu:.1f}, CE {float(ce.detach()):.3f}, "
                            f"surrogate {run.cost.kind} {ratio:.3f} (target {target:.3f})")
                if step >= cap or (step >= steps and abs(ratio - target) < self.eps):
                    break
        self._restore(model, frozen)
        model.cpu()
        learned = {"history": history, "mask_steps": step, "surrogate_ratio": round(ratio, 4), "target_ratio": round(target, 4)}
        return ({g: v.detach().cpu() for g, v in mask.items()}, {n: float(v.detach()) for n, v in gnorm.items()}, sig1, learned)

    @staticmethod
    def _restore(model: nn.Module, frozen: list[bool]) -> None:
        for p, r in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(r)

    # -- materialising ----------------------------------------------------------------------------
    def _materialise(self, run: MethodContext, groups: dict[str, Any], mask: dict[str, torch.Tensor], gnorm: dict[str, float],
                     sig1: dict[str, float], budget: float,
                     price: Callable[[dict[str, int], dict[str, int]], float]) -> tuple[dict[str, int], dict[str, int], float]:
        """Round the learned structure (raising every threshold by ``d`` until it fits the budget);
        returns filters per group, ranks per layer and the shift ``d``."""
        mods = dict(run.model.named_modules())
        m = run.graph.channel_multiple
        out_rows = {n: g for g, x in groups.items() for n in x.out_layers}
        with torch.no_grad():
            sv = {}
            for n in gnorm:
                w = mods[n].weight.detach()  # type: ignore[union-attr]
                if n in out_rows:
                    w = w[mask[out_rows[n]] > 0.5]
                sv[n] = torch.linalg.svdvals(w.flatten(1)) if w.shape[0] else torch.zeros(1)

        def structure(d: float) -> tuple[dict[str, int], dict[str, int]]:
            keep = {g: run.graph.space.snap(int((v > 0.5 + d).sum()), groups[g].channels) for g, v in mask.items()}
            ranks = {}
            for n, s in sv.items():
                gamma, tau = (gnorm[n] + d) * sig1[n], self.c / max(sig1[n], 1e-12)
                r = int(round(float(torch.tanh(torch.relu(s - gamma) * tau).sum())))
                ranks[n] = round_channels(max(r, 1), full_rank(mods[n]), m)  # type: ignore[arg-type]
            return keep, ranks

        def cost(d: float) -> float:
            return price(*structure(d))

        if cost(0.0) <= budget:
            return (*structure(0.0), 0.0)
        hi = max(1.0, max((float(v.max()) - 0.5 for v in mask.values()), default=0.0)) + 1e-3
        if cost(hi) > budget:
            raise BudgetUnreachable(f"df: even the narrowest learned structure costs {cost(hi):.4g} {run.cost.unit}, "
                                    f"over the budget {budget:.4g}; raise the budget")
        lo = 0.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if cost(mid) <= budget else (mid, hi)
        return (*self._refill(price, structure(hi), structure(0.0), mask, sv, gnorm, sig1, budget, m), round(hi, 5))

    def _refill(self, price: Callable[[dict[str, int], dict[str, int]], float], fits: tuple[dict[str, int], dict[str, int]],
                over: tuple[dict[str, int], dict[str, int]], mask: dict[str, torch.Tensor], sv: dict[str, torch.Tensor],
                gnorm: dict[str, float], sig1: dict[str, float], budget: float, multiple: int) -> tuple[dict[str, int], dict[str, int]]:
        """Channel rounding makes the shared threshold jump: give back, one channel multiple at a
        time and most valuable first (the threshold shift at which that block would go), what the
        learned structure ``over`` had, while the budget holds."""
        keep, ranks = dict(fits[0]), dict(fits[1])
        order = {g: torch.sort(v, descending=True).values for g, v in mask.items()}

        def worth(kind: str, name: str) -> float:
            if kind == "filters":
                k = keep[name]
                return float(order[name][min(k, len(order[name]) - 1)]) - 0.5
            r = ranks[name]
            s = sv[name]
            return float(s[min(r, len(s) - 1)]) / max(sig1[name], 1e-12) - gnorm[name]

        while True:
            cands = [("filters", g) for g in keep if keep[g] < over[0][g]] + [("ranks", n) for n in ranks if ranks[n] < over[1][n]]
            for kind, name in sorted(cands, key=lambda c: -worth(*c)):
                trial_keep, trial_ranks = dict(keep), dict(ranks)
                target = trial_keep if kind == "filters" else trial_ranks
                target[name] = min(target[name] + multiple, (over[0] if kind == "filters" else over[1])[name])
                if price(trial_keep, trial_ranks) <= budget:
                    keep, ranks = trial_keep, trial_ranks
                    break
            else:
                return keep, ranks


def _svt(w: torch.Tensor, gamma: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular-value soft-threshold of ``w`` matricised C_out x (C_in k k), and its rank
    estimate ``g_r`` (Eq. 13); gradients flow through the singular values, not the vectors."""
    mat = w.flatten(1)
    with torch.no_grad():
        u, _, vh = torch.linalg.svd(mat, full_matrices=False)
    s = ((u.T @ mat) * vh).sum(1)  # diag(U^T W V), differentiable in W
    out = mat - (u * torch.minimum(s, gamma)) @ vh
    return out.view_as(w), torch.tanh(torch.relu(s - gamma) * tau).sum()
