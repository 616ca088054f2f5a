"""Channel splits (chunk, split with hard-coded sizes) are separated into one layer per part, exactly;
a block torch.fx cannot trace keeps its split and the layer before it is not pruned; layers that
share a concatenation are cut consistently."""

from __future__ import annotations

import torch
from torch import nn

from deploy_prune.graph import ModelGraph, keep_ratio_plan, output_layers
from deploy_prune.splits import separate_splits


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Chunked(nn.Module):
    """C2f's shape: one conv split in two halves, one half refined, all concatenated."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c
        self.cv1 = ConvBN(c, 2 * c)
        self.m = ConvBN(c, c)
        self.cv2 = ConvBN(3 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SizedSplit(Chunked):
    """C2PSA's shape: the split's sizes are numbers the block holds, which pruning cannot change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        return self.cv2(torch.cat((a, b, self.m(b)), 1))


class Untraceable(Chunked):
    """A split inside data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        if float(a.mean()) > 1e9:
            b = b * 2
        return self.cv2(torch.cat((a, b, self.m(b)), 1))


class Net(nn.Module):
    def __init__(self, block: type[Chunked]) -> None:
        super().__init__()
        self.stem = ConvBN(3, 16)
        self.block = block(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def _net(block: type[Chunked]) -> Net:
    torch.manual_seed(0)
    net = Net(block).eval()
    for m in net.modules():  # running statistics away from 0/1, so BatchNorm's cut is tested too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


def test_chunk_and_sized_split_become_one_layer_per_part_with_the_same_outputs() -> None:
    for block in (Chunked, SizedSplit):
        net = _net(block)
        x = torch.randn(2, 3, 12, 12)
        with torch.no_grad():
            want = net(x)
        done = separate_splits(net, x[:1])
        assert done.parts == {"block.cv1": ["block.cv1.0", "block.cv1.1"]} and not done.frozen
        assert [net.block.cv1[i].conv.out_channels for i in (0, 1)] == [16, 16]
        with torch.no_grad():
            torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
        assert not separate_splits(net, x[:1]).parts  # nothing left to separate: the rewrite is idempotent


def test_each_part_is_its_own_group_and_a_pruned_block_runs() -> None:
    for block in (Chunked, SizedSplit):
        net = _net(block)
        g = ModelGraph(net, (3, 12, 12))
        names = {i.name for i in g.groups()}
        assert {"block.cv1.0.conv", "block.cv1.1.conv"} <= names
        g.prune({"block.cv1.0.conv": list(range(12)), "block.cv1.1.conv": list(range(4))})  # uneven on purpose
        assert net.block.cv1[0].conv.out_channels == 4 and net.block.cv1[1].conv.out_channels == 12
        assert net.block.m.conv.in_channels == 12 and net.block.cv2.conv.in_channels == 4 + 12 + 16
        assert net(torch.randn(1, 3, 12, 12)).shape == (1, 5)


def test_a_split_that_cannot_be_traced_keeps_the_layer_before_it_whole() -> None:
    net = _net(Untraceable)
    g = ModelGraph(net, (3, 12, 12))
    assert g.splits.frozen == ["block.cv1"] and "block" in g.splits.left
    assert not any(n.startswith("block.cv1") for n in (i.name for i in g.groups()))
    assert any("its channel split is kept" in n for n in g.splits.notes())
    plan = keep_ratio_plan(g, 0.5)
    g.prune({n: list(range(k, g._info[n].channels)) for n, k in plan.items()})
    assert net(torch.randn(1, 3, 12, 12)).shape == (1, 5)


class TwoHeads(nn.Module):
    """Two outputs (a dict), and a concatenation two groups share, read by two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = ConvBN(3, 8), ConvBN(3, 8)
        self.c, self.d = ConvBN(16, 8), ConvBN(16, 8)
        self.box, self.cls = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = torch.cat((self.a(x), self.b(x)), 1)
        return {"boxes": self.box(self.c(y)), "scores": self.cls(self.d(y))}


def test_every_output_layer_is_kept_and_a_shared_concatenation_is_cut_consistently() -> None:
    torch.manual_seed(0)
    net = TwoHeads().eval()
    assert {id(m) for m in output_layers(net, torch.randn(1, 3, 8, 8))} == {id(net.box), id(net.cls)}
    g = ModelGraph(net, (3, 8, 8))
    assert {"box", "cls"} <= g.frozen_layers
    plan = {"a.conv": 5, "b.conv": 6}
    assert g.layer_widths(plan)["c.conv"] == (11, 8)  # a concatenation loses what each group loses
    predicted = g.predict_flops(plan)
    g.prune({"a.conv": [0, 1, 2], "b.conv": [5, 6]})  # both halves of the concatenation at once
    assert net.c.conv.in_channels == net.d.conv.in_channels == 5 + 6
    assert g.flops_params()[0] == predicted
    out = net(torch.randn(1, 3, 8, 8))
    assert out["boxes"].shape == (1, 4, 8, 8) and out["scores"].shape == (1, 3, 8, 8)


def test_a_model_with_a_dict_of_outputs_runs_through_the_api(tmp_path, quick_target_yaml) -> None:  # type: ignore[no-untyped-def]
    """Every output is named in the ONNX file and checked for parity; the run reloads."""
    import onnx
    from torch.utils.data import TensorDataset

    import deploy_prune as dp

    torch.manual_seed(0)
    net = TwoHeads()
    ds = TensorDataset(torch.randn(8, 3, 8, 8), torch.zeros(8))

    def score(m: nn.Module) -> float:
        with torch.no_grad():
            return float(m.eval()(torch.ones(1, 3, 8, 8))["scores"].mean())

    res = dp.compress(net, torch.zeros(1, 3, 8, 8), target=str(quick_target_yaml(4)), budget=dp.Flops(0.6), method="uniform",
                      train=ds, evaluate=score, out=tmp_path / "run", profiles=tmp_path / "p", epochs=0, steps=1)
    assert res.report["met_budget"] is True
    assert [o.name for o in onnx.load(str(res.paths["onnx"])).graph.output] == ["boxes", "scores"]
    record = __import__("json").loads((tmp_path / "run" / "model.onnx.json").read_text())
    assert record["parity_ok"] is True and record["top1_agreement"] is None
    again = dp.load(tmp_path / "run", model=TwoHeads())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), res.model.eval()(x))


def test_a_split_in_the_models_own_forward_keeps_its_layer_whole() -> None:
    torch.manual_seed(0)
    net = Chunked(8).eval()  # the block is the whole model
    g = ModelGraph(net, (8, 6, 6))
    assert g.splits.frozen == ["cv1"] and "(the model)" in g.splits.left
    g.prune({n: [0] for n in (i.name for i in g.groups())})
    assert net(torch.randn(1, 8, 6, 6)).shape == (1, 8, 6, 6)


def test_an_ignored_split_is_left_as_it_is() -> None:
    net = _net(Chunked)
    g = ModelGraph(net, (3, 12, 12), ignore=["block.cv1"])
    assert not g.splits.parts and g.splits.left == {"block": "listed in --ignore"}
    assert type(net.block) is Chunked and not any(i.name.startswith("block.cv1") for i in g.groups())
    g.prune({n: [0] for n in (i.name for i in g.groups())})
    assert net(torch.randn(1, 3, 12, 12)).shape == (1, 5)
