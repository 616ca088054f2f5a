"""DF (differentiable filter + low-rank compression): factorisation, SVT, the budget surrogate,
and compress --method df end to end on the tiny CNN."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.data import DataOptions, load_data
from deploy_prune.errors import BudgetUnreachable, UserError
from deploy_prune.graph import ModelGraph
from deploy_prune.methods.df import _cost, _Layer, _layers, _svt
from deploy_prune.models import build_model
from deploy_prune.models.checkpoint import load_model
from deploy_prune.pipeline import CompressConfig, compress
from deploy_prune.transforms import architecture_widths, group_widths, prune_to_widths, rebuild_pruned
from deploy_prune.transforms.lowrank import factorize, factorize_conv, lowrank_layers

runner = CliRunner()


def test_factorize_conv_is_the_truncated_svd() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 9)
    full = factorize_conv(conv, 10)
    torch.testing.assert_close(full(x), conv(x), rtol=1e-4, atol=1e-5)
    low = factorize_conv(conv, 3)
    assert (low[0].kernel_size, low[0].stride, low[1].kernel_size) == ((3, 3), (2, 2), (1, 1))
    w = conv.weight.detach().flatten(1)
    s = torch.linalg.svdvals(w)
    approx = (low[1].weight.flatten(1) @ low[0].weight.flatten(1)).detach()
    # Eckart-Young: the Frobenius error of the best rank-3 approximation is the tail of the spectrum
    assert float(torch.linalg.matrix_norm(w - approx)) == pytest.approx(float(s[3:].square().sum().sqrt()), rel=1e-4)
    # counted in MACs, rank 3 is cheaper than the dense conv and rank 9 is not
    li = _Layer("c", 9 * 6 * 10, 1.0, 6, 10, 9, None, None, False, True)
    for rank, pays in ((3, True), (9, False)):
        chosen: set[str] = set()
        _cost([li], {}, {"c": rank}, chosen=chosen)
        assert (chosen == {"c"}) is pays


def test_rank_groups_are_named_and_rebuild_reproduces_the_model() -> None:
    torch.manual_seed(0)
    m = build_model("resnet20", 10, 1).eval()
    factorize(m, {"layer1.0.conv1": 6, "layer2.1.conv2": 10})
    g = ModelGraph(m, (1, 28, 28), channel_multiple=1)
    w = group_widths(g)
    # the pair keeps its layer's group names; its inner channels are the group "<layer>:rank"
    assert w["layer1.0.conv1"] == 16 and w["layer1.0.conv1:rank"] == 6 and w["layer2.1.conv2:rank"] == 10
    assert "layer1.0.conv1.1" not in w
    prune_to_widths(m, (1, 28, 28), {"layer1.0.conv1:rank": 4, "layer1.0.conv1": 8})
    widths = group_widths(ModelGraph(m, (1, 28, 28)))
    fresh = build_model("resnet20", 10, 1)
    rebuild_pruned(fresh, {"widths": widths}, (1, 28, 28))
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(fresh.eval()(x), m(x))
    assert lowrank_layers(fresh) == {"layer1.0.conv1": 4, "layer2.1.conv2": 10}
    # A rank of 1 has no group (a one-channel group cannot be pruned): the record reads it off the
    # layer (a DF run on the AMD VM chose rank 1 and wrote a model.pt that could not be loaded).
    factorize(m, {"layer3.0.conv1": 1})
    g = ModelGraph(m, (1, 28, 28))
    assert "layer3.0.conv1:rank" not in group_widths(g) and architecture_widths(g)["layer3.0.conv1:rank"] == 1
    fresh = rebuild_pruned(build_model("resnet20", 10, 1), {"widths": architecture_widths(g)}, (1, 28, 28))
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.eval()(x), m(x))


def test_svt_soft_thresholds_singular_values_and_counts_the_rank() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    u, s, vh = torch.linalg.svd(w.flatten(1), full_matrices=False)
    gamma = (s[2] + s[3]) / 2
    out, g_r = _svt(w, gamma, tau=1e6)  # steep tanh: g_r counts the singular values above gamma
    expected = (u * torch.relu(s - gamma)) @ vh
    torch.testing.assert_close(out.flatten(1), expected, rtol=1e-4, atol=1e-5)
    assert float(g_r) == pytest.approx(3.0, abs=1e-3)
    # gradients reach the threshold and the weight without NaNs, also with tied (zero) rows
    w2 = w.clone()
    w2[:4] = 0
    w2.requires_grad_(True)
    gam = torch.tensor(0.1, requires_grad=True)
    o, r = _svt(w2, gam, tau=2.0)
    (o.square().sum() + r).backward()
    assert torch.isfinite(w2.grad).all() and torch.isfinite(gam.grad) and float(gam.grad) != 0


def test_surrogate_cost_matches_the_materialised_flops() -> None:
    torch.manual_seed(0)
    m = build_model("resnet20", 10, 1).eval()
    g = ModelGraph(m, (1, 28, 28), channel_multiple=1)
    layers = _layers(g, "flops", {"layer1.0.conv1", "layer3.0.conv1"})
    assert _cost(layers, {}, {}) == pytest.approx(g.flops_params()[0])
    keep = {"layer1.0.conv1": 8, "layer3.0.conv2": 40}
    ranks = {"layer1.0.conv1": 3, "layer3.0.conv1": 60}  # the second does not pay: stays dense
    chosen: set[str] = set()
    predicted = _cost(layers, keep, ranks, chosen=chosen)
    prune_to_widths(m, (1, 28, 28), keep)
    factorize(m, {n: ranks[n] for n in chosen})
    assert lowrank_layers(m) == {"layer1.0.conv1": 3}
    assert predicted == pytest.approx(ModelGraph(m, (1, 28, 28)).flops_params()[0])


@pytest.fixture(scope="module")
def target_yaml(quick_target_yaml: Callable[[int], Path]) -> Path:
    return quick_target_yaml(1)


def _cfg(tiny_run: Path, out: Path, target: Path, **kw: object) -> CompressConfig:
    base = dict(out=out, weights=str(tiny_run), data="digits", data_options=DataOptions(train_limit=300),
                target=str(target), epochs=1, batch_size=64, profiles=out.parent / "profiles", method="df",
                flops_ratio=0.5, method_options={"df_epochs": 2, "df_lr": 0.05})
    base.update(kw)
    return CompressConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def hybrid_run(tiny_run: Path, target_yaml: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("df") / "hybrid"
    return out, compress(_cfg(tiny_run, out, target_yaml))


def test_df_meets_a_flops_budget_and_writes_a_loadable_run(hybrid_run: tuple[Path, dict]) -> None:
    out, rep = hybrid_run
    assert rep["method"]["name"] == "df" and rep["met_budget"] is True
    assert rep["final"]["flops"] <= 0.5 * rep["baseline"]["flops"]
    s = rep["method"]["settings"]
    assert s["mode"] == "hybrid" and s["alpha"] == 50 and s["lambda"] == 1.0
    assert s["history"] and all(h["mu"] <= 50 for h in s["history"])
    assert {r["layer"] for r in rep["ranks"]} == set(s["factorized"])
    model, meta = load_model(out / "model.pt")
    assert lowrank_layers(model) == {r["layer"]: r["rank"] for r in rep["ranks"]}
    data = load_data("digits", DataOptions(train_limit=300))
    x = torch.stack([data.val[i][0] for i in range(4)])
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model.eval()(x[:1]), rtol=1e-3, atol=1e-4)
    md = (out / "report.md").read_text()
    assert ("## Low-rank layers" in md) == bool(rep["ranks"])


@pytest.mark.slow  # three full df runs; the default suite keeps the hybrid's own tests
def test_df_ablation_modes_touch_only_their_part(tiny_run: Path, target_yaml: Path, tmp_path: Path) -> None:
    filters = compress(_cfg(tiny_run, tmp_path / "f", target_yaml, method_options={"mode": "filters", "df_epochs": 2, "df_lr": 0.05}))
    assert filters["ranks"] == [] and filters["met_budget"]
    assert any(g["channels_after"] < g["channels_before"] for g in filters["layers"])
    ranks = compress(_cfg(tiny_run, tmp_path / "r", target_yaml, method_options={"mode": "ranks", "df_epochs": 2, "df_lr": 0.05}))
    assert ranks["ranks"] and ranks["met_budget"]
    assert all(g["channels_after"] == g["channels_before"] for g in ranks["layers"])


def test_df_bad_input(tiny_run: Path, target_yaml: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--method df cannot honour --keep-ratio; it takes --flops-ratio"):
        compress(_cfg(tiny_run, tmp_path / "a", target_yaml, flops_ratio=None))  # no budget: a keep ratio
    with pytest.raises(UserError, match="--df-mode must be one of"):
        compress(_cfg(tiny_run, tmp_path / "b", target_yaml, method_options={"mode": "both"}))
    with pytest.raises(BudgetUnreachable, match="below what df can reach"):
        compress(_cfg(tiny_run, tmp_path / "c", target_yaml, flops_ratio=0.001))
    with pytest.raises(UserError, match="--df-lr must be a positive number"):
        compress(_cfg(tiny_run, tmp_path / "d", target_yaml, method_options={"df_lr": float("nan")}))


def test_df_stops_on_nan_during_mask_learning(tiny_run: Path, target_yaml: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import deploy_prune.methods.df as df

    monkeypatch.setattr(df, "_svt", lambda w, gamma, tau: (w * float("nan"), gamma * 0))
    with pytest.raises(UserError, match="df mask learning diverged .* lower --df-lr"):
        compress(_cfg(tiny_run, tmp_path / "n", target_yaml))


def test_cli_df_mode_flag(tiny_run: Path, target_yaml: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["compress", "--weights", str(tiny_run), "--out", str(tmp_path / "x"), "--target", str(target_yaml),
                              "--method", "df", "--df-mode", "bogus", "--flops-ratio", "0.5"])
    assert res.exit_code == 2 and "--df-mode must be one of" in res.output


def test_lowrank_profile_prices_factorised_layers(tmp_path: Path) -> None:
    import copy

    from deploy_prune.config import Protocol, Target
    from deploy_prune.latency.lut import layer_ms, predict
    from deploy_prune.latency.profile import ProfileSpec, run_profile
    from deploy_prune.methods.df import Measured, _Layer

    torch.manual_seed(0)
    model = build_model("tiny-cnn", 10, 1)
    target = Target(name="fast", backend="onnxruntime", threads=1, channel_multiple=8,
                    protocol=Protocol(warmup=2, repeats=6, rounds=2, min_time_s=0.0))
    spec = ProfileSpec(model, "tiny-cnn", (1, 16, 16), target, lowrank=True)
    _, prof = run_profile(spec, tmp_path, calibrate=(0.5,))
    lr = prof["layers"]["features.3"]["lowrank"]
    assert lr["grid_rank"][-1] == 32 and lr["first"]["act"] == "" and tuple(lr["second"]["kernel"]) == (1, 1)
    assert "lowrank" not in prof["layers"]["classifier"]  # linear layers are not factorised
    fact = copy.deepcopy(model)
    factorize(fact, {"features.3": 8})
    pred = predict(fact, prof)
    assert {"features.3.0", "features.3.1"} <= set(pred["per_layer"])
    li = _Layer("features.3", 0.0, 1.0, 16, 32, 9, None, None, False, True)
    both = float(Measured(prof).factorized(li, 16, 8, 32))
    assert both == pytest.approx(pred["per_layer"]["features.3.0"] + pred["per_layer"]["features.3.1"])
    assert layer_ms(prof, "features.3.1", 8, 32) >= 0  # has an entry (it raises without one); a layer this small can net to 0
    # adding nothing new to a finished profile measures nothing again
    _, again = run_profile(spec, tmp_path, calibrate=(0.5,), reuse=True)
    assert again["configs_measured"] == 0 and again["configs_total"] == prof["configs_total"]


@pytest.mark.slow  # DF under the closed loop end to end; DF's budget and the loop are tested apart
def test_df_under_a_measured_latency_budget(tiny_run: Path, target_yaml: Path, tmp_path: Path) -> None:
    rep = compress(_cfg(tiny_run, tmp_path / "lat", target_yaml, flops_ratio=None, latency_ratio=0.7,
                        method_options={"df_epochs": 2, "df_lr": 0.05}))
    assert rep["budget"]["kind"] == "latency_ratio" and rep["budget"]["cost_model"] == "latency"
    stages = [s["stage"] for s in rep["steps"]]
    assert "plan" not in stages and stages[0] == "structured"  # learned, not planned: the loop tightens after
    assert all(s["measured_latency_ms"]["median"] > 0 for s in rep["steps"] if s["stage"] != "finetune")
    # the verdict is the pooled measurement's, and the predicted figure prices the factorised layers too
    assert rep["met_budget"] == ("<=" in rep["budget_note"].split(";")[-1])
    assert rep["final"]["predicted_latency_ms"] is not None
    assert rep["method"]["settings"]["rounds"] >= 1


def test_df_skips_depthwise_convs_with_a_note() -> None:
    from types import SimpleNamespace

    from deploy_prune.methods.df import DF

    m = build_model("mobilenet_v2", 10, 3).eval()
    g = ModelGraph(m, (3, 32, 32))
    run = SimpleNamespace(model=m, graph=g, ignore=[], notes=[])  # the narrow MethodContext is all a method needs
    rankable = DF()._rankable(run)  # type: ignore[arg-type]
    depthwise = {n for n, li in g.layers.items() if li.groups > 1}
    assert depthwise and rankable and not depthwise & rankable
    assert "classifier.1" not in rankable  # the output layer is never touched
    assert "cannot be factorised" in run.notes[0]
