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
| hessian | data+labels | OBD saliency 1/2 |h| w**2 with diag(H) from Hutchinson's estimator |
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


@register("hessian", True, "OBD saliency 1/2 h w**2, diag(H) by Hutchinson's estimator")
def _hessian(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int, probes: int = 2) -> Scores:
    """diag(H) ~ E_v[v * (H v)] with Rademacher v (Hutchinson 1990; as in HAWQ/PyHessian).

    ``probes`` Rademacher vectors per batch (2, our choice: the estimate is averaged over
    batches as well). OBD derives its saliency at a minimum, where diag(H) >= 0; the
    estimate is noisy and can be negative elsewhere, so we use |diag(H)| (our choice), which
    keeps a zero weight at zero saliency and a sharp direction expensive to prune.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    diag = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(probes):
            vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.device, p.dtype).mul_(2).sub_(1) for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            for d, v, hv in zip(diag, vs, hvs, strict=True):
                d.add_(v * hv)
            n += 1
    # torch-pruning's OBD importance reads diag(H) from .grad and sums w**2 * h per channel.
    for p, d in zip(params, diag, strict=True):
        p.grad = (d / max(n, 1)).abs()
    imp = tp.importance.GroupHessianImportance(group_reduction="mean", normalizer=None)
    return {k: 0.5 * v for k, v in _by_tp(graph, imp).items()}


def _pooled_activations(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Globally average-pooled outputs of every out-layer of every group, over all batches."""
    modules = dict(model.named_modules())
    wanted = {n for g in graph.groups() for n in g.out_layers}
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            feats[name].append(out.flatten(2).mean(2) if out.dim() > 2 else out)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in wanted]
    labels = []
    try:
        model.eval()
        with torch.no_grad():
            for x, y in batches:
                model(x)
                labels.append(y)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v).cpu().numpy() for n, v in feats.items()}, torch.cat(labels).cpu().numpy()


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
