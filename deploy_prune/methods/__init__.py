"""Compression recipes registered by name; ``compress`` drives whichever one the user picks.

A method answers three questions for the pipeline in ``deploy_prune.pipeline``:

- ``setup(run)``: anything it needs before pruning (DeepLSP: the sensitivity analysis);
- ``plan(run, budget)``: the per-group widths it would cut the *current* model to for a cost
  budget (in the run's cost units: predicted ms, MACs, params or channels), without editing;
- ``prune(run, budget)``: one structured step to that budget (edits ``run.model``);
- ``masks(run)``: unstructured masks to hold during the final fine-tuning (may be empty).

Every method says what it is: ``kind`` (structured, unstructured, hybrid or low-rank) and
``lowers_latency`` (whether its result runs faster on a dense backend). Unstructured methods
take a ``sparsity`` budget; ``prune(run, sparsity)`` then runs their whole prune-retrain
schedule (``methods.imp``).

Optional attributes: ``plans = False`` for a method whose structure is learned rather than
planned (the measured loop then skips the plan stage and tightens after pruning), and
``lowrank_profile = True`` for one whose latency budgets need the LUT's low-rank tables. When
the closed loop fixes the widths on measurement, the method's ``criterion`` (L1 without one)
ranks which channels go (``pipeline.loop._prune_to``).

The pipeline owns everything else (budgets, steps and their fine-tuning, the measured closed
loop, the final fine-tuning, export and reports), so methods are compared on equal terms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from deploy_prune.errors import UserError
from deploy_prune.registry import Registry
from deploy_prune.transforms import Masks

if TYPE_CHECKING:
    from deploy_prune.methods.context import MethodContext


BUDGET_KINDS = ("latency_ms", "latency_ratio", "flops_ratio", "params_ratio", "keep_ratio")  # structured methods
SPARSITY = ("sparsity",)  # unstructured methods: share of the weights zeroed


class Method(Protocol):
    name: str
    kind: str
    lowers_latency: bool
    default_steps: int
    budget_kinds: tuple[str, ...]  # which of BUDGET_KINDS it can honour

    def settings(self) -> dict[str, Any]: ...

    def setup(self, run: MethodContext) -> None: ...

    def plan(self, run: MethodContext, budget: float) -> dict[str, int]: ...

    def prune(self, run: MethodContext, budget: float) -> None: ...

    def masks(self, run: MethodContext) -> Masks: ...


METHODS: Registry[type] = Registry("method")


def method_settings(name: str) -> list[str]:
    """The settings method ``name`` takes (its constructor's parameters)."""
    import inspect

    return [p for p in inspect.signature(METHODS.get(name)).parameters if p not in ("args", "kwargs")]


def check_options(name: str, options: dict[str, Any]) -> None:
    """Every setting given (``--criterion``, ``--amount``, ``--tolerance``, ``-O KEY=VALUE``) must be
    one the method takes: a setting dropped silently runs another experiment than the one asked
    for (``beta`` is DF's sigmoid rise and SAP's own beta)."""
    accepted = method_settings(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"--method {name} has no setting {', '.join(unknown)}; it takes {', '.join(accepted) or 'none'} "
                        "(see deploy-prune methods)")


def get_method(name: str, **settings: Any) -> Method:
    """Instantiate a registered method; a setting it does not take is an error (``check_options``)."""
    check_options(name, settings)
    return METHODS.get(name)(**settings)  # type: ignore[no-any-return]


# Register the built-in methods.
from deploy_prune.methods import deeplsp, df, granular, halp, imp, regularized, uniform  # noqa: E402,F401
