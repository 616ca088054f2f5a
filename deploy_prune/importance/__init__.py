"""Channel importance criteria behind one protocol, registered by name.

``score_groups(model, graph, name, batches)`` returns, for every prunable group, one score
per channel (higher = more important). Each criterion first scores the channels of every
member layer of the group (the convs/linears whose outputs or inputs the channel touches and
its norm layers), then reduces them by the **mean over members**: the same reduction for
every criterion, so a residual group of six convs is not scored six times as high as a
plain one. Scores are raw (not normalised per group); allocation normalises as it needs.

Weight- and gradient-based criteria reuse torch-pruning's group importance classes, which
already map indices through concatenations, flattening and residual couplings; what they
do not offer (Hutchinson's Hessian diagonal, per-batch accumulation, activation statistics)
is written here.

| name | needs | score per channel |
|---|---|---|
| l1, l2 | weights | sum of |w| (l1) or w**2 (l2) over the channel's weights |
| bn-scale | weights | |gamma| of the channel's BatchNorm (network slimming) |
| taylor | data+labels | first-order Taylor estimate of removing the channel, |sum of g*w| over its weights, accumulated over batches |
| hessian | data+labels | OBD saliency 1/2 h w**2, diag(H) from Hutchinson's estimator on W H W with low-rank deflation |
| fstat | data+labels | ANOVA F-statistic of the channel's pooled activation vs the labels |
| chi2 | data+labels | chi-squared statistic of the binned pooled activation vs the labels |
| snip | data+labels | connection sensitivity |g*w| on one batch |
| random | - | seeded uniform random |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.graph import ModelGraph
from deploy_prune.registry import Registry

Batch = tuple[torch.Tensor, torch.Tensor]
Scores = dict[str, torch.Tensor]


@dataclass
class Criterion:
    """A registered criterion: how to score every group, and what it needs."""

    name: str
    fn: Callable[[nn.Module, ModelGraph, Sequence[Batch], int], Scores]
    needs_data: bool
    help: str


CRITERIA: Registry[Criterion] = Registry("criterion")


def register(name: str, needs_data: bool, help: str) -> Callable:
    def deco(fn: Callable[[nn.Module, ModelGraph, Sequence[Batch], int], Scores]) -> Callable:
        CRITERIA.register(name, help)(Criterion(name, fn, needs_data, help))
        return fn

    return deco


def score_groups(
    model: nn.Module, graph: ModelGraph, criterion: str, batches: Sequence[Batch] = (), seed: int = 0
) -> Scores:
    """Per-channel scores for every group of ``graph`` under ``criterion``."""
    crit = CRITERIA.get(criterion)
    if crit.needs_data and not batches:
        raise UserError(f"criterion {criterion!r} needs data with labels (gradients or activations); pass --data")
    was_training = model.training
    device = next(model.parameters()).device
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    try:
        scores = {k: v.cpu() for k, v in crit.fn(model, graph, batches, seed).items()}
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise UserError(f"criterion {criterion!r} produced non-finite scores for group {name!r}")
    return scores


def _by_tp(graph: ModelGraph, imp: Callable[[object], torch.Tensor]) -> Scores:
    return {g.name: imp(graph.group(g.name)).detach().float().cpu() for g in graph.groups()}


@register("l1", False, "sum of |w| over the channel's weights")
def _l1(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    return _by_tp(graph, tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None))


@register("l2", False, "sum of w**2 over the channel's weights")
def _l2(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    return _by_tp(graph, tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None))


@register("bn-scale", False, "|gamma| of the channel's BatchNorm (groups without BN fall back to l1)")
def _bn(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    bn = tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)
    l1 = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
    out = {}
    for g in graph.groups():
        s = bn(graph.group(g.name)) if g.norm_layers else None
        out[g.name] = (s if s is not None and len(s) == g.channels else l1(graph.group(g.name))).detach().float()
    return out


@register("random", False, "seeded uniform random (the baseline every criterion must beat)")
def _random(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.channels, generator=gen) for g in graph.groups()}


def _loss_backward(model: nn.Module, batch: Batch, create_graph: bool = False) -> torch.Tensor:
    x, y = batch
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward(create_graph=create_graph)
    return loss


@register("taylor", True, "first-order Taylor |sum g*w| of removing the channel, accumulated over batches")
def _taylor(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    """Loss change of zeroing a channel, to first order: |sum over its weights of g*w| per batch
    (Molchanov et al. 2019, with |.| instead of the square), summed over batches.

    Measured on ResNet-20 / Fashion-MNIST at 50 % FLOPs with BN recalibration: 62.2 % against
    55.1 % for the per-weight sum of |g*w| (which is SNIP's score, kept under ``snip``).
    """
    # Eval mode: BN uses its running statistics, as at deployment, so the gradient is that
    # of the deployed function.
    model.eval()
    imp = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None, multivariable=True)
    total: Scores = {}
    for batch in batches:
        _loss_backward(model, batch)
        for name, s in _by_tp(graph, imp).items():
            total[name] = total.get(name, 0) + s  # type: ignore[operator]
    return {k: v / len(batches) for k, v in total.items()}


@register("snip", True, "connection sensitivity |g*w| on a single batch (SNIP)")
def _snip(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    model.eval()
    _loss_backward(model, batches[0])
    return _by_tp(graph, tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None))


@register("hessian", True, "OBD saliency 1/2 h w**2, diag(H) by Hutchinson's estimator (low-rank deflated)")
def _hessian(
    model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int,
    probes: int = 20, rank: int = 20, hessian_batches: int = 1,
) -> Scores:
    """Optimal Brain Damage (LeCun et al. 1990): removing weight i costs 1/2 h_ii w_i**2; a
    channel costs the sum over its weights, reduced over the group's members as everywhere.

    diag(H) is estimated by Hutchinson's estimator, E_v[v * (A v)] = diag(A) for Rademacher v,
    with two variance reductions that keep it unbiased:

    * It is applied to A = W H W (W = diag(w)), whose diagonal is h_ii w_i**2, the OBD
      saliency itself; Rademacher probes on A are probes v*w on H. Per probe this cut the
      variance of the channel sums about 2.5x against estimating diag(H) and multiplying
      by w**2 afterwards.
    * Low-rank deflation (Diag++, Baston & Nakatsukasa 2022): ``rank`` Hessian-vector products
      on Rademacher probes sketch A's dominant eigenspace Q, diag(Q Q^T A) is computed from
      ``rank`` more products, and Hutchinson's estimator with ``probes`` probes covers only
      the remainder (I - Q Q^T) A. On ResNet-20 / Fashion-MNIST the top ~10 eigenvalues of A
      hold nearly all of its squared Frobenius norm (the diagonal at most ~5 %), and that mass is
      exactly the estimator's noise, so deflation removes most of it.

    Costs ``2 * rank + probes`` Hessian-vector products on the mean loss over the first
    ``hessian_batches`` batches (each product runs once per batch), and 2 * rank * (number of
    parameters) floats of memory. The model is in eval mode (BN on its running statistics,
    the deployed function). The channel estimate, unbiased, can be negative (noise, or
    curvature away from a minimum); it is clamped at 0: by OBD such a channel costs nothing.

    Why (measured on ``runs/r20-fmnist``, 50 % FLOPs, uniform keep share, accuracy after BN
    recalibration, CPU; random: 51.7 +- 7.7 %; the previous version, plain Hutchinson with 2
    probes on each of 8 batches and |h| per weight: 52.9 %):

    * Plain Hutchinson does not resolve diag(H) at any affordable probe count: with 256
      probes (8 batches x 32) the median per-weight |mean| / standard error was 0.68 and 47 %
      of the estimates were negative. |h| per weight then measures the noise, i.e. a Hessian
      row norm, not h_ii: stable across probe draws but a different criterion (51-62 % in 10 runs).
      Summed per channel before |.|, 256 probes still left the within-group spread of channel
      scores no larger than their noise (split-half within-group rank correlation ~0.18).
      Training mode (batch statistics) was no better.
    * Reference: deflated estimate on all 8 batches (1024 samples, rank 20, 20 probes, 480
      batch products, ~13 min on one CPU thread): 73.9 %.
    * Within-group rank correlation with that reference, at about 60 batch products (the
      defaults: 107 s on one CPU thread for ResNet-20): one batch, rank 20, 20 probes 0.64-0.75 (three
      runs; 64.9 %, 66.4 %, 60.8 %); one batch, rank 10, 20 probes 0.67 (64.8 %); two
      batches, rank 10, 10 probes 0.57; four batches, rank 5, 5 probes 0.41; deflation with
      each product on a different batch 0.49; no deflation, 60 probes on one batch 0.34.
      Probes and rank matter more than samples at this budget, hence the defaults: one
      batch, rank 20, 20 probes. Pass more ``hessian_batches`` where products are cheap (GPU).
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    w = torch.cat([p.detach().reshape(-1) for p in params])
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for x, y in batches[: max(1, hessian_batches)]:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True, allow_unused=True)
        grads.append([(gi, p) for gi, p in zip(g, params, strict=True) if gi is not None and gi.requires_grad])

    def whw(v: torch.Tensor) -> torch.Tensor:
        """(W H W) v for the mean loss over the batches."""
        u = dict(zip(params, (v * w).split(sizes), strict=True))
        out = torch.zeros_like(w)
        for g in grads:
            hv = torch.autograd.grad([gi for gi, _ in g], params, grad_outputs=[u[p].view_as(p) for _, p in g],
                                     retain_graph=True, allow_unused=True)
            out += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, params, strict=True)])
        return out * w / len(grads)

    def rademacher() -> torch.Tensor:
        return torch.randint(0, 2, w.shape, generator=gen).to(w.device, w.dtype).mul_(2).sub_(1)

    sal = torch.zeros_like(w)  # estimate of h_ii * w_i**2
    q = None
    if rank > 0:
        q = torch.linalg.qr(torch.stack([whw(rademacher()) for _ in range(min(rank, w.numel()))], 1))[0]
        for j in range(q.shape[1]):
            sal += q[:, j] * whw(q[:, j])
    for _ in range(probes):
        v = rademacher()
        a = whw(v)
        if q is not None:
            a -= q @ (q.T @ a)
        sal += v * a / probes
    # torch-pruning's OBD importance reads diag(H) from .grad and sums w**2 * h per channel.
    for p, s in zip(params, sal.split(sizes), strict=True):
        w2 = p.detach() ** 2
        p.grad = torch.where(w2 > 0, s.view_as(p) / w2.clamp(min=torch.finfo(w2.dtype).tiny), torch.zeros_like(w2))
    imp = tp.importance.GroupHessianImportance(group_reduction="mean", normalizer=None)
    return {k: (0.5 * v).clamp(min=0) for k, v in _by_tp(graph, imp).items()}


def pooled_outputs(model: nn.Module, names: Sequence[str], batches: Sequence[Batch],
                   absolute: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each named module's output averaged over its spatial positions (of ``|output|`` when
    ``absolute``), stacked over all batches, in eval mode without gradients; keys in the order the
    modules first ran. Also the batches' labels."""
    modules = dict(model.named_modules())
    feats: dict[str, list[torch.Tensor]] = {}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            v = out.abs() if absolute else out
            feats.setdefault(name, []).append((v.flatten(2).mean(2) if v.dim() > 2 else v).detach())
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    labels = []
    was_training = model.training
    dev = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for x, y in batches:
                model(x.to(dev))
                labels.append(y)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v).cpu() for n, v in feats.items()}, torch.cat(labels).cpu()


def _pooled_activations(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Globally average-pooled outputs of every out-layer of every group, over all batches."""
    wanted = sorted({n for g in graph.groups() for n in g.out_layers})
    feats, labels = pooled_outputs(model, wanted, batches)
    return {n: v.numpy() for n, v in feats.items()}, labels.numpy()


def _screen(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], stat: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Scores:
    feats, y = _pooled_activations(model, graph, batches)
    if len(np.unique(y)) < 2:
        raise UserError("feature screening needs samples from at least two classes; use more validation batches")
    out = {}
    for g in graph.groups():
        per_layer = [np.nan_to_num(stat(feats[n], y), nan=0.0, posinf=0.0) for n in g.out_layers if n in feats]
        per_layer = [s for s in per_layer if len(s) == g.channels]
        if not per_layer:  # a group with no out-layer activations of its own
            out[g.name] = torch.zeros(g.channels)
            continue
        out[g.name] = torch.as_tensor(np.mean(per_layer, axis=0), dtype=torch.float32)
    return out


def f_statistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One-way ANOVA F of each column of ``x`` against class labels ``y`` (scikit-learn)."""
    import warnings

    from sklearn.feature_selection import f_classif

    with warnings.catch_warnings():  # constant (e.g. dead) channels give 0/0: scored 0
        warnings.simplefilter("ignore")
        f, _ = f_classif(x, y)
    return f


def chi2_statistic(x: np.ndarray, y: np.ndarray, bins: int = 8) -> np.ndarray:
    """Pearson chi-squared of each column of ``x``, binned at its quantiles, against ``y``.

    ``bins`` = 8 quantile bins (our choice: enough resolution for a few hundred samples per
    class while keeping expected cell counts above ~5 on a 1-2k sample validation subset).
    Constant channels fall into one bin and score 0.
    """
    classes, yi = np.unique(y, return_inverse=True)
    k = len(classes)
    out = np.zeros(x.shape[1])
    for c in range(x.shape[1]):
        edges = np.unique(np.quantile(x[:, c], np.linspace(0, 1, bins + 1)[1:-1]))
        b = np.searchsorted(edges, x[:, c], side="right")
        table = np.bincount(b * k + yi, minlength=(len(edges) + 1) * k).reshape(-1, k).astype(float)
        table = table[table.sum(1) > 0]
        if len(table) < 2:
            continue
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        mask = expected > 0
        out[c] = (((table - expected) ** 2)[mask] / expected[mask]).sum()
    return out


@register("fstat", True, "feature screening: ANOVA F of pooled activation vs labels")
def _fstat(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    return _screen(model, graph, batches, f_statistic)


@register("chi2", True, "feature screening: chi-squared of binned pooled activation vs labels")
def _chi2(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    return _screen(model, graph, batches, chi2_statistic)
