"""What a method sees of the run it works in: ``MethodContext``.

The pipeline (``deploy_prune.pipeline``) owns the run: loading, measuring, budgets, checkpoints,
reports. A method gets this narrow view of it and nothing else, so that methods never import the
pipeline (the pipeline imports them) and a method can be driven by any caller that provides
these few things: the model and its dependency graph, the cost model of the budget, scoring
batches, the fine-tuning and evaluation callbacks, a step recorder and a checkpoint hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from deploy_prune.allocate import CostModel
    from deploy_prune.graph import ModelGraph
    from deploy_prune.transforms import Masks


class MethodContext(Protocol):
    """The run as a method may use it (``pipeline.Run`` provides it)."""

    model: nn.Module  # the model being compressed; methods edit it in place (or replace it and set ``graph``)
    graph: ModelGraph  # its dependency graph, with the target's channel multiple
    teacher: nn.Module  # the unpruned model: read, never edit
    cost: CostModel  # prices a plan in the budget's units (predicted ms, MACs, params or channels)
    profile: dict[str, Any] | None  # the target's latency table, when the budget is latency
    masks: Masks  # unstructured masks held through fine-tuning
    last_fit: dict[str, Any] | None  # training metrics of the last ``finetune`` call
    done: list[str]  # stages already finished: a resumed run skips them

    @property
    def input_shape(self) -> tuple[int, ...]: ...  # C, H, W of one example

    @property
    def train_data(self) -> Dataset: ...  # (input, target) items

    @property
    def ignore(self) -> list[str]: ...  # layers never to prune

    @property
    def seed(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def notes(self) -> list[str]: ...  # lines the report shows under the results

    @property
    def steps_recorded(self) -> int: ...  # steps recorded so far (seeds per-step randomness)

    def say(self, msg: str) -> None: ...

    def score_batches(self) -> list[Any]: ...

    def subset_accuracy(self, model: nn.Module) -> float: ...

    def recover(self, model: nn.Module, steps: int) -> bool: ...  # a few training steps of a candidate copy (``Run.recover``)

    def sensitivity(self, criterion: str, bn_batches: int = 0) -> dict[str, Any]: ...

    def finetune(self, epochs: float, tag: str, resume: bool = False, stop: Callable[[nn.Module, int], bool] | None = None,
                 penalty: Callable[[nn.Module], torch.Tensor] | None = None) -> float: ...

    def record_step(self, stage: str, model: nn.Module | None = None, **rec: Any) -> None: ...

    def checkpoint(self, stage: str) -> None: ...
