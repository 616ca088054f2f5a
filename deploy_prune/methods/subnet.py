"""Choose among plans by scoring each as a whole subnet, not group by group.

A knapsack adds up per-group values, each measured with every other group intact; how the cuts
interact (two neighbouring layers both thinned, a residual width cut on top of its inner convs)
it cannot see. Scoring the cut model itself sees it. Right after a cut the BatchNorm statistics
are stale and the metric says little; re-estimating them on a few training batches (adaptive
BN, Li et al., "EagleEye", ECCV 2020; ModelOpt's FastNAS scores its subnets so) helps, but at a
deep cut the model still scores near chance and the score barely ranks the plans by their
accuracy after fine-tuning (Spearman 0.34 over 11 plans of ResNet-20 at 0.4 of its latency). A
few SGD steps on the scoring batches first (NetAdapt's short-term fine-tuning, Yang et al.,
ECCV 2018) undo the first shock: there the score picked the plan that fine-tuned best
(benchmarks/results/subnet_choice_rank_resnet20_40.md).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from deploy_prune.graph import ModelGraph
from deploy_prune.train import recalibrate_bn

if TYPE_CHECKING:
    from deploy_prune.methods.context import MethodContext


def subnet_metric(run: MethodContext, widths: Mapping[str, int], scores: Mapping[str, Any], recover_steps: int = 0) -> float:
    """The run's validation-subset metric of a copy of ``run.model`` cut to ``widths`` (the
    channels ``scores`` ranks lowest going first), its BatchNorm statistics re-estimated on the
    scoring batches, after ``recover_steps`` steps of training on them (``run.recover``; BN
    re-estimated again after). ``run.model`` is not touched."""
    model = copy.deepcopy(run.model)
    graph = ModelGraph(model, run.input_shape, run.ignore, run.graph.space)
    current = {g.name: g.channels for g in graph.groups()}
    keep = {g: k for g, k in widths.items() if k < current.get(g, k)}
    graph.prune_by_scores(keep, {g: torch.as_tensor(scores[g]) for g in keep})
    recalibrate_bn(model, run.score_batches())
    if recover_steps > 0 and run.recover(model, recover_steps):
        recalibrate_bn(model, run.score_batches())
    return run.subset_accuracy(model)


def choose(run: MethodContext, plans: Sequence[Mapping[str, int]], scores: Mapping[str, Any],
           recover_steps: int = 0) -> tuple[int, list[float]]:
    """The index of the plan whose cut model scores best (``subnet_metric``; the first of
    equals, so the knapsack's own plan wins ties), and every plan's score."""
    metrics = [subnet_metric(run, p, scores, recover_steps) for p in plans]
    return max(range(len(plans)), key=lambda i: (metrics[i], -i)), metrics
