"""Information flow (IF) and gradient flow (GF) of a network, and the stopping rule of "Information Consistent Pruning" (InCoP).

* **IF** between consecutive layers l, l+1 (Eq. 2): ``Delta[i, j] = E[f_i^l f_j^(l+1)]``, the
  expected product of filter i's output in layer l and filter j's in layer l+1. The paper leaves
  open how a filter's feature map becomes one number; we average it over its spatial positions,
  so ``Delta = F_l^T F_(l+1) / N`` over the N images of fixed batches. "Consecutive" is the
  forward execution order of the conv/linear layers (a residual block's shortcut conv sits
  between the block's convs in that order; we keep the order as it is).
* **GF** (Eq. 3): per layer, the gradient of the loss with respect to its weights, masked. We
  keep its L2 norm per layer (the vector g in R^L that the paper compares), averaged over the
  same fixed batches, computed in eval mode so that measuring does not move BatchNorm statistics.
* **Distance** ``||Phi - Phi*||``: the paper does not fix the norm or a scale for epsilon. We use
  a *relative* distance, so one epsilon serves every model: for GF ``||g - g*|| / ||g*||``; for IF
  the mean over layer pairs of ``||Delta_l - Delta*_l||_F / ||Delta*_l||_F``.
* **Scale of epsilon** (``scale``): the paper compares ``||Phi_e - Phi*||`` with an absolute
  epsilon. ``"dense"`` (IF's default) keeps that reading on the relative distance above.
  ``"pruned"`` (GF's default) stops once the distance is within ``eps`` times the distance
  measured right after the pruning step, i.e. retraining has undone a share ``1 - eps`` of what
  the cut disturbed. It is GF's default because the dense network sits at a minimum of its
  training loss, so ``||g*||`` is small and the dense-relative GF distance runs from 1.3 to 212
  between epochs on ResNet-20 (benchmarks/results/incop_vs_sap.md), which no fixed epsilon can
  gate. With either scale (same file, T = 15, E = 4) the paper's savings do not reproduce. IF's distance grows with sparsity and barely moves in retraining, so IF stopped
  early only in the first three iterations (85 % of SAP's epochs). Retraining *raised* GF's
  distance, so GF stopped early only after prunes that left a large one (78 %).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deploy_prune.checks import check_number
from deploy_prune.transforms import Masks, weight_layers

Batch = tuple[torch.Tensor, torch.Tensor]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def information_flow(model: nn.Module, batches: Sequence[Batch], skip: Sequence[str] = ()) -> list[np.ndarray]:
    """Delta_l for every pair of consecutive conv/linear layers (execution order)."""
    from deploy_prune.importance import pooled_outputs

    pooled, _ = pooled_outputs(model, list(weight_layers(model, skip)), batches)  # keys in execution order
    feats = [v.double() for v in pooled.values()]
    return [(a.T @ b / a.shape[0]).numpy() for a, b in zip(feats, feats[1:], strict=False)]


def gradient_flow(model: nn.Module, batches: Sequence[Batch], masks: Masks | None = None, skip: Sequence[str] = ()) -> np.ndarray:
    """Per layer, the L2 norm of the masked loss gradient w.r.t. its weights, mean over batches."""
    layers = weight_layers(model, skip)
    norms = np.zeros(len(layers))
    was_training = model.training
    model.eval()
    dev = _device(model)
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
            for i, (name, mod) in enumerate(layers.items()):
                g: torch.Tensor | None = mod.weight.grad  # type: ignore[union-attr,assignment]
                if g is None:
                    continue
                if masks and name in masks:
                    g = g * masks[name].to(g.device, g.dtype)
                norms[i] += float(g.norm())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return norms / max(len(batches), 1)


def flow_distance(phi: Any, star: Any) -> float:
    """Relative distance of a flow to the dense network's (see the module doc)."""
    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), 1e-12)

    if isinstance(star, list):
        return float(np.mean([rel(a, b) for a, b in zip(phi, star, strict=True)]))
    return rel(phi, star)


class FlowStop:
    """InCoP's rule: stop retraining once the flow is within ``eps`` of the dense network's."""

    def __init__(self, kind: str, eps: float, batches: Sequence[Batch], skip: Sequence[str] = (),
                 scale: str = "dense") -> None:
        if kind not in ("if", "gf"):
            raise ValueError(f"flow kind must be 'if' or 'gf', got {kind!r}")
        if scale not in ("dense", "pruned"):
            raise ValueError(f"epsilon scale must be 'dense' or 'pruned', got {scale!r}")
        # A NaN epsilon would never stop retraining early, silently: refuse it where it enters.
        check_number("-O eps", eps, lo=0)
        self.kind, self.eps, self.batches, self.skip, self.scale = kind, eps, batches, list(skip), scale
        self.star: Any = None
        self.masks: Masks | None = None
        self.after_prune: float = float("nan")
        self.distances: list[float] = []

    def flow(self, model: nn.Module) -> Any:
        if self.kind == "if":
            return information_flow(model, self.batches, self.skip)
        return gradient_flow(model, self.batches, self.masks, self.skip)

    def reference(self, dense: nn.Module) -> None:
        """Phi* of the trained dense network (Algorithm 1, lines 3-4)."""
        self.star = self.flow(dense)

    def begin(self, model: nn.Module, masks: Masks) -> None:
        """A new retraining phase: the masks just applied, and the distance they left."""
        self.masks, self.distances = masks, []
        self.after_prune = flow_distance(self.flow(model), self.star)

    @property
    def threshold(self) -> float:
        return self.eps * self.after_prune if self.scale == "pruned" else self.eps

    def __call__(self, model: nn.Module, epochs_done: int) -> bool:
        d = flow_distance(self.flow(model), self.star)
        self.distances.append(d)
        return d <= self.threshold
