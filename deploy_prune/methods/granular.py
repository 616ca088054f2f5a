"""Weight pruning by units larger than one weight, and node-aware weight pruning.

- ``structured`` (the seed's StructuredPruning: L1 norm at filter, kernel or intra-kernel
  granularity, optionally a particle filter over per-layer ratios, after Anwar et al. 2017).
  Units, scored by their L1 norm, are zeroed *in place* (``--sparsity`` counts their weights):
  ``filter`` = a whole output filter, ``kernel`` = one k x k kernel (an output/input channel
  pair), ``intra-kernel`` = one kernel position of a filter across its input channels (our
  reading of "intra-kernel strided": the same position pattern inside a filter). A linear layer's
  unit is a row for ``filter`` and one weight otherwise. Unit counts round up, so the sparsity
  lands at or just above the target. Zeroed filters still run on a dense backend; to remove
  channels for real use ``l1-structured`` / ``uniform`` / ``deeplsp``.
  ``search: particle-filter`` draws per-layer shares around the target (rescaled so the weighted
  total stays at the target), weighs each particle by the validation-subset accuracy of the
  masked model (no retraining), resamples and perturbs for ``rounds``; the best particle wins.
- ``weight-to-node``: a weight's importance is its magnitude times the importance of the node
  (output channel) it feeds, the mean |activation| of that channel on the score batches (scaled
  to 1 at the layer's strongest node). Removal is probabilistic but exact in count: per layer,
  the weights to prune are drawn without replacement with probability falling with importance
  (Gumbel top-k on log importance, seeded).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.methods.imp import SCORES, IterativePruning, _register
from deploy_prune.transforms import Masks, apply_masks, weight_layers

if TYPE_CHECKING:
    from deploy_prune.methods.context import MethodContext

GRANULARITIES = ("filter", "kernel", "intra-kernel")


def unit_view(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """``w`` as (units, weights per unit), a view in the weight's own memory order where possible."""
    if w.dim() == 2:  # linear
        return w if granularity == "filter" else w.reshape(-1, 1)
    o, i, kh, kw = w.shape
    if granularity == "filter":
        return w.reshape(o, -1)
    if granularity == "kernel":
        return w.reshape(o * i, kh * kw)
    return w.permute(0, 2, 3, 1).reshape(o * kh * kw, i)  # intra-kernel: (filter, position) x input channels


def unit_mask(w: torch.Tensor, granularity: str, share: float) -> torch.Tensor:
    """Keep-mask zeroing the ``share`` of units with the smallest L1 norm (rounded up)."""
    units = unit_view(w.detach(), granularity)
    n = units.shape[0]
    k = min(n - 1, math.ceil(share * n))  # a layer keeps at least one unit
    keep_units = torch.ones(n, dtype=torch.bool, device=w.device)
    if k > 0:
        keep_units[units.abs().sum(1).topk(k, largest=False).indices] = False
    keep = keep_units[:, None].expand_as(units)
    if w.dim() == 4 and granularity == "intra-kernel":
        o, i, kh, kw = w.shape
        return keep.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()
    return keep.reshape(w.shape).contiguous()


@_register("structured", "L1-norm pruning of filters, kernels or intra-kernel positions in place; uniform or particle-filter ratios")
class StructuredPruning(IterativePruning):
    kind = "structured"

    def __init__(self, iterations: int = 1, retrain_epochs: float = 1.0, granularity: str = "kernel",
                 search: str = "uniform", particles: int = 8, rounds: int = 3) -> None:
        super().__init__(iterations, retrain_epochs)
        if granularity not in GRANULARITIES:
            raise UserError(f"--method structured: granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        if search not in ("uniform", "particle-filter") or particles < 2 or rounds < 1:
            raise UserError("--method structured: search is uniform or particle-filter, with particles >= 2 and rounds >= 1")
        self.granularity, self.search, self.particles, self.rounds = granularity, search, particles, rounds
        self.shares: dict[str, float] = {}

    def settings(self) -> dict[str, Any]:
        extra = {"particles": self.particles, "rounds": self.rounds} if self.search == "particle-filter" else {}
        return {**super().settings(), "granularity": self.granularity, "search": self.search, **extra,
                "layer_shares": {k: round(v, 4) for k, v in self.shares.items()} or None}

    def _masks(self, layers: dict[str, nn.Module], shares: dict[str, float]) -> Masks:
        out: Masks = {}
        for n, m in layers.items():
            w: torch.Tensor = m.weight  # type: ignore[assignment]
            out[n] = unit_mask(w, self.granularity, shares[n]) & (w != 0)
        return out

    def prune_once(self, run: MethodContext, layers: dict[str, nn.Module], t: int, target: float) -> Masks:
        share = 1 - (1 - target) ** (t / self.iterations)  # this iteration's target, as the engine's schedule
        shares = {n: share for n in layers}
        if self.search == "particle-filter":
            shares = self._particle_filter(run, layers, share)
        self.shares = shares
        return self._masks(layers, shares)

    def _particle_filter(self, run: MethodContext, layers: dict[str, nn.Module], share: float) -> dict[str, float]:
        import copy

        names = list(layers)
        mods: dict[str, Any] = layers
        sizes = np.array([mods[n].weight.numel() for n in names], dtype=np.float64)
        rng = np.random.default_rng(run.seed)

        def normalise(z: np.ndarray) -> np.ndarray:
            z = np.clip(z, 0.0, 0.95)
            for _ in range(20):  # rescale so the weighted total is the target, clipping as needed
                z = np.clip(z * share * sizes.sum() / max(float((z * sizes).sum()), 1e-12), 0.0, 0.95)
            return z

        def score(z: np.ndarray) -> float:
            trial = copy.deepcopy(run.model)
            tl = weight_layers(trial, list(run.ignore))
            apply_masks(trial, self._masks({n: tl[n] for n in names}, dict(zip(names, z, strict=True))))
            return run.subset_accuracy(trial)

        parts = [normalise(np.full(len(names), share))] + [normalise(rng.normal(share, 0.15, len(names)))
                                                          for _ in range(self.particles - 1)]
        best, best_acc = parts[0], -1.0
        for _ in range(self.rounds):
            accs = np.array([score(z) for z in parts])
            if accs.max() > best_acc:
                best, best_acc = parts[int(accs.argmax())], float(accs.max())
            w = np.exp((accs - accs.max()) / 0.01)  # likelihood: a point of accuracy is worth e^1
            idx = rng.choice(len(parts), size=len(parts), p=w / w.sum())
            parts = [normalise(parts[i] + rng.normal(0, 0.05, len(names))) for i in idx]
        run.say(f"particle filter: best subset accuracy {100 * best_acc:.2f} % over {self.rounds} rounds of {self.particles}")
        return dict(zip(names, best.tolist(), strict=True))


def weight_to_node_scores(layers: dict[str, nn.Module], run: MethodContext) -> dict[str, torch.Tensor]:
    """log(|w| * node importance) + Gumbel noise: the lowest are a draw favouring unimportant weights."""
    from deploy_prune.importance import pooled_outputs

    pooled, _ = pooled_outputs(run.model, list(layers), run.score_batches(), absolute=True)
    acts = {n: v.sum(0) for n, v in pooled.items()}
    g = torch.Generator().manual_seed(run.seed + run.steps_recorded)
    out = {}
    for n, m in layers.items():
        w = m.weight.detach().abs()  # type: ignore[union-attr,operator]
        node = (acts[n] / acts[n].max().clamp_min(1e-12)).to(w.device)
        imp = w * node.view(-1, *([1] * (w.dim() - 1)))
        u = torch.rand(w.shape, generator=g).to(w.device).clamp(1e-12, 1 - 1e-12)
        out[n] = imp.clamp_min(1e-30).log() - (-u.log()).log()  # log importance + Gumbel(0, 1)
    return out


SCORES["weight-to-node"] = weight_to_node_scores


@_register("weight-to-node", "weights scored by magnitude x the importance of the node they feed; exact, probabilistic removal")
class WeightToNode(IterativePruning):
    score = "weight-to-node"

    def __init__(self, iterations: int = 2, retrain_epochs: float = 1.0) -> None:
        super().__init__(iterations, retrain_epochs)
