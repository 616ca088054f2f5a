"""Physical edits of a model: channel removal to given widths, and unstructured weight masks.

Choosing *how much* to remove is ``allocate``'s job and *which* channels the criteria's; this
module only performs the edit and records it, so a pruned model can be rebuilt from its
registered architecture, its per-group widths and its state dict (``rebuild_pruned``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from deploy_prune.graph import PRUNABLE, ModelGraph


def group_widths(graph: ModelGraph) -> dict[str, int]:
    """Channels each prunable group has now, by group name (stable across pruning)."""
    return {g.name: g.channels for g in graph.groups()}


def prune_to_widths(model: nn.Module, input_shape: Sequence[int], widths: Mapping[str, int],
                    ignore: Sequence[str] = ()) -> nn.Module:
    """Cut each group of ``model`` (in place) down to ``widths[group]`` channels, keeping the first
    ones: for rebuilding a pruned architecture before loading its state dict, and for latency
    candidates (which channels go does not change latency)."""
    g = ModelGraph(model, input_shape, ignore=ignore)
    unknown = set(widths) - {i.name for i in g.groups()}
    if unknown:
        raise ValueError(f"no prunable group(s) {sorted(unknown)} in this model")
    g.prune({i.name: list(range(widths[i.name], i.channels)) for i in g.groups()
             if widths.get(i.name, i.channels) < i.channels})
    return model


RANK_SUFFIX = ":rank"


def architecture_widths(graph: ModelGraph) -> dict[str, int]:
    """What ``rebuild_pruned`` needs to rebuild ``graph.model``: every group's width and every
    factorised layer's rank (``<layer>:rank``). The ranks are read off the layers: the dependency
    graph has no group for a rank of 1 (a one-channel group cannot be pruned)."""
    from deploy_prune.transforms.lowrank import lowrank_layers

    return {**{f"{n}{RANK_SUFFIX}": r for n, r in lowrank_layers(graph.model).items()}, **group_widths(graph)}


def rebuild_pruned(model: nn.Module, pruned: Mapping[str, object], input_shape: Sequence[int]) -> nn.Module:
    """Apply a checkpoint's ``pruned`` record ({"widths": ..., "ignore": ...}) to a freshly built
    model: cut the groups to their widths, then factorise the layers whose ``<layer>:rank``
    group is listed, at that rank (``transforms.lowrank``). The weights come from the state dict."""
    from deploy_prune.transforms.lowrank import factorize

    widths: Mapping[str, int] = pruned["widths"]  # type: ignore[assignment]
    ranks = {k[: -len(RANK_SUFFIX)]: v for k, v in widths.items() if k.endswith(RANK_SUFFIX)}
    base = {k: v for k, v in widths.items() if not k.endswith(RANK_SUFFIX)}
    prune_to_widths(model, input_shape, base, pruned.get("ignore", ()))  # type: ignore[arg-type]
    return factorize(model, ranks)


# ---------------------------------------------------------------------------------------------
# Unstructured masks
# ---------------------------------------------------------------------------------------------
Masks = dict[str, torch.Tensor]


def weight_layers(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Module]:
    skip = set(skip)
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in skip}


def magnitude_masks(model: nn.Module, amount: float | Mapping[str, float], skip: Iterable[str] = ()) -> Masks:
    """Per layer, a mask zeroing the ``amount`` share of its smallest-magnitude weights.

    Layer-wise rather than global: the share is the same in every layer (or given per layer by
    a mapping, for the adaptive mode), so no layer is emptied. Weights already zero count
    towards the share, which keeps repeated masking idempotent.
    """
    masks: Masks = {}
    for name, mod in weight_layers(model, skip).items():
        a = amount.get(name, 0.0) if isinstance(amount, Mapping) else amount
        w: torch.Tensor = mod.weight.detach()  # type: ignore[assignment,operator]
        k = int(a * w.numel())
        if k <= 0:
            continue
        thresh = w.abs().flatten().kthvalue(k).values
        masks[name] = w.abs() > thresh
    return masks


def nm_masks(model: nn.Module, n: int, m: int, skip: Iterable[str] = ()) -> tuple[Masks, list[str]]:
    """N:M semi-structured masks: in every run of ``m`` consecutive weights along the reduction
    (input-channel) axis, keep the ``n`` largest. This is the 2:4 pattern sparse tensor cores
    (NVIDIA Ampere and later, TensorRT's sparse-weights mode) execute faster; dense backends run
    it as ordinary zeros. Layers whose input channels are not a multiple of ``m`` (and depthwise
    convs) are left dense and named in the second value."""
    masks: Masks = {}
    skipped: list[str] = []
    for name, mod in weight_layers(model, skip).items():
        w: torch.Tensor = mod.weight.detach()  # type: ignore[assignment,operator]
        cin = w.shape[1]
        if cin % m or cin < m:
            skipped.append(name)
            continue
        rows = w.permute(0, *range(2, w.dim()), 1).reshape(-1, m)  # (out, kh, kw, in) in runs of m along in
        keep = torch.zeros_like(rows, dtype=torch.bool)
        keep.scatter_(1, rows.abs().topk(n, dim=1).indices, True)
        shape = (w.shape[0], *w.shape[2:], cin)
        masks[name] = keep.reshape(shape).permute(0, w.dim() - 1, *range(1, w.dim() - 1)).contiguous()
    return masks, skipped


def combine_masks(a: Masks, b: Masks) -> Masks:
    """Keep a weight only where every mask that covers its layer keeps it."""
    return {k: (a[k] & b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {*a, *b}}  # type: ignore[misc]


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the masked weights (after every optimiser step during fine-tuning, and before export)."""
    mods = dict(model.named_modules())
    for name, m in masks.items():
        w = mods[name].weight
        w.mul_(m.to(w.device, w.dtype))


def sparsity(model: nn.Module, skip: Iterable[str] = ()) -> float:
    """Share of zero weights over all conv/linear weights (but ``skip``)."""
    tot = zeros = 0
    for m in weight_layers(model, skip).values():
        w: torch.Tensor = m.weight  # type: ignore[assignment]
        tot += w.numel()
        zeros += int((w == 0).sum())
    return zeros / max(tot, 1)
