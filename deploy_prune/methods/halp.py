"""HALP-style latency-saliency knapsack ("HALP: Hardware-Aware Latency Pruning", Shen et al. 2022).

Per group one allowed width, chosen by the latency knapsack of ``allocate.allocate``; the value
of keeping ``k`` channels of a group is the summed importance of its ``k`` best channels, in the
criterion's own units (``taylor``: the loss change of removing each channel), so channels of
different groups compete directly, priced by the target's latency table. There is no fitted
sensitivity curve and no sensitivity analysis: DeepLSP's value is this one rescaled per group by
a least-squares fit to one-shot accuracy drops, and this method is the control that tells
whether that fit pays (docs/peer-comparison.md, "Which allocation": it does at deep cuts).

HALP itself prunes every few hundred minibatches while training, with the latency target
lowered linearly; here the pipeline's structured steps (``--steps``, each followed by
``--step-fraction`` of an epoch of fine-tuning) play that part, and the measured closed loop
corrects the table's prices as for every latency-budget method. It is purely structured: no
unstructured masks unless ``--amount`` asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from deploy_prune.methods import METHODS
from deploy_prune.methods.deeplsp import DeepLSP

if TYPE_CHECKING:
    from deploy_prune.methods.context import MethodContext


def importance_weights(scores: dict[str, Any]) -> dict[str, float]:
    """Per group, its total (non-negative) importance: with it as the weight,
    ``weighted_retained_value`` is the importance kept minus a constant per group."""
    return {n: float(np.clip(np.asarray(s, dtype=np.float64), 0, None).sum()) for n, s in scores.items()}


@METHODS.register("halp", "latency knapsack on channel importance alone (HALP): value = importance kept, cost = LUT latency")
class Halp(DeepLSP):
    name = "halp"
    kind = "structured"

    def __init__(self, criterion: str = "taylor", amount: float | str = 0.0, tolerance: float = 0.005,
                 candidates: int = 1, spread: float = 0.5, recover_steps: int = 24) -> None:
        super().__init__(criterion, amount, tolerance, candidates, spread, recover_steps)

    def settings(self) -> dict[str, Any]:
        return self._common_settings()

    def setup(self, run: MethodContext) -> None:
        """Nothing to fit: the value is the criterion's scores, re-computed at every step."""

    def value_weights(self, scores: dict[str, Any]) -> dict[str, float]:
        """The groups' total importance, so that the value is the importance kept."""
        return importance_weights(scores)
