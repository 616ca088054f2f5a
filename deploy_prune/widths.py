"""The width space: which channel counts a prunable group may keep.

A target's kernels run channels in blocks (``channel_multiple``: ONNX Runtime's NCHWc block, 16
on AVX-512; its int8 kernels' output step, 16; a GPU's tensor-core tile), and a width that fills
its blocks is the fastest per channel. A width below the first block is not fastest per channel,
but it is below the aligned floor: on ResNet-20 every group kept at 16 channels is the narrowest
aligned plan, and its first stage (16 channels) cannot be pruned at all, while a uniform pruner
with unaligned widths goes under that floor. So a group may keep every multiple of the block,
its full width, and a few *narrow* widths below the block. Whether a narrow width is worth its
cost is measured, never assumed: the profile times each one (``latency.lut.channel_grid``), and
the allocator takes a width only where its measured cost buys something (a wider width that
costs no more always wins the knapsack: ``allocate.allocate``).

Pure: no torch, no backend; ``config``, ``graph`` and ``allocate`` share it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The narrow widths below a block of m channels (``auto``): every max(NARROW_MIN, m // 4) channels,
# so a 16-channel block gives 4, 8 and 12, an 8-channel one 4, and a block of 4 or fewer none
# (its multiples are already fine-grained).
NARROW_MIN = 4


def auto_narrow(multiple: int) -> tuple[int, ...]:
    """The narrow widths ``auto`` gives below a block of ``multiple`` channels."""
    step = max(NARROW_MIN, multiple // 4)
    return tuple(range(step, multiple, step))


def round_channels(keep: float, total: int, multiple: int = 1) -> int:
    """Round a keep count to the target's channel multiple, within [multiple, total].

    When ``total`` itself is not a multiple of ``multiple``, keeping all channels is allowed.
    """
    multiple = max(1, multiple)
    if keep >= total:
        return total
    k = int(round(keep / multiple)) * multiple
    return int(min(total, max(multiple, k, 1)))


@dataclass(frozen=True)
class WidthSpace:
    """Every multiple of ``multiple``, the full width, and the ``narrow`` widths below the multiple."""

    multiple: int = 1
    narrow: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "multiple", max(1, int(self.multiple)))
        object.__setattr__(self, "narrow", tuple(sorted({int(n) for n in self.narrow if 0 < int(n) < self.multiple})))

    @classmethod
    def of(cls, widths: int | WidthSpace) -> WidthSpace:
        """``widths`` itself, or a bare number as a multiple with no narrow widths."""
        return widths if isinstance(widths, WidthSpace) else cls(widths)

    def keeps(self, channels: int, floor: int = 1) -> list[int]:
        """Every width a group of ``channels`` may keep, at least ``floor`` (or all of it)."""
        m = self.multiple
        ks = {round_channels(k, channels, m) for k in range(m, channels + 1, m)} | {channels}
        ks |= {n for n in self.narrow if n < channels}
        return sorted(k for k in ks if k >= min(floor, channels))

    def snap(self, keep: float, channels: int) -> int:
        """The allowed width nearest ``keep``: ``round_channels`` at and above the multiple;
        below it, the nearest narrow width or the multiple (a tie goes to the wider)."""
        below = [n for n in self.narrow if n < channels]
        if keep >= self.multiple or not below:
            return round_channels(keep, channels, self.multiple)
        return min([*below, min(self.multiple, channels)], key=lambda k: (abs(k - keep), -k))
