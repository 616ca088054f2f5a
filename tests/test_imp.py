"""Unstructured methods: PQ index, the prune-retrain engine, InCoP's flows, and compress with --sparsity."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError
from deploy_prune.methods import get_method
from deploy_prune.methods.imp import pq_index, sap_count
from deploy_prune.models import build_model
from deploy_prune.pipeline import CompressConfig, compress
from deploy_prune.train.flows import FlowStop, flow_distance, gradient_flow, information_flow
from deploy_prune.transforms import sparsity


@pytest.fixture(scope="module")
def target_yaml(quick_target_yaml: Callable[[int], Path]) -> Path:
    return quick_target_yaml(1)


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One profile directory for the module: the tiny CNN is profiled once, not per test."""
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture
def cfg(tiny_run: Path, target_yaml: Path, profiles: Path) -> Callable[..., CompressConfig]:
    """A quick compress config on the tiny digits run; keywords override."""
    def make(out: Path, **kw: object) -> CompressConfig:
        base = dict(out=out, weights=str(tiny_run), data="digits", data_options=DataOptions(train_limit=300),
                    target=str(target_yaml), epochs=1, batch_size=64, profiles=profiles, method="network",
                    sparsity=0.6, method_options={"iterations": 2, "retrain_epochs": 1})
        base.update(kw)
        return CompressConfig(**base)  # type: ignore[arg-type]
    return make


def test_pq_index_and_sap_count() -> None:
    flat = torch.ones(100)
    assert pq_index(flat, 0.5, 1.0) == pytest.approx(0.0, abs=1e-12)  # nothing is compressible
    spiky = torch.cat([torch.full((10,), 10.0), torch.full((90,), 0.01)])
    assert 0.5 < pq_index(spiky, 0.5, 1.0) < 1 and 0.5 < pq_index(spiky, 1.0, 2.0) < 1
    assert pq_index(torch.cat([spiky, torch.zeros(50)]), 0.5, 1.0) == pytest.approx(pq_index(spiky, 0.5, 1.0))  # zeros are gone
    # r = d (1 + eta)^-2 (1 - I) for (p, q) = (0.5, 1): a flat layer loses only the eta margin
    assert sap_count(flat, 0.5, 1.0, 0.001, 1.2, 0.9) == int(100 * 1.2 * (1 - 1.001 ** -2))
    assert sap_count(spiky, 0.5, 1.0, 0.001, 1.2, 0.9) > 50  # a compressible layer loses more
    assert sap_count(spiky, 0.5, 1.0, 0.001, 10.0, 0.9) == 90  # beta caps one iteration


def test_flows_are_zero_distance_to_themselves_and_move_with_pruning() -> None:
    torch.manual_seed(0)
    model = build_model("tiny-cnn", 10, 1).eval()
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    star_if, star_gf = information_flow(model, batches), gradient_flow(model, batches)
    assert len(star_if) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules()) - 1
    assert flow_distance(information_flow(model, batches), star_if) == pytest.approx(0.0, abs=1e-9)
    assert flow_distance(gradient_flow(model, batches), star_gf) == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight[m.weight.abs() < m.weight.abs().median()] = 0
    assert flow_distance(information_flow(model, batches), star_if) > 0.05


def test_flow_stop_scales_epsilon_by_the_distance_the_cut_left() -> None:
    torch.manual_seed(0)
    dense = build_model("tiny-cnn", 10, 1).eval()
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    pruned = build_model("tiny-cnn", 10, 1).eval()
    pruned.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight[m.weight.abs() < m.weight.abs().median()] = 0
    for kind in ("if", "gf"):
        rel = FlowStop(kind, 0.5, batches, scale="pruned")
        rel.reference(dense)
        rel.begin(pruned, {})
        assert rel.after_prune > 0 and rel.threshold == pytest.approx(0.5 * rel.after_prune)
        assert not rel(pruned, 1)  # nothing retrained: still at the full distance, above half of it
        assert rel(dense, 1)  # back at the dense flow: distance 0
        fixed = FlowStop(kind, 0.5, batches, scale="dense")
        fixed.reference(dense)
        fixed.begin(pruned, {})
        assert fixed.threshold == 0.5
    with pytest.raises(ValueError, match="scale"):
        FlowStop("if", 0.1, batches, scale="absolute")


SLOW = pytest.mark.slow  # every method runs in make test-all; the default suite keeps one of each family


@pytest.mark.parametrize("method,options", [
    ("network", {"iterations": 2}), pytest.param("lth", {"iterations": 3}, marks=SLOW), ("sap", {"iterations": 3}),
    pytest.param("snip", {}, marks=SLOW), pytest.param("loss-based", {"iterations": 2}, marks=SLOW),
    ("weight-to-node", {}), pytest.param("greg", {"reg_epochs": 1}, marks=SLOW),
    ("admm", {"reg_epochs": 2, "stages": 2}), pytest.param("learnable-threshold", {"reg_epochs": 1}, marks=SLOW),
    pytest.param("structured", {"granularity": "kernel"}, marks=SLOW),
    ("structured", {"granularity": "filter", "search": "particle-filter", "particles": 3, "rounds": 1}),
])
def test_sparsity_methods_reach_the_target_and_hold_their_zeros(cfg: Callable[..., CompressConfig], tmp_path: Path,
                                                                method: str, options: dict) -> None:
    rep = compress(cfg(tmp_path / method, method=method, sparsity=0.5,
                        method_options={"retrain_epochs": 1, **options}))
    iters = [s for s in rep["steps"] if s["stage"] == "imp"]
    assert iters and all(s["epochs_run"] == 1 for s in iters)
    assert [s["sparsity"] for s in iters] == sorted(s["sparsity"] for s in iters)  # never un-prunes
    if method != "structured":
        assert iters[-1]["sparsity"] <= 0.5 + 1e-6  # the target is never overshot (structured rounds units up)
    if method not in ("lth", "sap"):  # these two count by their own rule within the given iterations
        assert rep["met_budget"] and rep["final"]["sparsity"] >= 0.499
    if method in ("greg", "admm", "learnable-threshold"):
        assert [s["stage"] for s in rep["steps"]][:2] == ["regularize", "imp"]
    assert rep["final"]["sparsity"] == pytest.approx(iters[-1]["sparsity"], abs=2e-3)  # zeros held in fine-tuning
    assert rep["budget"]["kind"] == "sparsity" and any("do not lower dense latency" in n for n in rep["notes"])
    assert rep["final"]["flops"] == rep["baseline"]["flops"]  # unstructured: the dense graph is unchanged


def test_incop_stops_retraining_on_flow_consistency(cfg: Callable[..., CompressConfig], tmp_path: Path) -> None:
    # An epsilon on the dense scale that no relative distance reaches: every flow is "consistent",
    # so every iteration stops after its first epoch of at most 3. (On GF's default "pruned"
    # scale the threshold is a multiple of the distance right after the cut, which a cut of few
    # weights can leave near zero: no epsilon makes that scale stop for certain.)
    rep = compress(cfg(tmp_path / "incop", method="incop", sparsity=0.9,
                        method_options={"iterations": 2, "retrain_epochs": 3, "flow": "gf", "eps": 1e9,
                                        "eps_scale": "dense"}))
    iters = [s for s in rep["steps"] if s["stage"] == "imp"]
    assert [s["epochs_run"] for s in iters] == [1, 1] and all(len(s["flow_distances"]) == 1 for s in iters)
    assert all(s["flow_after_prune"] > 0 for s in iters)
    assert get_method("incop", flow="gf").settings()["eps_scale"] == "pruned"  # GF's default scale
    strict = compress(cfg(tmp_path / "incop0", method="incop", sparsity=0.9,
                           method_options={"iterations": 1, "retrain_epochs": 2, "flow": "if", "eps": 0.0}))
    (it,) = [s for s in strict["steps"] if s["stage"] == "imp"]
    assert it["epochs_run"] == 2 and it["flow_distances"][0] > 0  # eps 0 is never met: the full E epochs


def test_sparsity_budget_and_options_bad_input(cfg: Callable[..., CompressConfig], tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(UserError, match="cannot honour --sparsity"):
        compress(cfg(tmp_path / "a", method="deeplsp", method_options={}))
    with pytest.raises(UserError, match="--method deeplsp has no setting iterations, retrain_epochs"):
        compress(cfg(tmp_path / "a2", method="deeplsp"))  # network's settings do not reach another method
    with pytest.raises(UserError, match="cannot honour --flops-ratio"):
        compress(cfg(tmp_path / "b", sparsity=None, flops_ratio=0.5))
    with pytest.raises(UserError, match=r"--sparsity must be a finite number in \(0, 1\), got 1.0"):
        compress(cfg(tmp_path / "c", sparsity=1.0))
    with pytest.raises(UserError, match="need 0 < p < q"):
        get_method("sap", p=2.0, q=1.0)
    r = CliRunner().invoke(app, ["compress", "--weights", str(tiny_run), "--data", "digits", "--method", "sap",
                                 "--sparsity", "0.5", "-O", "iteration=3", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "has no setting iteration" in r.output and "iterations" in r.output


def test_sparsity_is_over_the_unignored_layers() -> None:
    model = build_model("tiny-cnn", 10, 1)
    with torch.no_grad():
        model.classifier.weight.zero_()  # type: ignore[union-attr,operator]
    assert sparsity(model) > 0 and sparsity(model, ["classifier"]) == 0


def test_structured_units_and_nm_masks() -> None:
    from deploy_prune.methods.granular import unit_mask
    from deploy_prune.transforms import nm_masks

    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    w[1] *= 0.01  # the weakest filter
    keep = unit_mask(w, "filter", 0.25)
    assert not keep[1].any() and keep[[0, 2, 3]].all()
    kern = unit_mask(w, "kernel", 0.5)
    assert all(bool(kern[o, i].all()) or not bool(kern[o, i].any()) for o in range(4) for i in range(3))  # whole kernels
    intra = unit_mask(w, "intra-kernel", 0.5)
    assert all(bool(intra[o, :, y, x].all()) or not bool(intra[o, :, y, x].any()) for o in range(4) for y in range(3) for x in range(3))
    model = build_model("tiny-cnn", 10, 1)
    masks, skipped = nm_masks(model, 2, 4)
    assert skipped == ["features.0"]  # one input channel: no runs of 4
    runs = masks["features.3"].permute(0, 2, 3, 1).reshape(-1, 4).sum(1)
    assert bool((runs == 2).all())


def test_nm_flag_on_compress(cfg: Callable[..., CompressConfig], tmp_path: Path) -> None:
    rep = compress(cfg(tmp_path / "nm", method="network", sparsity=0.3,
                        method_options={"iterations": 1, "retrain_epochs": 1}, nm="2:4"))
    from deploy_prune.models.checkpoint import load_model

    model, _ = load_model(tmp_path / "nm" / "model.pt")
    w = dict(model.named_modules())["features.6"].weight  # type: ignore[union-attr]
    nonzero = (w != 0).permute(0, 2, 3, 1).reshape(-1, 4).sum(1)
    assert bool((nonzero <= 2).all())  # 2:4 held through the fine-tuning
    assert rep["final"]["sparsity"] > 0.45  # 2:4 everywhere but the 144 weights of the first conv
    assert any("2:4 semi-structured" in n for n in rep["notes"])
    with pytest.raises(UserError, match="--nm must be N:M"):
        compress(cfg(tmp_path / "nm2", nm="2-4"))
