"""Each criterion on a case with a known answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.graph import ModelGraph
from deploy_prune.importance import CRITERIA, chi2_statistic, f_statistic, score_groups
from deploy_prune.models import build_model

DEAD = 5  # channel zeroed in every layer of its group


def _batches(n: int = 3, bs: int = 32, in_ch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, in_ch, 16, 16, generator=g), torch.arange(bs) % 4) for _ in range(n)]


def _tiny_with_dead_channel() -> tuple[nn.Module, ModelGraph, str]:
    torch.manual_seed(0)
    model = build_model("tiny-cnn", 4, 1)
    with torch.no_grad():
        for m in model.modules():  # give BN non-trivial statistics so activations are not constant
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        conv, bn, nxt = model.features[3], model.features[4], model.features[6]  # second conv's 32 channels
        conv.weight[DEAD] = 0
        bn.weight[DEAD] = 0
        bn.bias[DEAD] = 0
        nxt.weight[:, DEAD] = 0
    graph = ModelGraph(model, (1, 16, 16))
    name = next(g.name for g in graph.groups() if "features.3" in g.out_layers)
    return model, graph, name


@pytest.mark.parametrize("criterion", [c for c in CRITERIA.names() if c != "random"])
def test_zeroed_channel_ranks_last(criterion: str) -> None:
    model, graph, name = _tiny_with_dead_channel()
    scores = score_groups(model, graph, criterion, _batches())[name]
    assert scores.shape == (32,)
    assert int(torch.argmin(scores)) == DEAD or scores[DEAD] == scores.min(), scores


def _separating_model() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Input channel 0 carries the label, channel 1 is noise; conv channel 2 alone reads channel 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():
        w = torch.zeros(6, 2, 1, 1)
        w[:, 1] = torch.linspace(0.5, 1.5, 6)[:, None, None]
        w[2] = 0
        w[2, 0] = 1.0
        model[0].weight.copy_(w)
        model[0].bias.zero_()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        y = torch.randint(0, 2, (64,), generator=g)
        x = torch.randn(64, 2, 4, 4, generator=g)
        x[:, 0] = x[:, 0] * 0.1 + (2 * y - 1)[:, None, None].float()
        batches.append((x, y))
    return model, batches


@pytest.mark.parametrize("criterion", ["fstat", "chi2"])
def test_feature_screening_ranks_separating_channel_first(criterion: str) -> None:
    model, batches = _separating_model()
    graph = ModelGraph(model, (2, 4, 4))
    name = next(g.name for g in graph.groups() if "0" in g.out_layers)
    scores = score_groups(model, graph, criterion, batches)[name]
    assert int(torch.argmax(scores)) == 2
    assert scores[2] > 10 * scores[[0, 1, 3, 4, 5]].max()


def test_statistics_on_known_data() -> None:
    y = torch.arange(200).numpy() % 2
    x = torch.stack([torch.as_tensor(y, dtype=torch.float32) + 0.01 * torch.randn(200), torch.randn(200)], 1).numpy()
    assert f_statistic(x, y)[0] > 1000 > f_statistic(x, y)[1]
    chi = chi2_statistic(x, y)
    assert chi[0] == pytest.approx(200, rel=0.01)  # a perfect 2x2 split: chi2 = N
    assert chi[1] < 20


def test_random_is_seeded() -> None:
    model = build_model("tiny-cnn", 4, 1)
    graph = ModelGraph(model, (1, 16, 16))
    a = score_groups(model, graph, "random", seed=1)
    b = score_groups(model, graph, "random", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("criterion", ["taylor", "hessian", "fstat", "chi2", "snip"])
def test_data_criteria_need_data(criterion: str) -> None:
    model = build_model("tiny-cnn", 4, 1)
    with pytest.raises(UserError, match="needs data with labels"):
        score_groups(model, ModelGraph(model, (1, 16, 16)), criterion)


def test_unknown_criterion() -> None:
    model = build_model("tiny-cnn", 4, 1)
    with pytest.raises(UserError, match="valid names: .*taylor"):
        score_groups(model, ModelGraph(model, (1, 16, 16)), "oracle")
