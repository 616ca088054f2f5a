"""compress end to end on the tiny CNN: budgets, closed loop, run directory, resume, gate, bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.data import DataOptions, load_data
from deploy_prune.errors import UserError
from deploy_prune.models.checkpoint import load_model
from deploy_prune.pipeline import REMEASURE, CompressConfig, compress, quietest_take
from deploy_prune.train import evaluate

runner = CliRunner()


@pytest.fixture(scope="module")
def target_yaml(quick_target_yaml: Callable[[int], Path]) -> Path:
    """ONNX Runtime on one thread, channels in 8s, a protocol short enough for tests."""
    return quick_target_yaml(8)


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One latency table of the tiny CNN on the test target, measured once for the module's runs
    (the test that checks a missing table is made on the spot has its own directory)."""
    return tmp_path_factory.mktemp("profiles")


def _cfg(tiny_run: Path, out: Path, target: Path, profiles: Path | None = None, **kw: object) -> CompressConfig:
    base = dict(out=out, weights=str(tiny_run), data="digits", data_options=DataOptions(train_limit=300),
                target=str(target), epochs=1, step_fraction=0.5, sensitivity_samples=200, score_batches=2,
                batch_size=64, profiles=profiles or out.parent / "profiles")
    base.update(kw)
    return CompressConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def flops_run(tiny_run: Path, target_yaml: Path, tmp_path_factory: pytest.TempPathFactory, profiles: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compress") / "flops"
    return out, compress(_cfg(tiny_run, out, target_yaml, profiles, flops_ratio=0.5, amount=0.2))


def test_flops_budget_run_directory_and_report(flops_run: tuple[Path, dict]) -> None:
    out, rep = flops_run
    for f in ("model.onnx", "model.pt", "model.pt2", "report.json", "report.md", "report.html", "sensitivity.json",
              "checkpoints/state.pt"):
        assert (out / f).is_file(), f
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    assert rep["budget"]["kind"] == "flops_ratio" and rep["met_budget"] is True
    assert rep["final"]["flops"] <= 0.5 * rep["baseline"]["flops"]
    for key in ("accuracy", "latency_ms", "predicted_latency_ms", "flops", "params"):
        assert rep["baseline"][key] is not None and rep["final"][key] is not None, key
    assert {"median", "p90"} <= set(rep["final"]["latency_ms"])
    assert rep["final"]["sparsity"] == pytest.approx(0.2, abs=0.02)
    assert any("do not lower dense latency" in n for n in rep["notes"])
    assert [s["stage"] for s in rep["steps"]].count("structured") == 3  # DeepLSP's default steps
    widths = {la["group"]: la["channels_after"] for la in rep["layers"]}
    assert all(w % 8 == 0 for w in widths.values())
    assert rep["provenance"]["tool_version"] and rep["stage_seconds"]["total"] > 0


def test_model_pt_and_pt2_load_and_agree(flops_run: tuple[Path, dict]) -> None:
    out, rep = flops_run
    model, meta = load_model(out / "model.pt")
    assert meta["pruned"]["widths"]
    data = load_data("digits", DataOptions(train_limit=300))
    assert evaluate(model, data.val)["accuracy"] == pytest.approx(rep["final"]["accuracy"])
    prog = torch.export.load(str(out / "model.pt2")).module()
    x = torch.stack([data.val[i][0] for i in range(1)])
    torch.testing.assert_close(prog(x), model.eval()(x), rtol=1e-4, atol=1e-4)


def test_gate_on_the_report(flops_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, rep = flops_run
    ok = runner.invoke(app, ["gate", str(out / "report.json"), "--min-accuracy", "0.01", "--junit", str(tmp_path / "g.xml")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "g.xml").is_file()
    bad = runner.invoke(app, ["gate", str(out), "--min-accuracy", "0.999999"])
    assert bad.exit_code == 1 and "FAIL" in bad.output
    assert runner.invoke(app, ["gate", str(out), "--remeasure"]).exit_code == 2


def test_report_command_regenerates(flops_run: tuple[Path, dict]) -> None:
    out, _ = flops_run
    (out / "report.md").unlink()
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert "budget" in (out / "report.md").read_text().lower()


def test_latency_budget_closed_loop_through_the_cli(tiny_run: Path, target_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "lat"
    res = runner.invoke(app, ["compress", "--weights", str(tiny_run), "--data", "digits", "--target", str(target_yaml),
                              "--latency-ratio", "0.6", "--method", "uniform", "--epochs", "1", "--train-limit", "300",
                              "--profiles", str(tmp_path / "profiles"), "--out", str(out)])
    rep = json.loads((out / "report.json").read_text())
    # Exit 0 exactly when the re-measured latency met the budget; 1 (and said so) otherwise.
    assert res.exit_code == (0 if rep["met_budget"] else 1), res.output
    assert "MET" in res.output and ("NOT MET" in res.output) == (not rep["met_budget"])
    stages = [s["stage"] for s in rep["steps"]]
    assert stages[0] == "plan" and "structured" in stages and stages[-1] == "finetune"
    assert all(s["measured_latency_ms"] for s in rep["steps"] if s["stage"] in ("plan", "structured"))
    assert rep["budget"]["latency_ms"] == pytest.approx(0.6 * rep["baseline"]["latency_ms"]["quiet"])
    assert rep["final"]["predicted_latency_ms"] < rep["baseline"]["predicted_latency_ms"]
    assert rep["method"]["name"] == "uniform"
    assert (tmp_path / "profiles" / "quick8").is_dir()  # the missing LUT was made on the spot


def test_a_planner_floor_the_measurement_contradicts_is_not_unreachable(tiny_run: Path, target_yaml: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, profiles: Path) -> None:
    # The LUT (or a noisy round) can put a corrected budget under the cheapest widths' predicted
    # cost while those widths measure well within the budget: compress must plan from them, not exit 3.
    from deploy_prune.errors import BudgetUnreachable
    from deploy_prune.methods.uniform import Uniform

    real, calls = Uniform.plan, []

    def first_call_unreachable(self: Uniform, run: object, budget: float) -> dict[str, int]:
        calls.append(budget)
        if len(calls) == 1:
            raise BudgetUnreachable("the cheapest allowed widths cost more than the budget")
        return real(self, run, budget)

    monkeypatch.setattr(Uniform, "plan", first_call_unreachable)
    rep = compress(_cfg(tiny_run, tmp_path / "floor", target_yaml, profiles, latency_ratio=0.9, method="uniform", steps=1))
    assert len(calls) >= 2 and rep["final"]["flops"] < rep["baseline"]["flops"]
    assert [s["stage"] for s in rep["steps"]][0] == "plan"


def test_interrupted_run_resumes(tiny_run: Path, target_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profiles: Path) -> None:
    import deploy_prune.pipeline as C

    out = tmp_path / "res"
    cfg = _cfg(tiny_run, out, target_yaml, profiles, params_ratio=0.5, amount=0.0, steps=2)
    real = C.Run.finetune

    def interrupt(self: C.Run, epochs: float, tag: str, resume: bool = False) -> float:
        if tag == "final":
            raise KeyboardInterrupt
        return real(self, epochs, tag, resume)

    monkeypatch.setattr(C.Run, "finetune", interrupt)
    with pytest.raises(KeyboardInterrupt):
        compress(cfg)
    monkeypatch.setattr(C.Run, "finetune", real)
    with pytest.raises(UserError, match="nothing to resume"):
        compress(_cfg(tiny_run, tmp_path / "empty", target_yaml, profiles, params_ratio=0.5, resume=True))
    cfg.resume = True
    rep = compress(cfg)
    stages = [s["stage"] for s in rep["steps"]]
    assert stages.count("structured") == 2 and stages[-1] == "finetune"  # steps not redone
    assert rep["final"]["params"] <= 0.5 * rep["baseline"]["params"]


@pytest.mark.parametrize("args, code, message", [
    (["--latency-ms", "1", "--flops-ratio", "0.5"], 2, "conflicting budgets"),
    (["--latency-ratio", "0"], 2, "--latency-ratio must be a finite number in (0, 1), got 0.0"),
    (["--flops-ratio", "1.5"], 2, "--flops-ratio must be a finite number in (0, 1), got 1.5"),
    (["--latency-ms", "1000"], 2, "nothing to do"),
    (["--latency-ms", "0.000001"], 3, "lowest reachable"),
    (["--flops-ratio", "0.5", "--amount", "lots"], 2, "--amount"),
    (["--flops-ratio", "0.5", "--method", "nope"], 2, "unknown method"),
])
def test_bad_input(tiny_run: Path, target_yaml: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    res = runner.invoke(app, ["compress", "--weights", str(tiny_run), "--data", "digits", "--target", str(target_yaml),
                              "--epochs", "0", "--train-limit", "200", "--profiles", str(tmp_path / "p"),
                              "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == code, res.output
    assert message in " ".join(res.output.split())


def test_weights_that_do_not_fit(tiny_run: Path, target_yaml: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["compress", "--weights", str(tiny_run), "--model", "resnet20", "--data", "digits",
                              "--target", str(target_yaml), "--flops-ratio", "0.5", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "does not fit" in res.output


def test_diverging_finetune_stops_and_keeps_the_checkpoint(tiny_run: Path, target_yaml: Path, tmp_path: Path, profiles: Path) -> None:
    out = tmp_path / "nan"
    with pytest.raises(UserError, match="diverged.*checkpoint.*--resume"):
        compress(_cfg(tiny_run, out, target_yaml, profiles, keep_ratio=0.5, lr=1e30, steps=1, amount=0.0))
    assert (out / "checkpoints" / "state.pt").is_file()


def test_a_take_inside_a_contention_episode_is_taken_again() -> None:
    def takes(*baselines: float):  # noqa: ANN202
        it = iter(baselines)
        return lambda: {"baseline": {"quiet": next(it)}, "candidate": {"quiet": 0.5}}

    # Quiet baseline (within 10 % of the quietest seen): one take.
    best, q = quietest_take(takes(1.05), quietest=1.0)
    assert best["takes"] == 1 and q == 1.0
    # Contended (1.4x), then quiet: the second take is kept.
    best, q = quietest_take(takes(1.4, 1.02), quietest=1.0)
    assert best["takes"] == 2 and best["baseline"]["quiet"] == 1.02
    # Contended every time: at most 1 + REMEASURE takes, the quietest kept.
    best, q = quietest_take(takes(1.5, 1.3, 1.4, 9.9), quietest=1.0)
    assert best["takes"] == 1 + REMEASURE and best["baseline"]["quiet"] == 1.3 and q == 1.0
    # The first measurement of a run sets the yardstick.
    best, q = quietest_take(takes(2.0), quietest=float("inf"))
    assert best["takes"] == 1 and q == 2.0


def test_halp_runs_without_a_sensitivity_analysis(tiny_run: Path, target_yaml: Path, tmp_path: Path, profiles: Path) -> None:
    # candidates=4: the knapsack's value weights are chosen among up to four draws, by their
    # plans at the first step's budget scored whole; the later steps reuse the chosen draw
    rep = compress(_cfg(tiny_run, tmp_path / "halp", target_yaml, profiles, flops_ratio=0.5, method="halp", epochs=0,
                        method_options={"candidates": 4}))
    assert rep["met_budget"] is True and rep["final"]["flops"] <= 0.5 * rep["baseline"]["flops"]
    assert rep["final"]["sparsity"] == 0.0  # purely structured: no masks by default
    assert "sensitivity" not in rep["stage_seconds"] and not (tmp_path / "halp" / "sensitivity.json").exists()
    (c,) = rep["method"]["settings"]["subnet_choices"]  # scored once, not at every step
    assert 1 < c["plans"] <= 4 and len(c["metrics"]) == c["plans"]  # the draws did move the knapsack
    # the best-scoring plan, the knapsack's own (index 0) on ties
    assert c["metrics"][c["chosen"]] == max(c["metrics"]) and c["chosen"] == c["metrics"].index(max(c["metrics"]))
    with pytest.raises(UserError, match="candidates must be an integer >= 1"):
        compress(_cfg(tiny_run, tmp_path / "halp0", target_yaml, profiles, flops_ratio=0.5, method="halp",
                      method_options={"candidates": 0}))


def test_a_subnet_is_scored_on_a_copy_and_recovery_trains_it(tiny_run: Path, target_yaml: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, profiles: Path) -> None:
    from dataclasses import replace

    from deploy_prune.methods.subnet import subnet_metric
    from deploy_prune.pipeline.planner import Planner
    from deploy_prune.pipeline.run import Run, UserParts

    planner = Planner(_cfg(tiny_run, tmp_path / "p", target_yaml, profiles, flops_ratio=0.3, method="halp"), UserParts())
    run = planner.run
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    scores = planner.method._scores(run)
    widths = planner.plan()
    trained: list[dict] = []
    recover = Run.recover

    def spy(self: Run, model: torch.nn.Module, steps: int) -> bool:
        start = [p.detach().clone() for p in model.parameters()]
        done = recover(self, model, steps)
        trained.append({"steps": steps, "done": done, "shapes": [tuple(p.shape) for p in model.parameters()],
                        "moved": any(not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))})
        return done

    monkeypatch.setattr(Run, "recover", spy)
    shocked = subnet_metric(run, widths, scores)
    assert trained == []  # no recovery asked: none ran
    recovered = subnet_metric(run, widths, scores, recover_steps=24)
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())  # the run's model is untouched
    assert subnet_metric(run, widths, scores) == shocked  # the same batches, the same score
    assert subnet_metric(run, widths, scores, recover_steps=24) == recovered  # recovery is reproducible
    # recovery trained the cut copy (its shapes are the plan's, not the run's model) for the steps asked
    (first, again) = trained
    assert first == again and first["steps"] == 24 and first["done"] and first["moved"]
    assert first["shapes"] != [tuple(p.shape) for p in run.model.parameters()]
    # A user's finetune callback without a loss: nothing to train the copy with, so no recovery
    run.parts = replace(run.parts, finetune=lambda model, epochs, ctx: None)
    assert subnet_metric(run, widths, scores, recover_steps=24) == shocked
