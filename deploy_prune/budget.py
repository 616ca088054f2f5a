"""Budgets as small typed values: what the Python API's ``compress(budget=...)`` takes.

Each names one kind of budget and its value; ``settings()`` is the same budget as the pipeline's
settings (``CompressConfig`` fields, the CLI's ``--latency-ms`` etc.), so both doors build the
same run. Values are checked where they enter: on construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deploy_prune.checks import check_number


@dataclass(frozen=True)
class _Share:
    """A share of the unpruned model's figure, in (0, 1)."""

    ratio: float
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_number(f"{type(self).__name__}(ratio)", self.ratio, lo=0.0, hi=1.0, lo_open=True, hi_open=True)

    def settings(self) -> dict[str, float]:
        return {self.kind: float(self.ratio)}


@dataclass(frozen=True)
class Latency:
    """Median latency measured on the target, in milliseconds: ``Latency(ms=5)``."""

    ms: float
    kind: ClassVar[str] = "latency_ms"

    def __post_init__(self) -> None:
        check_number("Latency(ms)", self.ms, lo=0.0, lo_open=True)

    def settings(self) -> dict[str, float]:
        return {self.kind: float(self.ms)}


@dataclass(frozen=True)
class LatencyRatio(_Share):
    """A share of the unpruned model's latency, both measured on the target: ``LatencyRatio(0.5)``."""

    kind: ClassVar[str] = "latency_ratio"


@dataclass(frozen=True)
class Flops(_Share):
    """A share of the unpruned model's multiply-accumulates: ``Flops(0.5)``."""

    kind: ClassVar[str] = "flops_ratio"


@dataclass(frozen=True)
class Params(_Share):
    """A share of the unpruned model's parameters: ``Params(0.5)``."""

    kind: ClassVar[str] = "params_ratio"


@dataclass(frozen=True)
class Channels(_Share):
    """A share of every prunable group's channels kept: ``Channels(0.5)``."""

    kind: ClassVar[str] = "keep_ratio"


@dataclass(frozen=True)
class Sparsity(_Share):
    """A share of the conv/linear weights zeroed, for unstructured methods: ``Sparsity(0.9)``."""

    kind: ClassVar[str] = "sparsity"


Budget = Latency | LatencyRatio | Flops | Params | Channels | Sparsity
