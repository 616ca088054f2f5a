"""Channel importance criteria behind one protocol, registered by name.

``score_groups(model, graph, name, batches)`` returns, for every prunable group, one score
per channel (higher = more important). Weight and activation criteria score the channel in
every member layer of the group (the convs/linears whose outputs or inputs the channel
touches and its norm layers), then reduce by the **mean over members**, so a residual group
of six convs is not scored six times as high as a plain one. The loss-based criteria
(taylor, fisher, hessian) instead put one gate on the whole coupled channel
(``channel_gates``) and score its removal directly. Scores are raw (not normalised per
group); allocation normalises as it needs.

Weight-based criteria reuse torch-pruning's group importance classes, which already map
indices through concatenations, flattening and residual couplings; what they do not offer
(channel gates, Hutchinson's Hessian diagonal, activation statistics) is written here.

| name | needs | score per channel |
|---|---|---|
| l1, l2 | weights | sum of |w| (l1) or w**2 (l2) over the channel's weights |
| bn-scale | weights | |gamma| of the channel's BatchNorm (network slimming) |
| taylor | data+labels | first-order Taylor estimate of removing the channel: (d loss / d gate)**2 per sample, averaged over batches |
| fisher | data | the same with labels drawn from the model: Fisher information (Gauss-Newton diagonal) of the gate |
| hessian | data+labels | OBD saliency 1/2 h of the channel's gate, diag(H) by Hutchinson's estimator with low-rank deflation |
| fstat | data+labels | ANOVA F-statistic of the channel's pooled activation vs the labels |
| chi2 | data+labels | chi-squared statistic of the binned pooled activation vs the labels |
| snip | data+labels | connection sensitivity |g*w| on one batch |
| random | - | seeded uniform random |

This is one module, over the usual length, because it is the criteria registry: every criterion in
the table above registers here when the package is imported, beside the machinery the data-based
ones share (``channel_gates`` for taylor, fisher and hessian; ``pooled_outputs`` for fstat and
chi2), so importing the package fills ``CRITERIA`` without a list of submodules to keep in step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
    if not crit.needs_data:
        batches = []
    elif not all(isinstance(b, (tuple, list)) and len(b) == 2 and len(b[0]) == len(b[1]) for b in batches):
        raise UserError(f"criterion {criterion!r} needs (input, label) batches, one label per input; for this model's data "
                        "use --criterion l1, l2 or bn-scale")
    else:
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


def _gate_points(graph: ModelGraph) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """Where removing a group's channel zeroes an activation: (group, module, the module's channel
    indices, their positions in the group's scores) for each of the group's norm layers, or, in a
    group without norm layers, each of its out-layers. Removal zeroes the normalised output
    (BN's shift goes with the channel), so a gate there models it exactly."""
    modules = dict(graph.model.named_modules())
    points = []
    for info in graph.groups():
        group = graph.group(info.name)
        position = {r: i for i, r in enumerate(group.items[0].root_idxs)}
        members = set(info.norm_layers or info.out_layers)
        for item in group.items:
            name = graph.names.get(item.dep.target.module)
            if name in members and getattr(item.dep.handler, "__name__", "") == "prune_out_channels":
                points.append((info.name, modules[name], torch.as_tensor(list(item.idxs)),
                               torch.as_tensor([position[r] for r in item.root_idxs])))
    return points


@contextmanager
def channel_gates(graph: ModelGraph, gates: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Multiply every channel of every group by its gate while the block runs: ``gates[group]``
    has shape ``[channels]`` (one gate per channel) or ``[N, channels]`` (one per sample, for
    per-sample derivatives). A channel's members share its gate, so d loss / d gate is the
    derivative of removing the whole coupled channel (gate 1 -> 0)."""
    handles = []
    for gname, module, idx, pos in _gate_points(graph):
        # channels are dim 1 of conv/norm outputs, the last dim of linear/layer-norm outputs
        last = isinstance(module, (nn.Linear, nn.LayerNorm)) and not isinstance(module, nn.modules.batchnorm._BatchNorm)

        def hook(m: nn.Module, inp: tuple, out: torch.Tensor, gname: str = gname, idx: torch.Tensor = idx,
                 pos: torch.Tensor = pos, last: bool = last) -> torch.Tensor:
            g = gates[gname]
            c = out.shape[-1] if last else out.shape[1]
            mult = torch.ones(*g.shape[:-1], c, dtype=out.dtype, device=out.device)
            mult = mult.index_copy(-1, idx.to(out.device), g[..., pos.to(out.device)].to(out.dtype))
            n = -1 if g.dim() > 1 else 1
            shape = (n, *([1] * (out.dim() - 2)), c) if last else (n, c, *([1] * (out.dim() - 2)))
            return out * mult.reshape(shape)
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def gate_gradients(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], sampled_labels: int = 0,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-sample d loss_n / d gate for every group: ``[samples, channels]``, stacked over batches,
    in eval mode (samples independent, BN on running statistics as deployed). With
    ``sampled_labels`` = k > 0 the labels are drawn k times from the model's own softmax instead
    of the data's (rows: k per input)."""
    model.eval()
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {g.name: [] for g in graph.groups()}
    for x, y in batches:
        if sampled_labels:
            with torch.no_grad():
                p = F.softmax(model(x), 1).cpu()
            labels = [torch.multinomial(p, 1, generator=gen).squeeze(1).to(y.device) for _ in range(sampled_labels)]
        else:
            labels = [y]
        for lab in labels:
            gates = {g.name: torch.ones(x.shape[0], g.channels, device=x.device, dtype=dtype, requires_grad=True)
                     for g in graph.groups()}
            with channel_gates(graph, gates):
                loss = F.cross_entropy(model(x), lab, reduction="sum")  # sum: row n is sample n's own gradient
            for name, grad in zip(gates, torch.autograd.grad(loss, list(gates.values())), strict=True):
                out[name].append(grad.detach())
    return {k: torch.cat(v) for k, v in out.items()}


@register("taylor", True, "first-order Taylor of removing the channel, (d loss / d gate)**2 per sample, averaged")
def _taylor(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    """First-order Taylor estimate of the loss change of removing a channel (Molchanov et al.
    2017/2019): a gate multiplies the channel wherever removal zeroes it (after its norm
    layers, shared by coupled members), and d loss / d gate = sum over the channel's
    activations of a * dL/da = sum over the removed parameters of g * w. Squared per sample and
    averaged over every sample of every batch: Molchanov 2019's squared form at sample
    granularity (their minibatch-level square cancels gradients of opposite sign between
    samples), which is also the empirical Fisher of the gate (Theis et al. 2018).

    Our choices, measured on ``runs/r20-fmnist`` (ResNet-20 / Fashion-MNIST), one-shot 50 % FLOPs
    with BN recalibration (random: 32.4 +- 6.3 %), 8 score batches: this form 46.6 +- 4.0 % over
    three draws of batches (43.7 % on the first); on that first draw, the same squared per
    minibatch 42.3 %, |.| per sample 39.4 %, and the previous form, torch-pruning's multivariable
    |sum g*w| over every member parameter (which counts one removal several times, through the
    conv's weights, its BN and the next conv's inputs), 29.3 %. Centring the gate (removal as mean
    replacement, which BN recalibration partly makes true) did not help (34.8 %). With the data's
    labels most samples of a trained model have near-zero gradients; ``fisher`` draws the labels
    from the model instead and ranks better (57.1 +- 3.1 %).
    """
    d = gate_gradients(model, graph, batches)
    return {k: (v ** 2).mean(0) for k, v in d.items()}


@register("fisher", True, "Fisher information of the channel's gate, labels drawn from the model (GGN diagonal)")
def _fisher(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int, label_draws: int = 4) -> Scores:
    """E_x E_{y ~ p(y|x)} (d loss / d gate)**2: the true Fisher information of each channel's
    gate, i.e. the Gauss-Newton diagonal of the loss Hessian along "remove this channel",
    estimated with ``label_draws`` labels drawn from the model's softmax per input (our choice:
    4; 4 x 8 batches of backward passes cost ~11 s for ResNet-20 on one CPU thread).

    Unlike ``taylor`` (the empirical Fisher, with the data's labels), it does not vanish on the
    samples the model already fits, so it measures how much the channel moves the prediction.
    Measured on ``runs/r20-fmnist``, one-shot 50 % FLOPs with BN recalibration: 54.3 % (32
    batches, where taylor gave 45.8 %; over three draws of 8: 57.1 +- 3.1 %, taylor 46.6 +- 4.0 %) against
    random's 32.4 +- 6.3 %.
    """
    d = gate_gradients(model, graph, batches, sampled_labels=label_draws, seed=seed)
    return {k: (v ** 2).mean(0) for k, v in d.items()}


@register("snip", True, "connection sensitivity |g*w| on a single batch (SNIP)")
def _snip(model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int) -> Scores:
    model.eval()
    _loss_backward(model, batches[0])
    return _by_tp(graph, tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None))


def deflated_hutchinson(hvp: Callable[[torch.Tensor], torch.Tensor], dim: int, probes: int, rank: int,
                        gen: torch.Generator, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unbiased estimate of diag(H) from products ``hvp(v) = H v``: Hutchinson's estimator
    E_v[v * H v] (Rademacher v) on the remainder after low-rank deflation (Diag++, Baston &
    Nakatsukasa 2022): ``rank`` products on random probes sketch H's dominant eigenspace Q,
    diag(Q Q^T H) is computed from ``rank`` more, and ``probes`` probes cover (I - Q Q^T) H.
    ``2 * rank + probes`` products; with ``rank`` >= ``dim`` the result is exact."""
    def rademacher() -> torch.Tensor:
        return torch.randint(0, 2, (dim,), generator=gen).to(device, dtype).mul_(2).sub_(1)

    diag = torch.zeros(dim, device=device, dtype=dtype)
    q = None
    if rank > 0:
        q = torch.linalg.qr(torch.stack([hvp(rademacher()) for _ in range(min(rank, dim))], 1))[0]
        for j in range(q.shape[1]):
            diag += q[:, j] * hvp(q[:, j])
    for _ in range(probes):
        v = rademacher()
        a = hvp(v)
        if q is not None:
            a -= q @ (q.T @ a)
        diag += v * a / probes
    return diag


@register("hessian", True, "OBD saliency 1/2 h of the channel's gate, diag(H) by Hutchinson's estimator (deflated)")
def _hessian(
    model: nn.Module, graph: ModelGraph, batches: Sequence[Batch], seed: int,
    probes: int = 20, rank: int = 20, hessian_batches: int = 1,
) -> Scores:
    """Optimal Brain Damage (LeCun et al. 1990) on the channel itself: a gate m (= 1) multiplies
    each channel wherever its removal zeroes it (``channel_gates``), and removing the channel
    (m: 1 -> 0) costs 1/2 h m**2 = 1/2 h, h the diagonal entry of the loss Hessian for that gate
    (the gradient term vanishes at a trained minimum, OBD's assumption). Since the gate scales
    the channel's removed parameters together, h = d^T H d for d = the removed weights: the
    second-order cost of the removal with the cross terms between the channel's own weights,
    which the per-weight OBD sum (sum of 1/2 h_ii w_i**2) drops.

    diag(H) over all gates (a few hundred for ResNet-20) comes from ``deflated_hutchinson``:
    ``rank`` = 20, ``probes`` = 20 (60 Hessian-vector products by double backprop on the mean
    loss over the first ``hessian_batches`` batches; ~45 s for ResNet-20 on one CPU thread). The
    unbiased estimate can be negative (noise, or curvature away from a minimum); it is clamped
    at 0: by OBD such a channel costs nothing.

    Why the gate (our choice; the paper's OBD is per weight), measured on ``runs/r20-fmnist``,
    one-shot 50 % FLOPs with BN recalibration, random 32.4 +- 6.3 %: the gate form 56.8 % on the
    first draw of batches, 46.9 +- 7.2 % over three; the per-weight sum with the same estimator
    over all parameters 41.9 % (first draw). The spread between draws is the batch, not the
    estimator: 4 batches at rank 10 / 10 probes gave 45.8 +- 2.6 %, 2 batches at 20 / 20 gave
    46.4 +- 4.8 %, both at 1.4x the cost, so the defaults stay. (The per-weight version needed
    deflation as well: plain Hutchinson did not resolve diag(H) of 270k weights at any affordable
    probe count.)
    """
    model.eval()
    groups = graph.groups()
    sizes = [g.channels for g in groups]
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    gates = {g.name: torch.ones(g.channels, device=device, dtype=dtype, requires_grad=True) for g in groups}
    grads = []
    for x, y in batches[: max(1, hessian_batches)]:
        with channel_gates(graph, gates):
            loss = F.cross_entropy(model(x), y)
        grads.append(torch.autograd.grad(loss, list(gates.values()), create_graph=True))

    def no_second_derivative(e: RuntimeError) -> UserError:
        op = str(e).split("derivative for ")[-1].split(" is not implemented")[0]
        return UserError(f"criterion 'hessian' needs second derivatives, which torch does not implement for {op} "
                         f"in this model; use --criterion fisher (the Gauss-Newton part of the same Hessian)")

    def hvp(v: torch.Tensor) -> torch.Tensor:
        """H v for the mean loss over the batches."""
        out = torch.zeros_like(v)
        for g in grads:
            hv = torch.autograd.grad(g, list(gates.values()), grad_outputs=list(v.split(sizes)), retain_graph=True)
            out += torch.cat([h.reshape(-1) for h in hv])
        return out / len(grads)

    try:
        h = deflated_hutchinson(hvp, sum(sizes), probes, rank, torch.Generator().manual_seed(seed), device, dtype)
    except RuntimeError as e:
        if "is not implemented" not in str(e):
            raise
        raise no_second_derivative(e) from None
    return {g.name: (0.5 * s).clamp(min=0) for g, s in zip(groups, h.split(sizes), strict=True)}


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
