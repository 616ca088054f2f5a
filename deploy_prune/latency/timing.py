"""The timing protocol: warm-up, interleaved rounds of repeats, robust statistics.

These machines are shared and noisy, so (1) variants being compared are interleaved round by
round, (2) the headline figure is the median over all timed runs, and (3) the spread is
reported as IQR, MAD and the coefficient of variation of the per-round medians, which says
how far the median itself moved during the measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from deploy_prune.config import Protocol

TimeOnce = Callable[[], float]  # runs the model once, returns milliseconds


@dataclass
class Stats:
    """Summary of a latency sample in milliseconds."""

    median: float
    p90: float
    mean: float
    min: float
    max: float
    iqr: float
    mad: float
    n: int
    rounds: int
    round_medians: list[float]
    round_cv: float  # std/mean of the per-round medians

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 6)
        d["round_medians"] = [round(v, 6) for v in self.round_medians]
        return d


def summarize(samples_by_round: list[list[float]]) -> Stats:
    allv = np.asarray([v for r in samples_by_round for v in r], dtype=float)
    med = float(np.median(allv))
    q25, q75, p90 = np.percentile(allv, [25, 75, 90])
    rm = np.asarray([np.median(r) for r in samples_by_round if r], dtype=float)
    cv = float(rm.std() / rm.mean()) if len(rm) > 1 and rm.mean() > 0 else 0.0
    return Stats(
        median=med, p90=float(p90), mean=float(allv.mean()), min=float(allv.min()), max=float(allv.max()),
        iqr=float(q75 - q25), mad=float(np.median(np.abs(allv - med))), n=int(allv.size),
        rounds=len(samples_by_round), round_medians=rm.tolist(), round_cv=cv,
    )


def measure(
    timers: Mapping[str, TimeOnce],
    protocol: Protocol,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, Stats]:
    """Time every variant with the protocol, interleaving them round by round.

    Each variant first gets ``protocol.warmup`` untimed runs; every round then re-warms it
    with a tenth of that (others ran in between and evicted its caches) before timing
    ``repeats / rounds`` runs, or more for a fast variant until ``min_time_s`` is covered.
    """
    per_round: dict[str, int] = {}
    for name, t in timers.items():
        warm = [t() for _ in range(protocol.warmup)] or [t()]
        est_ms = float(np.median(warm))
        by_time = int(np.ceil(protocol.min_time_s * 1000.0 / protocol.rounds / max(est_ms, 1e-3)))
        per_round[name] = max(1, protocol.repeats // protocol.rounds, by_time)
    rewarm = max(1, protocol.warmup // 10) if protocol.warmup else 0
    samples: dict[str, list[list[float]]] = {k: [] for k in timers}
    for r in range(protocol.rounds):
        for name, t in timers.items():
            for _ in range(rewarm):
                t()
            samples[name].append([t() for _ in range(per_round[name])])
        if on_round is not None:
            on_round(r + 1)
    return {k: summarize(v) for k, v in samples.items()}
