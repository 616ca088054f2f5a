"""Inputs that used to give a wrong verdict or a traceback: user callbacks that change the model,
latency profiles with impossible entries, API arguments of the wrong kind, and settings that were
silently accepted. Each is one ``UserError`` line now."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import UserNet, fake_device, one_line
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import deploy_prune as dp
from deploy_prune.errors import UserError


class Other(nn.Module):
    """Another architecture (same group names, another head)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


class NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).flatten(1)[:, :10]


class OnlyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class TupleOut(UserNet):
    def forward(self, x: torch.Tensor) -> Any:
        y = super().forward(x)
        return y, y


class DictOut(UserNet):
    def forward(self, x: torch.Tensor) -> Any:
        return {"logits": super().forward(x)}


def _net() -> UserNet:
    torch.manual_seed(0)  # the same weights in every test: one latency profile serves them all
    return UserNet()


DATA = TensorDataset(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 10)


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture
def compress(tmp_path: Path, profiles: Path, real_profile: Path,
             quick_target_yaml: Callable[[int], Path]) -> Callable[..., dp.Result]:
    """``dp.compress`` of ``UserNet`` to half its FLOPs (no timing decides anything), overridable."""
    def call(**change: Any) -> dp.Result:
        args: dict[str, Any] = dict(model=_net(), example_input=torch.zeros(1, 1, 8, 8), target=str(quick_target_yaml(8)),
                                    budget=dp.Flops(0.5), method="uniform", train=DATA, val=DATA, out=tmp_path / "run",
                                    epochs=1, steps=2, batch_size=32, profiles=profiles)
        args.update(change)
        return dp.compress(**args)
    return call


# -- 1. user callbacks that change the model --------------------------------------------------
def _widen(m: nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
    m.body[0] = nn.Conv2d(1, 32, 3, padding=1)  # 32 channels where the plan keeps fewer
    m.body[1] = nn.BatchNorm2d(32)
    m.body[3] = nn.Conv2d(32, m.body[3].out_channels, 3, padding=1, stride=2)


def _nan(m: nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
    with torch.no_grad():
        m.body[0].weight.fill_(float("nan"))


def _append(m: nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
    m.extra = nn.Linear(10, 10)


def _double(m: nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
    m.double()


def test_a_finetune_that_widens_a_layer_stops_the_run(compress: Callable[..., dp.Result], deterministic_device: None,
                                                     tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        compress(finetune=_widen)
    assert re.match(r"finetune \(the 'step-1' fine-tuning\) changed the model it was given: body\.0\.weight has shape "
                    r"\[32, 1, 3, 3\] where the plan has \[\d+, 1, 3, 3\]", one_line(e)), one_line(e)
    assert not (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / "model.onnx").exists()
    ck = torch.load(tmp_path / "run" / "checkpoints" / "state.pt", weights_only=True)
    assert ck["done"] == ["baseline"]  # the changed model was never checkpointed


@pytest.mark.parametrize("finetune, message", [
    (_nan, "finetune (the 'final' fine-tuning) left non-finite values in the model: body.0.weight holds NaN (144 of 144 "
           "values); lower the learning rate or check the loss"),
    (_append, "finetune (the 'final' fine-tuning) changed the model it was given: added extra (Linear); a callback must "
              "keep the model's layers, widths and dtype (the pipeline's plan) and change only its weights"),
    (_double, "finetune (the 'final' fine-tuning) changed the model it was given: body.0.weight and 13 more tensor(s) "
              "became float64 (was float32); a callback must keep"),
])
def test_a_finetune_that_changes_the_model_is_refused(tmp_path: Path, finetune: Any, message: str) -> None:
    from deploy_prune.pipeline import CompressConfig, UserParts
    from deploy_prune.pipeline.run import FitJob, run_job

    model = _net()
    job = FitJob(epochs=1, tag="final", resume=False, subset_seed=0, masks={}, meta={})
    with pytest.raises(UserError) as e:
        run_job(job, model, _net(), None, CompressConfig(out=tmp_path, weights=""),  # type: ignore[arg-type]
                UserParts(finetune=finetune), tmp_path)
    assert one_line(e).startswith(message)
    fine = run_job(job, model := _net(), _net(), None, CompressConfig(out=tmp_path, weights=""),  # type: ignore[arg-type]
                   UserParts(finetune=lambda m, epochs, ctx: m.body[0].weight.data.mul_(0.5)), tmp_path)
    assert fine["epochs_run"] == 1  # a finetune that only changes weights passes


def test_an_evaluate_that_changes_the_model_is_refused(compress: Callable[..., dp.Result], tmp_path: Path) -> None:
    def recast(m: nn.Module) -> float:
        m.double()
        return 0.5

    with pytest.raises(UserError, match=r"^evaluate changed the model it was given: body\.0\.weight and \d+ more tensor"
                                        r"\(s\) became float64 \(was float32\); a callback must keep"):
        compress(evaluate=recast)


def test_a_loss_that_changes_the_model_is_refused() -> None:
    from deploy_prune.pipeline.run import ModelChanged, checked_loss

    def loss(m: nn.Module, batch: Any) -> torch.Tensor:
        m.head = nn.Sequential(m.head, nn.Linear(10, 10))
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    model, (x, y) = _net(), (DATA.tensors[0][:4], DATA.tensors[1][:4])
    ok = checked_loss(lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    assert torch.isfinite(ok(model, x, y)) and torch.isfinite(ok(model, x, y))  # a loss that only computes passes
    with pytest.raises(ModelChanged, match=r"^loss changed the model it was given: added head\.0 \(Linear\); added head\.1 "
                                           r"\(Linear\); head is now a Sequential, not a Linear; a callback"):
        checked_loss(loss)(_net(), x, y)


# -- 2. latency profiles with impossible entries, non-finite run state -------------------------
@pytest.fixture(scope="module")
def real_profile(profiles: Path, quick_target_yaml: Callable[[int], Path]) -> Path:
    """The target's latency profile of ``UserNet`` in the module's profiles directory (made once, on
    the ``deterministic_device`` timings), where compress finds it."""
    from deploy_prune.api import model_spec
    from deploy_prune.latency.profile import ProfileSpec, describe, profile_path, run_profile
    from deploy_prune.target import load_target

    spec = ProfileSpec(_net(), model_spec(_net()), (1, 8, 8), load_target(str(quick_target_yaml(8))))
    path = profile_path(profiles, spec.target, describe(spec)[2])
    if not path.is_file():
        with pytest.MonkeyPatch.context() as mp:
            fake_device(mp, lambda weights: 0.01 + 1e-6 * sum(w.size for w in weights))
            run_profile(spec, profiles, calibrate=(0.5,), calibrate_mixed=0)  # few exports: a fast profile
    return path


@pytest.mark.parametrize("value, what", [(-0.151, "-0.151; a time must be a finite number >= 0"),
                                         (float("nan"), "nan; a time must be a finite number >= 0")])
def test_a_profile_with_impossible_entries_is_refused_on_load(real_profile: Path, tmp_path: Path, profiles: Path,
                                                              compress: Callable[..., dp.Result], value: float,
                                                              what: str) -> None:
    from deploy_prune.latency.lut import LatencyTable
    from deploy_prune.latency.profile import load_profile

    prof = json.loads(real_profile.read_text())
    key = sorted(prof["entries"])[0]
    prof["entries"][key]["predict_ms"] = value
    bad_dir = tmp_path / "profiles"
    shutil.copytree(profiles, bad_dir)
    bad = bad_dir / real_profile.relative_to(profiles)
    bad.write_text(json.dumps(prof))  # json writes NaN as the bare NaN a hand edit would
    want = f"latency profile {str(bad)!r} is unusable: entry {key!r} predict_ms is {what}; delete it and profile again"
    for load in (LatencyTable.load, load_profile):
        with pytest.raises(UserError) as e:
            load(bad)
        assert one_line(e).startswith(want)
    with pytest.raises(UserError) as e:  # compress refuses it before any planning
        compress(budget=dp.LatencyRatio(0.5), profiles=bad_dir)
    assert one_line(e).startswith(want)
    assert not (tmp_path / "run" / "checkpoints" / "state.pt").exists()


def test_a_profile_missing_an_entry_is_refused(real_profile: Path, tmp_path: Path) -> None:
    from deploy_prune.latency.lut import LatencyTable

    prof = json.loads(real_profile.read_text())
    key = sorted(prof["entries"])[-1]
    del prof["entries"][key]
    (tmp_path / "p.json").write_text(json.dumps(prof))
    with pytest.raises(UserError) as e:
        LatencyTable.load(tmp_path / "p.json")
    assert f"lacks its entry {key!r}; delete it and profile again" in one_line(e)


def test_non_finite_run_state_is_never_checkpointed_nor_resumed(tmp_path: Path, quick_target_yaml: Callable[[int], Path]) -> None:
    from deploy_prune.api import _prepare
    from deploy_prune.models.checkpoint import save_checkpoint
    from deploy_prune.pipeline.run import Run

    cfg, parts = _prepare(_net(), torch.zeros(1, 1, 8, 8), target=str(quick_target_yaml(8)), budget=dp.Flops(0.5),
                          method="uniform", train=DATA, val=DATA, finetune=None, evaluate=None, loss=None, metric=None,
                          out=tmp_path / "run", settings={})
    run = Run(cfg, parts=parts)
    run.state["budget"] = {"kind": "latency_ms", "cost_budget": float("nan")}
    with pytest.raises(UserError) as e:
        run.checkpoint("baseline")
    assert one_line(e).startswith("stage 'baseline' produced a non-finite number (state['budget']['cost_budget'] = nan); "
                                  "it was not checkpointed")
    state = tmp_path / "run" / "checkpoints" / "state.pt"
    assert not state.exists() and run.done == []
    run.state["budget"]["cost_budget"] = 1.0
    run.checkpoint("baseline")
    assert state.is_file()
    # A state saved with a NaN (as runs did before it was refused) is not resumed either.
    save_checkpoint(state, run.model, run.meta_pruned(), masks={}, done=["baseline"], report=json.dumps(run.report),
                    run_state='{"budget": {"cost_budget": NaN}}')
    with pytest.raises(UserError) as e:
        run.restore()
    assert one_line(e) == (f"{str(state)!r} holds a non-finite number (NaN) from a failed run; it cannot be resumed: "
                           "rerun with --overwrite (profile again first if the latency profile was the cause)")


# -- 3. API arguments of the wrong kind: one line, early --------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(model=NoLayers()), r"the model \(test_reliability_inputs\.NoLayers@[0-9a-f]+\) has no Conv2d or Linear layer: "
                             r"deploy-prune prunes the channels of those, so there is nothing to prune"),
    (dict(model=OnlyHead()), r"the model \(test_reliability_inputs\.OnlyHead@[0-9a-f]+\) has no prunable channel group: "
                             r"its conv/linear layers \(fc\) all produce the output"),
    (dict(model=TupleOut()), r"the model's forward returns a tuple; the built-in accuracy needs one \(N, classes\) "
                             r"tensor: pass evaluate=\(model\) -> float$"),
    (dict(model=DictOut()), r"the model's forward returns a dict; the built-in accuracy needs one"),
    (dict(model=None), r"model must be a torch nn\.Module, got NoneType$"),
    (dict(example_input=[[0.0]]), r"example_input must be one batch of images \(N, C, H, W\) as a float tensor, "
                                  r"e\.g\. torch\.zeros\(1, 3, 224, 224\), got a list$"),
    (dict(example_input=torch.zeros(1, 1, 8, 8, dtype=torch.long)), r"example_input must be .* got a int64 tensor of shape"),
    (dict(budget=0.5), r"budget must be one of dp\.Latency\(ms=\.\.\.\), dp\.LatencyRatio\(r\), dp\.Flops\(r\), "
                       r"dp\.Params\(r\), dp\.Channels\(r\) or dp\.Sparsity\(r\), got 0\.5 \(float\)"),
    (dict(budget="flops=0.5"), r"budget must be one of .* got 'flops=0\.5' \(str\)"),
    (dict(target=None), r"target must be a target name \(dp\.list_targets\(\)\) or a loaded Target, got None$"),
])
def test_api_arguments_of_the_wrong_kind(compress: Callable[..., dp.Result], tmp_path: Path, change: dict,
                                         message: str) -> None:
    with pytest.raises(UserError) as e:
        compress(**change)
    assert re.match(message, one_line(e)), one_line(e)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A compress run's model.pt, as the pipeline writes it (``Run.meta_pruned``), of ``UserNet`` cut."""
    from deploy_prune.graph import ModelGraph
    from deploy_prune.models.checkpoint import save_checkpoint
    from deploy_prune.transforms import architecture_widths, prune_to_widths

    model = _net()
    prune_to_widths(model, (1, 8, 8), {"body.0": 8, "body.3": 16}, [])
    widths = architecture_widths(ModelGraph(model, (1, 8, 8), []))
    path = tmp_path_factory.mktemp("run") / "model.pt"
    save_checkpoint(path, model, {"model": {"spec": "test_reliability_inputs.Net@0123456789ab", "num_classes": 10,
                                            "in_channels": 1}, "input_shape": [1, 8, 8],
                                  "pruned": {"widths": widths, "ignore": []}})
    return path, model


def test_load_into_another_architecture_names_the_first_mismatch(pruned_run: tuple[Path, nn.Module]) -> None:
    path, model = pruned_run
    with pytest.raises(UserError) as e:
        dp.load(path, model=Other())
    assert one_line(e) == (f"{str(path)!r} does not fit this Other: first mismatch fc.weight (in your model, not in the "
                           "run); pass a fresh instance of the architecture the run compressed "
                           "(test_reliability_inputs.Net@0123456789ab)")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(dp.load(path, model=UserNet()).eval()(x), model.eval()(x))  # the right one loads


# -- 4. settings that were silently accepted ---------------------------------------------------
def test_two_budgets_are_refused(tmp_path: Path) -> None:
    from deploy_prune.cli import app
    from deploy_prune.pipeline import CompressConfig

    # Refused before anything loads: the weights named here do not even exist.
    res = CliRunner().invoke(app, ["compress", "--weights", str(tmp_path / "none.pt"), "--keep-ratio", "0.3",
                                   "--flops-ratio", "0.5", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "conflicting budgets --flops-ratio, --keep-ratio: give one of" in res.output.replace("\n", " ")
    assert not (tmp_path / "out").exists()
    assert CompressConfig(out=tmp_path, weights="").budget_kind() == ("keep_ratio", 0.5)  # none given: the default
    assert CompressConfig(out=tmp_path, weights="", keep_ratio=0.3).budget_kind() == ("keep_ratio", 0.3)


def test_a_target_with_a_duplicated_key_is_refused(tmp_path: Path) -> None:
    from deploy_prune.target import load_target

    yaml = tmp_path / "dup.yaml"
    yaml.write_text("name: dup\nbackend: onnxruntime\nthreads: 1\nwarmup: 2\nthreads: 4\n")
    with pytest.raises(UserError) as e:
        load_target(str(yaml))
    assert one_line(e) == f"target file {str(yaml)!r}: key 'threads' appears twice on lines 3 and 5; keep one of them"
    yaml.write_text("name: dup\nbackend: onnxruntime\nagent: {url: 'http://a:1', url: 'http://b:1'}\n")
    with pytest.raises(UserError, match=r"key 'url' appears twice on line 3; keep one of them"):
        load_target(str(yaml))


@pytest.fixture(scope="module")
def planner(profiles: Path, tmp_path_factory: pytest.TempPathFactory, quick_target_yaml: Callable[[int], Path],
            real_profile: Path) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        fake_device(mp, lambda weights: 0.01 + 1e-6 * sum(w.size for w in weights))
        return dp.planner(_net(), torch.zeros(1, 1, 8, 8), target=str(quick_target_yaml(8)), budget=dp.Flops(0.5),
                          method="uniform", train=DATA, val=DATA, out=tmp_path_factory.mktemp("planner") / "run",
                          profiles=profiles)


@pytest.mark.parametrize("width, message", [
    (-5, "width -5 of group 'body.0' is out of range: the group has 16 channels; give one of 4, 8, 16"),
    (0, "width 0 of group 'body.0' is out of range: the group has 16 channels; give one of 4, 8, 16"),
    (1000, "width 1000 of group 'body.0' is out of range: the group has 16 channels; give one of 4, 8, 16"),
    (5, "width 5 of group 'body.0' is not one target quick8 allows (multiples of 8, its narrow widths, or all 16 "
        "channels); the nearest allowed: 4 or 8"),
    (2, "width 2 of group 'body.0' is not one target quick8 allows (multiples of 8, its narrow widths, or all 16 "
        "channels); the nearest allowed: 4"),
    (8.0, "width of group 'body.0' must be a whole number of channels, got 8.0"),
])
def test_planner_apply_refuses_widths_the_target_does_not_allow(planner: Any, width: Any, message: str) -> None:
    with pytest.raises(UserError) as e:
        planner.apply({"body.0": width})
    assert one_line(e) == message
    cut = planner.apply({"body.0": 8, "body.3": 24})
    assert cut.body[0].out_channels == 8 and cut.body[3].out_channels == 24


DEEP = "[" * 200_000 + "]" * 200_000  # deeper than Python's parsers recurse
BIG = "9" * 5000  # more digits than Python converts to an int


@pytest.mark.parametrize("text, problem", [
    (DEEP, "nests too deeply to be a {what}"),
    ('{"entries": ' + BIG + "}", "is not a readable {what} (Exceeds the limit (4300 digits) for integer string conversion)"),
])
def test_a_profile_or_target_file_nested_too_deeply_is_one_line(tmp_path: Path, text: str, problem: str) -> None:
    from deploy_prune.latency.lut import LatencyTable
    from deploy_prune.latency.profile import load_profile
    from deploy_prune.target import load_target

    prof = tmp_path / "p.json"
    prof.write_text(text)
    for load, what in ((load_profile, "deploy-prune profile"), (LatencyTable.load, "deploy-prune latency table")):
        with pytest.raises(UserError) as e:
            load(prof)
        assert one_line(e) == f"{str(prof)!r} {problem.format(what=what)}; delete it and profile again"

    target = tmp_path / "t.yaml"
    target.write_text("name: t\nbackend: onnxruntime\nthreads: " + (DEEP if text == DEEP else BIG) + "\n")
    with pytest.raises(UserError) as e:
        load_target(str(target))
    assert one_line(e) == f"target file {str(target)!r} {problem.format(what='target')}; fix the file"
