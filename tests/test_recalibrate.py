from __future__ import annotations

import torch
from torch import nn

from deploy_prune.train import recalibrate_bn


def test_recalibrate_bn_matches_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    model[1].running_mean.fill_(100.0)  # stale statistics, as after pruning
    x = torch.randn(64, 2, 4, 4) * 3 + 1
    w_before = model[0].weight.detach().clone()
    recalibrate_bn(model, [(x[:32], torch.zeros(32)), (x[32:], torch.zeros(32))])
    with torch.no_grad():
        act = model[0](x)
    assert torch.allclose(model[1].running_mean, act.mean((0, 2, 3)), atol=1e-4)
    assert model[1].momentum == 0.1 and not model.training
    assert torch.equal(model[0].weight, w_before)  # statistics only, no weight update
