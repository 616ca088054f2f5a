"""The timing protocol: warm-up, interleaved rounds of repeats, robust statistics.

These machines are shared and noisy, so (1) variants being compared are interleaved round by
round, (2) the headline figure is the median over all timed runs, and (3) the spread is
reported as IQR, MAD and the coefficient of variation of the per-round medians, which says
how far the median itself moved during the measurement.

Decisions (is a budget met? what does the calibration fit?) use ``Stats.quiet``, the median of
the round medians within ``QUIET_BAND`` of the fastest round (at least ``QUIET_QUORUM`` of the
rounds: one fast round alone does not set the figure). On a shared VM other tenants slow
the core in episodes lasting seconds (benchmarks/results/measure_noise.md: ResNet-20 on one
thread 0.57 ms quiet, 0.80 ms in such an episode), and a small model slows by a larger share
than a big one, so neither the overall median nor a ratio of paired rounds cancels them.
Timing noise only ever adds time, so the fastest rounds are the uncontended state (the
reasoning behind ``timeit``'s minimum and Chen & Revels 2016, "Robust benchmarking in noisy
environments"); taking the median of the rounds near the fastest, rather than the minimum
itself, keeps the estimate unbiased within that state. On a quiet machine every round is
within the band and ``quiet`` is the median of the round medians. The overall median and p90
are still reported as measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from deploy_prune.config import Protocol

TimeOnce = Callable[[], float]  # runs the model once, returns milliseconds
QUIET_BAND = 0.10  # rounds within 10 % of the fastest are taken as the uncontended state
# ... and at least this share of the rounds (the fastest ones): a state the machine holds for
# one round is not the quiet state. An int8 MobileNetV2 on ONNX Runtime timed one round in ten
# at 0.137 ms against 0.21-0.22 ms for the others; decided on that round alone, a model 4 % over
# its budget read as 23 % under it.
QUIET_QUORUM = 0.3


def quiet_rounds(round_medians: list[float]) -> list[float]:
    """The round medians within ``QUIET_BAND`` of the fastest, or the fastest ``QUIET_QUORUM``
    of them where fewer are (see the module docstring)."""
    if not round_medians:
        return []
    lo = min(round_medians)
    near = [v for v in round_medians if v <= lo * (1.0 + QUIET_BAND)]
    quorum = max(1, math.ceil(QUIET_QUORUM * len(round_medians)))
    return near if len(near) >= quorum else sorted(round_medians)[:quorum]


def quiet_estimate(round_medians: list[float]) -> float:
    """Median of the quiet rounds' medians: the latency decisions are made on."""
    return float(np.median(quiet_rounds(round_medians)))


def quiet_of(stats: Mapping[str, object]) -> float:
    """``Stats.quiet`` of a stored ``Stats.as_dict()``, also one written before it existed."""
    if isinstance(stats.get("quiet"), (int, float)):
        return float(stats["quiet"])  # type: ignore[arg-type]
    rounds = stats.get("round_medians")
    return quiet_estimate(list(rounds)) if isinstance(rounds, list) and rounds else float(stats["median"])  # type: ignore[arg-type]


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
    # Tail percentiles of the per-run samples; None where only a summary was available
    # (stats from an agent that does not send them).
    p95: float | None = None
    p99: float | None = None

    @property
    def quiet(self) -> float:
        """The figure decisions use: median of the rounds near the fastest (module docstring).
        Derived from ``round_medians``, so stats from an older agent carry it too."""
        return quiet_estimate(self.round_medians)

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 6)
        d["round_medians"] = [round(v, 6) for v in self.round_medians]
        d["quiet"] = round(self.quiet, 6)
        d["quiet_rounds"] = len(quiet_rounds(self.round_medians))
        return d


def coefficient_of_variation(round_medians: list[float]) -> float:
    """std / mean of the round medians (0 for fewer than two): how far the median moved."""
    rm = np.asarray(round_medians, dtype=float)
    return float(rm.std() / rm.mean()) if len(rm) > 1 and rm.mean() > 0 else 0.0


def split_protocol(p: Protocol) -> tuple[Protocol, Protocol]:
    """``p`` in two sittings that together time what ``p`` does (see ``pool_sittings``)."""
    first = Protocol(p.warmup, max(1, p.repeats // 2), max(1, p.rounds // 2), p.min_time_s / 2)
    second = Protocol(p.warmup, max(1, p.repeats - p.repeats // 2), max(1, p.rounds - p.rounds // 2), p.min_time_s / 2)
    return first, second


def pool_sittings(sittings: list[Stats]) -> dict[str, object]:
    """One record of a model timed in several sittings, minutes apart, with the same protocol.

    A contention episode on a shared VM can outlast a whole measurement (benchmarks/results/
    measure_noise.md: one of 12 measurements of ResNet-20 had every round at 1.02-1.12 ms against
    0.71 ms quiet). Rounds taken minutes apart are likelier to include the uncontended state, so ``quiet`` is taken over
    all the sittings' rounds. ``median`` here is the median of the round medians and ``p90`` the
    largest sitting's (the runs themselves are not pooled); each sitting is kept under ``sittings``.
    """
    rm = [v for s in sittings for v in s.round_medians]
    return {
        "quiet": round(quiet_estimate(rm), 6), "quiet_rounds": len(quiet_rounds(rm)), "median": round(float(np.median(rm)), 6),
        "p90": round(max(s.p90 for s in sittings), 6), "n": sum(s.n for s in sittings), "rounds": len(rm),
        "round_medians": [round(v, 6) for v in rm], "round_cv": round(coefficient_of_variation(rm), 6),
        "median_is": "median of the round medians of all sittings", "sittings": [s.as_dict() for s in sittings],
    }


def summarize(samples_by_round: list[list[float]]) -> Stats:
    allv = np.asarray([v for r in samples_by_round for v in r], dtype=float)
    med = float(np.median(allv))
    q25, q75, p90, p95, p99 = np.percentile(allv, [25, 75, 90, 95, 99])
    rm = np.asarray([np.median(r) for r in samples_by_round if r], dtype=float)
    cv = coefficient_of_variation(rm.tolist())
    return Stats(
        median=med, p90=float(p90), mean=float(allv.mean()), min=float(allv.min()), max=float(allv.max()),
        iqr=float(q75 - q25), mad=float(np.median(np.abs(allv - med))), n=int(allv.size),
        rounds=len(samples_by_round), round_medians=rm.tolist(), round_cv=cv, p95=float(p95), p99=float(p99),
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
