"""Low-rank factorisation of conv layers ("scheme 1", Sec. 3.2 of "A Differentiable Framework for End-to-End Learning of Hybrid Structured Compression").

A conv weight ``W`` (C_out x C_in x k x k) matricised as C_out x (C_in k k) and truncated to
rank r by SVD, ``W ~ U_r S_r V_r^T``, runs as two convs: ``r x C_in x k x k`` (the original
stride, padding and dilation, no bias) followed by ``C_out x r x 1 x 1`` (the original bias).
The pair is a ``LowRankConv2d``; its first conv's output channels are the rank, which the
dependency graph sees as one more prunable group, named ``<layer>:rank``.

Factorising pays only while ``r (C_in k k + C_out) < C_in k k C_out`` (MACs), or where the
target's LUT says the pair is faster; ``methods/df.py`` prices both and keeps a layer dense
where the pair does not pay.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class LowRankConv2d(nn.Sequential):
    """A conv factorised into a k x k conv to ``rank`` channels and a 1 x 1 conv back out."""

    lowrank = True  # how graph.py recognises the pair without importing this module

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        if conv.groups != 1:
            raise ValueError("grouped and depthwise convs cannot be factorised")
        first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                          conv.dilation, bias=False, padding_mode=conv.padding_mode)  # type: ignore[arg-type]
        second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
        super().__init__(first, second)
        self.to(conv.weight.device, conv.weight.dtype)

    def convs(self) -> tuple[nn.Conv2d, nn.Conv2d]:
        return self[0], self[1]  # type: ignore[return-value]

    @property
    def rank(self) -> int:
        return self.convs()[0].out_channels

    @property
    def full_rank(self) -> int:
        """The rank of the dense conv this pair replaces."""
        first, second = self.convs()
        return rank_bound(first.in_channels, second.out_channels, first.kernel_size)  # type: ignore[arg-type]


def rank_bound(cin: int, cout: int, kernel: tuple[int, int]) -> int:
    """The largest rank of a C_out x (C_in k k) matrix."""
    return min(cout, cin * kernel[0] * kernel[1])


def full_rank(conv: nn.Conv2d) -> int:
    return rank_bound(conv.in_channels, conv.out_channels, conv.kernel_size)  # type: ignore[arg-type]


@torch.no_grad()
def factorize_conv(conv: nn.Conv2d, rank: int) -> LowRankConv2d:
    """The best rank-``rank`` approximation of ``conv`` (truncated SVD, Eckart-Young), split
    evenly: ``W1 = S^1/2 V^T``, ``W2 = U S^1/2``. A rank above the matrix's own (possible when a
    checkpoint is rebuilt after its layer lost channels) pads with zero channels."""
    rank = max(1, rank)
    pair = LowRankConv2d(conv, rank)
    w = conv.weight.detach().float().flatten(1)  # C_out x (C_in k k)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    w1 = torch.zeros(rank, w.shape[1])
    w2 = torch.zeros(w.shape[0], rank)
    w1[:r], w2[:, :r] = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    first, second = pair.convs()
    first.weight.copy_(w1.reshape(first.weight.shape))
    second.weight.copy_(w2.reshape(second.weight.shape))
    if conv.bias is not None and second.bias is not None:
        second.bias.copy_(conv.bias)
    return pair


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def factorize(model: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """Replace each conv named in ``ranks`` (in place) by its factorised pair at that rank."""
    mods = dict(model.named_modules())
    for name, r in ranks.items():
        conv = mods.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{name!r} is not a conv layer of this model")
        _set(model, name, factorize_conv(conv, r))
    return model


def lowrank_layers(model: nn.Module) -> dict[str, int]:
    """Name -> rank of every factorised pair in ``model``."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankConv2d)}
