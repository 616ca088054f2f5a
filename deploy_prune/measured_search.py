"""Widths found on measured latency alone, for when the latency table and the target disagree.

The closed loop corrects the table's budget by one factor, measured / predicted. A factor cannot
mend a table that prices widths wrongly *relative to each other*: OpenVINO's one-layer entries,
for instance, can be several times a layer's in-model time, and then the knapsack keeps wide
exactly the layers the table calls cheap. On ``cpu-openvino-1t``, MobileNetV2 at half its
measured latency: the narrowest widths measure 22 % of the budget, the plan at their predicted
cost 166 %, and every correction plans that same architecture again (the table ranks the
model's variants against their measured order: Spearman -0.48,
``benchmarks/results/lut_fidelity_cpu-openvino-1t_three.md``).

What is known for sure then is two measured architectures: one within the budget (at worst the
narrowest widths) and one over it. ``line_search`` walks the line between them, per group
``under + s * (over - under)`` snapped (dithered, ``between``) to the group's allowed widths, and picks ``s`` by regula
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


def between(under: Mapping[str, int], over: Mapping[str, int], s: float, keeps: Mapping[str, Sequence[int]],
            order: Sequence[str] | None = None) -> Widths:
    """Per group, an allowed width for the point ``under + s * (over - under)`` of the line.

    Rounding is dithered: between its two neighbouring allowed widths, group ``i`` of ``n`` takes
    the wider one once the point is ``(i + 0.5) / n`` of the way there, not all at one half-way
    mark. When every group has the same channel steps (uniform plans, one channel multiple),
    plain rounding would move all groups at the same ``s`` and leave no architecture between two
    measured ones; dithered, the line passes through ``n`` architectures per step. ``order``
    (default: ``under``'s) ranks the groups: the first moves first. ``s = 0`` gives ``under`` and
    ``s = 1`` gives ``over``."""
    out: Widths = {}
    n = max(1, len(under))
    rank = {g: i for i, g in enumerate([*(order or ()), *[g for g in under if g not in (order or ())]])}
    for g, lo in under.items():
        i = rank[g]
        hi = over.get(g, lo)
        want = lo + s * (hi - lo)
        ks = sorted(keeps.get(g, ()) or {lo, hi})
        below = max((k for k in ks if k <= want), default=ks[0])
        above = min((k for k in ks if k >= want), default=ks[-1])
        if above == below:
            out[g] = below
            continue
        step = (want - below) / (above - below)  # 0 at the narrower neighbour, 1 at the wider
        rising = hi >= lo  # the share of the way is counted from under's side
        out[g] = (above if step >= (i + 0.5) / n else below) if rising else (below if 1 - step >= (i + 0.5) / n else above)
    return out


def _new_widths(under: Mapping[str, int], over: Mapping[str, int], s: float, bracket: tuple[float, float],
                keeps: Mapping[str, Sequence[int]], seen: set[tuple[tuple[str, int], ...]],
                order: Sequence[str] | None, tries: int = 24) -> tuple[float, Widths] | None:
    """``(s, widths at s)``, or, where those snap to an architecture already measured (the allowed
    widths are coarser than the bracket there), the nearest point of the bracket that snaps to a
    new one; None when every point inside the bracket snaps to a measured one."""
    lo, hi = bracket
    grid = [lo + (hi - lo) * i / tries for i in range(1, tries)]
    for t in [s, *sorted(grid, key=lambda t: abs(t - s))]:
        widths = between(under, over, t, keeps, order)
        if tuple(sorted(widths.items())) not in seen:
            return t, widths
    return None


def line_search(under: Point, over: Point, measure: Callable[[Widths], Point], window: tuple[float, float, float],
                keeps: Mapping[str, Sequence[int]], evals: int, order: Sequence[str] | None = None) -> tuple[Point, list[Point]]:
    """The widest architecture measured within ``window[1]`` of the budget on the line from
    ``under`` (measured within it) to ``over`` (measured over it), in at most ``evals``
    measurements; stops early once one lands in ``[window[0], window[1]]``. ``measure(widths)``
    measures an architecture; ``order`` ranks the groups for ``between``'s dithering. Returns the point chosen (``under`` when nothing better was
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
        found = _new_widths(under.widths, over.widths, s, (lo_s, hi_s), keeps, seen, order)
        if found is None:  # no allowed widths left strictly inside the bracket
            break
        s, widths = found
        seen.add(tuple(sorted(widths.items())))
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
