"""deploy-prune: prune vision models to a latency budget measured on the target.

The Python API (the CLI runs the same pipeline)::

    import torch
    import deploy_prune as dp

    result = dp.compress(model, torch.zeros(1, 3, 32, 32), target="cpu-ort-1t", budget=dp.Latency(ms=5),
                         train=train_set, val=val_set, out="runs/mine")
    print(result.met_budget, result.report["final"]["latency_ms"]["quiet"])
    pruned = result.model

Budgets: ``Latency(ms=...)``, ``LatencyRatio(r)``, ``Flops(r)``, ``Params(r)``, ``Channels(r)``,
``Sparsity(s)``. Also ``profile``, ``measure``, ``load``, ``list_targets()`` and ``list_methods()``;
``planner(...)`` hands out the closed loop step by step (plan, apply, your training, check).
Names are imported on first use, so ``import deploy_prune`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
# Every verb and the API measure on this target unless told otherwise: one thread, as an edge
# deployment runs.
DEFAULT_TARGET = "cpu-ort-1t"

_API = {
    "compress": "api", "planner": "api", "profile": "api", "measure": "api", "load": "api", "list_targets": "api", "list_methods": "api",
    "Result": "api", "FinetuneContext": "pipeline", "Planner": "pipeline.planner", "Check": "pipeline.planner", "LatencyTable": "latency.lut",
    "Latency": "budget", "LatencyRatio": "budget", "Flops": "budget", "Params": "budget", "Channels": "budget",
    "Sparsity": "budget", "UserError": "errors", "BudgetUnreachable": "errors",
}
__all__ = [
    "__version__", "compress", "planner", "Planner", "Check", "profile", "measure", "load", "list_targets", "list_methods", "Result", "FinetuneContext",
    "LatencyTable",
    "Latency", "LatencyRatio", "Flops", "Params", "Channels", "Sparsity", "UserError", "BudgetUnreachable",
]

if TYPE_CHECKING:
    from deploy_prune.api import Result, compress, list_methods, list_targets, load, measure, planner, profile
    from deploy_prune.budget import Channels, Flops, Latency, LatencyRatio, Params, Sparsity
    from deploy_prune.errors import BudgetUnreachable, UserError
    from deploy_prune.latency.lut import LatencyTable
    from deploy_prune.pipeline import FinetuneContext
    from deploy_prune.pipeline.planner import Check, Planner


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"deploy_prune.{_API[name]}"), name)
    raise AttributeError(f"module 'deploy_prune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
