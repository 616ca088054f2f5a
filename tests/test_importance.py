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


def _exact_obd(model: nn.Module, graph: ModelGraph, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OBD channel saliencies from the exact Hessian diagonal (one product per parameter)."""
    import torch.nn.functional as F
    import torch_pruning as tp

    from deploy_prune.importance import _by_tp

    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(batch[0]), batch[1]), params, create_graph=True)
    for k, p in enumerate(params):
        diag = torch.zeros_like(p).reshape(-1)
        for i in range(p.numel()):
            e = [torch.zeros_like(q) for q in params]
            e[k].view(-1)[i] = 1.0
            diag[i] = torch.autograd.grad(grads, params, grad_outputs=e, retain_graph=True)[k].reshape(-1)[i]
        p.grad = diag.view_as(p)
    scores = _by_tp(graph, tp.importance.GroupHessianImportance(group_reduction="mean", normalizer=None))
    model.zero_grad(set_to_none=True)
    return {k: (0.5 * v).clamp(min=0) for k, v in scores.items()}


def _small_bn_model() -> tuple[nn.Module, ModelGraph, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))  # 36 + 8 + 15 + 8 = 67 parameters
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 2, (16,), generator=g))]
    return model, ModelGraph(model, (1, 6, 6)), batches


def test_hessian_deflation_spanning_all_parameters_is_exact_obd() -> None:
    model, graph, batches = _small_bn_model()
    expected = _exact_obd(model, graph, batches[0])
    fn = CRITERIA.get("hessian").fn
    got = fn(model, graph, batches, 0, probes=0, rank=sum(p.numel() for p in model.parameters()))  # type: ignore[call-arg]
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.allclose(got[k], expected[k], rtol=1e-3, atol=1e-7), (k, got[k], expected[k])


def test_hessian_deflation_cuts_the_noise_of_plain_hutchinson() -> None:
    """Plain Hutchinson (rank 0) converges slowly to the exact OBD saliencies; deflating a
    20-dimensional dominant subspace gets far closer with 60 products instead of 2000."""
    model, graph, batches = _small_bn_model()
    expected = _exact_obd(model, graph, batches[0])
    fn = CRITERIA.get("hessian").fn
    plain = fn(model, graph, batches, 0, probes=2000, rank=0)  # type: ignore[call-arg]
    deflated = fn(model, graph, batches, 0, probes=20, rank=20)  # type: ignore[call-arg]
    for k in expected:
        scale = expected[k].max()
        assert (plain[k] - expected[k]).abs().max() < 0.5 * scale, (k, plain[k], expected[k])
        assert (deflated[k] - expected[k]).abs().max() < 0.02 * scale, (k, deflated[k], expected[k])
