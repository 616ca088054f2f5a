"""Widths found on measured latency alone, for when the latency table and the target disagree.

The closed loop corrects the table's budget by one factor, measured / predicted. A factor cannot
mend a table that prices widths wrongly *relative to each other*: OpenVINO's one-layer entries,
for instance, can be several times a layer's in-model time, and then the knapsack keeps wide
exactly the layers the table calls cheap. On MobileNetV2 at half its measured latency the plan
at the narrowest widths' predicted cost measured 181 % of the budget while the narrowest widths
themselves measured 56 %, and every correction planned the same architecture again.

What is known for sure then is two measured architectures: one within the budget (at worst the
narrowest widths) and one over it. ``line_search`` walks the line between them, per group
``under + s * (over - under)`` snapped to the group's allowed widths, and picks ``s`` by regula
falsi on the measured ratio to the budget, so each measurement brackets the answer more tightly.
It uses no table at all. Measured latency along that line rises with ``s`` on every backend we
have, but not strictly (channel blocks, noise), so the search only ever keeps what it measured.

Written here rather than taken from scipy: ``scipy.optimize`` root finders expect a continuous
function they may call as often as they like; here every call is a measurement of seconds, the
function is a staircase (whole channels), and what is wanted is the widest point measured under
the budget, not a root.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

Widths = dict[str, int]


@dataclass
class Point:
    """An architecture (width per group) and its measured latency as a share of the budget."""

    widths: Widths
    r: float
    info: dict = field(default_factory=dict)  # whatever the caller keeps with the measurement


def between(under: Mapping[str, int], over: Mapping[str, int], s: float, keeps: Mapping[str, Sequence[int]]) -> Widths:
    """Per group, the allowed width nearest ``under + s * (over - under)`` (the narrower on a tie)."""
    out: Widths = {}
    for g, lo in under.items():
        want = lo + s * (over.get(g, lo) - lo)
        out[g] = min(keeps.get(g, (lo,)), key=lambda k, w=want: (abs(k - w), k))  # type: ignore[misc]
    return out


def line_search(under: Point, over: Point, measure: Callable[[Widths], Point], window: tuple[float, float, float],
                keeps: Mapping[str, Sequence[int]], evals: int) -> tuple[Point, list[Point]]:
    """The widest architecture measured within ``window[1]`` of the budget on the line from
    ``under`` (measured within it) to ``over`` (measured over it), in at most ``evals``
    measurements; stops early once one lands in ``[window[0], window[1]]``. ``measure(widths)``
    measures an architecture. Returns the point chosen (``under`` when nothing better was
    measured) and every point measured."""
    low, high, aim = window
    if under.r > high or over.r <= high:
        raise ValueError(f"line_search needs an architecture under the budget and one over it (got {under.r:.3f}, {over.r:.3f})")
    lo_s, lo_r, hi_s, hi_r = 0.0, under.r, 1.0, over.r
    best, tried = under, [under]
    seen = {tuple(sorted(under.widths.items())), tuple(sorted(over.widths.items()))}
    for _ in range(evals):
        s = lo_s + (aim - lo_r) * (hi_s - lo_s) / (hi_r - lo_r)
        # Keep off the ends: regula falsi can creep along one side of a convex staircase.
        edge = 0.1 * (hi_s - lo_s)
        s = min(max(s, lo_s + edge), hi_s - edge)
        widths = between(under.widths, over.widths, s, keeps)
        key = tuple(sorted(widths.items()))
        if key in seen:  # the bracket is narrower than one allowed width step
            break
        seen.add(key)
        p = measure(widths)
        tried.append(p)
        if p.r <= high:
            if p.r > best.r:
                best = p
            lo_s, lo_r = s, p.r
            if p.r >= low:
                break
        else:
            hi_s, hi_r = s, p.r
    return best, tried
