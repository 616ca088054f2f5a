"""The Python API: the user's own model, data, training loop and metric through the same pipeline
as the CLI."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import UserNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deploy_prune as dp
from deploy_prune.data import DataOptions, load_data


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_data("digits", DataOptions(train_limit=300, image_size=8))


def _my_loop(calls: list[tuple[str, float]], train: Any) -> Callable[[nn.Module, float, dp.FinetuneContext], None]:
    """A user's own training loop (SGD, cross-entropy), holding the method's masks."""
    def finetune(model: nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
        calls.append((ctx.tag, epochs))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(ctx.seed))
        for _ in range(max(1, math.ceil(epochs))):
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                ctx.apply_masks(model)
    return finetune


def test_a_users_model_loop_and_metric(digits: Any, tmp_path: Path, deterministic_device: None,
                                       quick_target_yaml: Callable[[int], Path]) -> None:
    torch.manual_seed(0)
    model = UserNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[tuple[str, float]] = []
    xs, ys = zip(*(digits.val[i] for i in range(len(digits.val))), strict=True)
    x_val, y_val = torch.stack(xs), torch.as_tensor(ys)

    def top1(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float((m(x_val).argmax(1) == y_val).float().mean())

    result = dp.compress(model, torch.zeros(1, 1, 8, 8), target=str(quick_target_yaml(8)), budget=dp.LatencyRatio(0.85),
                         method="uniform", train=DataLoader(digits.train, batch_size=64), evaluate=top1,
                         finetune=_my_loop(calls, digits.train), out=tmp_path / "run", epochs=1, steps=1, profiles=tmp_path / "p")
    rep = result.report
    assert result.met_budget and rep["met_budget"] is True, rep["budget_note"]
    assert rep["metric"]["name"] == "top1" and rep["metric"]["source"] == "evaluate callback"
    assert rep["final"]["accuracy"] == pytest.approx(top1(result.model))
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched
    assert [t for t, _ in calls][-1] == "final" and any(t.startswith("step") for t, _ in calls)
    assert rep["model"]["spec"].startswith("helpers.UserNet@") and "/" not in rep["model"]["spec"]
    assert {"onnx", "checkpoint", "report"} <= set(result.paths)
    with pytest.raises(dp.UserError, match=r"holds your own model \(helpers.UserNet@[0-9a-f]+\); pass a fresh instance"):
        dp.load(result.out)
    again = dp.load(result.out, model=UserNet())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(again.eval()(x), result.model.eval()(x))
    assert "top1 (%)" in (result.out / "report.md").read_text()


def test_the_cli_and_the_api_make_the_same_decisions(tiny_run: Path, tmp_path: Path,
                                                     quick_target_yaml: Callable[[int], Path]) -> None:
    from typer.testing import CliRunner

    from deploy_prune.cli import app
    from deploy_prune.models.checkpoint import load_model

    common = dict(epochs=0, steps=2, step_fraction=0.5, batch_size=64, seed=3)
    target = str(quick_target_yaml(8))
    res = CliRunner().invoke(app, ["compress", "--weights", str(tiny_run), "--data", "digits", "--train-limit", "300",
                                   "--target", target, "--flops-ratio", "0.5", "--out", str(tmp_path / "cli"),
                                   "--profiles", str(tmp_path / "p"), "--epochs", "0", "--steps", "2", "--step-fraction", "0.5",
                                   "--batch-size", "64", "--seed", "3"])
    assert res.exit_code == 0, res.output
    cli = __import__("json").loads((tmp_path / "cli" / "report.json").read_text())
    model, _ = load_model(tiny_run)
    digits = load_data("digits", DataOptions(train_limit=300, seed=3))  # the CLI's --seed also seeds the split
    api = dp.compress(model, torch.zeros(1, 1, 32, 32), target=target, budget=dp.Flops(0.5), train=digits.train, val=digits.val,
                      out=tmp_path / "api", profiles=tmp_path / "p", **common).report
    assert api["layers"] == cli["layers"]
    assert [s["widths"] for s in api["steps"]] == [s["widths"] for s in cli["steps"]]
    assert api["final"]["accuracy"] == pytest.approx(cli["final"]["accuracy"])


def _tiny() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    return UserNet(), TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))


@pytest.mark.parametrize("change, message", [
    (dict(example_input=torch.zeros(1, 8, 8)), "example_input must be one batch of images (N, C, H, W)"),
    (dict(example_input=torch.zeros(1, 3, 8, 8)), "the model cannot run on example_input of shape [1, 3, 8, 8]"),
    (dict(example_input=torch.zeros(1, 1, 16, 16)), "example_input is [1, 1, 16, 16] but train images are [1, 8, 8]"),
    (dict(evaluate=lambda m: float("nan")), "evaluate returned nan; it must return a finite number"),
    (dict(evaluate=lambda m: "good"), "evaluate returned 'good'"),
    (dict(train=TensorDataset(torch.randn(8, 1, 8, 8))), "train items must be (input tensor, target) pairs"),
    (dict(train=None), "compress needs train data"),
    (dict(val=None), "give val (a Dataset of (input, target)) for the built-in accuracy, or evaluate="),
    (dict(no_such_setting=1), "--method uniform has no setting no_such_setting"),
    (dict(latency_ms=3.0), "compress takes latency_ms as its own arguments"),
])
def test_api_bad_input(tmp_path: Path, change: dict, message: str) -> None:
    model, ds = _tiny()
    args: dict[str, Any] = dict(example_input=torch.zeros(1, 1, 8, 8), target="cpu-ort-1t", budget=dp.Flops(0.5),
                                method="uniform", train=ds, val=ds, out=tmp_path / "run", epochs=0, steps=1,
                                profiles=tmp_path / "p")
    args.update(change)
    with pytest.raises(dp.UserError) as e:
        dp.compress(model, **args)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir()) or message.startswith("evaluate")


def test_a_finetune_that_raises_keeps_the_last_stage(tmp_path: Path, quick_target_yaml: Callable[[int], Path]) -> None:
    model, ds = _tiny()

    def broken(m: nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(dp.UserError, match=r"finetune raised RuntimeError: CUDA out of memory \(simulated\).*--resume"):
        dp.compress(model, torch.zeros(1, 1, 8, 8), target=str(quick_target_yaml(8)), budget=dp.Flops(0.8), method="uniform",
                    train=ds, val=ds, finetune=broken, out=tmp_path / "run", epochs=1, steps=1, profiles=tmp_path / "p")
    assert (tmp_path / "run" / "checkpoints" / "state.pt").is_file()


def test_budget_values_are_checked() -> None:
    with pytest.raises(dp.UserError, match=r"Latency\(ms\) must be a finite number > 0, got nan"):
        dp.Latency(ms=float("nan"))
    with pytest.raises(dp.UserError, match=r"LatencyRatio\(ratio\) must be a finite number in \(0, 1\), got 1.5"):
        dp.LatencyRatio(1.5)
    assert dp.Flops(0.5).settings() == {"flops_ratio": 0.5}


def test_the_package_exposes_its_api() -> None:
    assert {"compress", "profile", "measure", "load", "list_targets", "list_methods", "Latency", "Result"} <= set(dir(dp))
    assert "cpu-ort-1t" in dp.list_targets() and "deeplsp" in dp.list_methods()
    import deploy_prune.pipeline  # noqa: F401  (a submodule named like an API function would shadow it)

    assert callable(dp.compress) and callable(dp.profile) and callable(dp.measure) and callable(dp.load)
    for name in dp.__all__:  # every exported name resolves
        assert getattr(dp, name) is not None, name
    with pytest.raises(AttributeError):
        dp.no_such_thing  # noqa: B018


def test_measure_a_module_and_an_onnx_file(tiny_onnx: Path, quick_target_yaml: Callable[[int], Path]) -> None:
    model, _ = _tiny()
    target = str(quick_target_yaml(8))
    stats = dp.measure(model, target, torch.zeros(1, 1, 8, 8))
    assert stats.n >= 10 and 0 < stats.min <= stats.median
    assert dp.measure(tiny_onnx, target).median > 0
    with pytest.raises(dp.UserError, match="a module needs an example input"):
        dp.measure(model, target)


def test_the_closed_loop_step_by_step(digits: Any, tmp_path: Path, deterministic_device: None,
                                      quick_target_yaml: Callable[[int], Path]) -> None:
    """plan -> schedule -> apply + the user's training -> check: the widths compress would choose."""
    torch.manual_seed(0)
    model = UserNet()
    target = str(quick_target_yaml(8))
    common: dict[str, Any] = dict(target=target, budget=dp.LatencyRatio(0.85), method="uniform", train=digits.train,
                                  val=digits.val, profiles=tmp_path / "p", seed=1)
    planner = dp.planner(model, torch.zeros(1, 1, 8, 8), out=tmp_path / "steps", **common)
    widths = planner.plan()
    steps = planner.schedule(widths, 2)
    assert steps[-1] == widths and all(steps[0][g] >= widths[g] for g in widths) and steps[0] != widths
    calls: list[tuple[str, float]] = []
    loop = _my_loop(calls, digits.train)
    pruned = planner.apply(steps[0])
    loop(pruned, 0.5, dp.FinetuneContext(model, "mine", 0, {}))
    pruned = planner.apply(steps[1], pruned)
    check = planner.check(pruned)
    assert check.met and check.share <= 1.0 and check.budget_ms == pytest.approx(planner.budget["latency_ms"])
    assert check.latency_ms < 0.85 * planner.run.report["baseline"]["latency_ms"]["quiet"]
    assert not planner.check(model).met  # the unpruned model is over its own 85 %
    with pytest.raises(dp.UserError, match="widths name groups this model does not have"):
        planner.apply({"no.such.group": 8})
    one = dp.compress(model, torch.zeros(1, 1, 8, 8), out=tmp_path / "one", epochs=0, steps=1, **common).report
    assert {la["group"]: la["channels_after"] for la in one["layers"]} == {**planner.run.baseline_widths, **widths}


def test_a_users_loss_trains_inside_the_built_in_loop(digits: Any, tmp_path: Path, deterministic_device: None,
                                                     quick_target_yaml: Callable[[int], Path]) -> None:
    """``loss=`` replaces both distillation and cross-entropy in every built-in fine-tuning."""
    torch.manual_seed(0)
    seen: list[tuple[bool, int]] = []
    losses: list[float] = []

    def smoothed(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        seen.append((model.training, len(x)))
        loss = nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        losses.append(float(loss))
        return loss

    result = dp.compress(UserNet(), torch.zeros(1, 1, 8, 8), target=str(quick_target_yaml(8)), budget=dp.Flops(0.7),
                         method="uniform", train=digits.train, val=digits.val, loss=smoothed, out=tmp_path / "run",
                         epochs=3, steps=1, batch_size=32, lr=0.1, profiles=tmp_path / "p")
    rep = result.report
    assert rep["config"]["kd"] is False  # distillation would replace the user's loss
    # three epochs of 300 digits in batches of 32, every batch through the user's loss
    assert len(seen) >= 3 * (len(digits.train) // 32)
    assert all(training for training, _ in seen) and max(n for _, n in seen) == 32
    assert sum(losses[-5:]) < 0.97 * sum(losses[:5])  # the optimizer followed it (2.31 -> 2.19 here)
