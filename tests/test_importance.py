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


@pytest.mark.parametrize("criterion", ["taylor", "fisher", "hessian", "fstat", "chi2", "snip"])
def test_data_criteria_need_data(criterion: str) -> None:
    model = build_model("tiny-cnn", 4, 1)
    with pytest.raises(UserError, match="needs data with labels"):
        score_groups(model, ModelGraph(model, (1, 16, 16)), criterion)


def test_unknown_criterion() -> None:
    model = build_model("tiny-cnn", 4, 1)
    with pytest.raises(UserError, match="valid names: .*taylor"):
        score_groups(model, ModelGraph(model, (1, 16, 16)), "oracle")


def _small_bn_model() -> tuple[nn.Module, ModelGraph, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    graph = ModelGraph(model, (1, 6, 6))
    model.double()  # finite differences below need the precision
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 6, 6, generator=g).double(), torch.randint(0, 2, (16,), generator=g))]
    return model, graph, batches


def _loss_with_channel_scaled(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], c: int, t: float) -> torch.Tensor:
    """Per-sample losses with BN channel ``c`` (gamma and beta) scaled by ``t``: what the gate does,
    done to the parameters instead (t = 0 removes the channel)."""
    import copy

    import torch.nn.functional as F

    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        m[1].weight[c] *= t
        m[1].bias[c] *= t
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")


def test_gate_gradients_are_the_derivative_of_scaling_the_channel() -> None:
    from deploy_prune.importance import gate_gradients

    model, graph, batches = _small_bn_model()
    name = next(g.name for g in graph.groups() if "0" in g.out_layers)
    d = gate_gradients(model, graph, batches)[name]
    assert d.shape == (16, 4)
    eps = 1e-5
    for c in range(4):
        fd = (_loss_with_channel_scaled(model, batches[0], c, 1 + eps) - _loss_with_channel_scaled(model, batches[0], c, 1 - eps)) / (2 * eps)
        assert torch.allclose(d[:, c], fd, atol=1e-7), (c, d[:, c], fd)


def test_hessian_is_obd_on_the_channel_gate() -> None:
    """With deflation spanning every gate the estimate is exact: 1/2 d2 loss / dt2 of scaling the channel."""
    model, graph, batches = _small_bn_model()
    name = next(g.name for g in graph.groups() if "0" in g.out_layers)
    dim = sum(g.channels for g in graph.groups())
    got = CRITERIA.get("hessian").fn(model, graph, batches, 0, probes=0, rank=dim)[name]  # type: ignore[call-arg]
    eps = 1e-3
    for c in range(4):
        f = [_loss_with_channel_scaled(model, batches[0], c, t).mean() for t in (1 - eps, 1.0, 1 + eps)]
        second = (f[0] - 2 * f[1] + f[2]) / eps**2
        assert float(got[c]) == pytest.approx(max(0.0, 0.5 * float(second)), rel=1e-3, abs=1e-8), (c, got, second)
    assert (got > 0).any()


def test_deflated_hutchinson_beats_plain_hutchinson() -> None:
    """On a matrix with a dominant low-rank part (as loss Hessians have), 20 + 20 deflated products
    land far closer to the diagonal than 2000 plain probes."""
    from deploy_prune.importance import deflated_hutchinson

    g = torch.Generator().manual_seed(0)
    u = torch.randn(200, 5, generator=g)
    h = u @ torch.diag(torch.tensor([50.0, 20, 10, 5, 2])) @ u.T + 0.1 * torch.eye(200)
    exact = torch.diagonal(h)
    plain = deflated_hutchinson(lambda v: h @ v, 200, probes=2000, rank=0, gen=torch.Generator().manual_seed(1))
    deflated = deflated_hutchinson(lambda v: h @ v, 200, probes=20, rank=20, gen=torch.Generator().manual_seed(1))
    assert (deflated - exact).abs().max() < 0.01 * exact.max()
    assert (plain - exact).abs().max() > 10 * (deflated - exact).abs().max()


def test_fisher_needs_no_labels_and_is_seeded() -> None:
    model, graph, batches = _small_bn_model()
    name = next(g.name for g in graph.groups() if "0" in g.out_layers)
    a = score_groups(model, graph, "fisher", batches, seed=3)[name]
    b = score_groups(model, graph, "fisher", [(x, torch.zeros_like(y)) for x, y in batches], seed=3)[name]
    assert torch.equal(a, b) and (a > 0).all()


def test_hessian_names_the_op_without_second_derivatives() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Hardsigmoid(), nn.Conv2d(4, 3, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    graph = ModelGraph(model, (1, 6, 6))
    batch = [(torch.randn(8, 1, 6, 6), torch.arange(8) % 2)]
    with pytest.raises(UserError, match="hardsigmoid.*--criterion fisher"):
        score_groups(model, graph, "hessian", batch)
    assert score_groups(model, graph, "fisher", batch)  # the suggested criterion works there
