"""The closed loop when the latency table misprices widths: measurement decides, and a budget the
cheapest widths meet ends MET.

The device here is deterministic (``deterministic_device`` in conftest: latency proportional to
the ONNX model's weights): the test is about the loop's decisions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import fake_device

from deploy_prune.data import DataOptions
from deploy_prune.measured_search import Point, between, line_search
from deploy_prune.pipeline import CompressConfig, compress


@pytest.fixture
def flat_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer costs the same at every width: to the table, widening is free, as OpenVINO's
    one-layer entries made it look on MobileNetV2."""
    import deploy_prune.latency.lut as lut

    monkeypatch.setattr(lut, "layer_ms", lambda profile, name, cin, cout: 0.01)


# uniform is the slow half of the pair (make test-all); deeplsp runs in the default suite
@pytest.mark.parametrize("method", [pytest.param("uniform", marks=pytest.mark.slow), "deeplsp"])
def test_a_table_that_misprices_on_purpose_still_ends_met(method: str, tiny_run: Path, quick_target_yaml: Callable[[int], Path],
                                                          tmp_path: Path, deterministic_device: None, flat_table: None) -> None:
    cfg = CompressConfig(out=tmp_path / "run", weights=str(tiny_run), data="digits", data_options=DataOptions(train_limit=300),
                         target=str(quick_target_yaml(8)), latency_ratio=0.6, method=method, epochs=1, step_fraction=0.5,
                         sensitivity_samples=200, score_batches=2, batch_size=64, profiles=tmp_path / "profiles")
    rep = compress(cfg)
    assert rep["met_budget"] is True, rep["budget_note"]
    base_ms = rep["baseline"]["latency_ms"]["quiet"]
    assert rep["final"]["latency_ms"]["quiet"] <= 0.6 * base_ms * (1 + 1e-9)
    assert any("measured latency alone" in n for n in rep["notes"])
    searched = [s for s in rep["steps"] if s.get("search") == "measured"]
    assert searched, [s["stage"] for s in rep["steps"]]
    # The loop spends its measurements on the search, not on re-planning the same architecture.
    plans = [tuple(sorted(s["widths"].items())) for s in rep["steps"] if s["stage"] == "plan" and not s.get("search")]
    assert len(plans) - len(set(plans)) <= 1


@pytest.fixture
def slow_narrow_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``deterministic_device``, but inside a whole model every conv whose output channels are
    not a multiple of 8 costs 20 us more (a layout reorder around it), which the latency table's
    one-layer entries do not see: the table calls narrow widths cheap where the model runs them
    slowly, as OpenVINO runs MobileNetV2's 4-channel groups."""
    def ms(weights: list) -> float:
        convs = [w for w in weights if w.ndim == 4]
        narrow = sum(1 for w in convs if w.shape[0] % 8) if len(convs) > 1 else 0
        return 0.01 + 1e-6 * sum(w.size for w in weights) + 0.02 * narrow

    fake_device(monkeypatch, ms)


def test_a_floor_of_slow_narrow_widths_falls_back_on_the_aligned_one(tiny_run: Path, quick_target_yaml: Callable[[int], Path],
                                                                      tmp_path: Path, slow_narrow_device: None) -> None:
    """The cheapest plan the table prices (4-channel groups) measures over the budget; the
    cheapest aligned one (8 channels) under it: the run plans from the aligned floor and ends MET
    instead of calling the budget unreachable."""
    cfg = CompressConfig(out=tmp_path / "run", weights=str(tiny_run), data="digits", data_options=DataOptions(train_limit=300),
                         target=str(quick_target_yaml(8)), latency_ratio=0.35, method="deeplsp", epochs=1, step_fraction=0,
                         sensitivity_samples=200, score_batches=2, batch_size=64, profiles=tmp_path / "profiles")
    rep = compress(cfg)
    assert rep["met_budget"] is True, rep["budget_note"]
    assert rep["final"]["latency_ms"]["quiet"] <= 0.35 * rep["baseline"]["latency_ms"]["quiet"] * (1 + 1e-9)
    widths = rep["steps"][-1]["widths"]
    assert all(w % 8 == 0 for w in widths.values()), widths


def _linear(total: int) -> Callable[[dict[str, int]], Point]:
    return lambda w: Point(dict(w), sum(w.values()) / total)


def test_line_search_lands_in_the_window_and_never_returns_an_over_point() -> None:
    keeps = {"a": list(range(8, 65, 8)), "b": list(range(8, 129, 8))}
    under, over = Point({"a": 8, "b": 8}, 16 / 100), Point({"a": 64, "b": 128}, 192 / 100)
    calls: list[dict[str, int]] = []

    def measure(w: dict[str, int]) -> Point:
        calls.append(w)
        return _linear(100)(w)

    best, tried = line_search(under, over, measure, (0.9, 0.97, 0.935), keeps, evals=5)
    assert 0.9 <= best.r <= 0.97 and len(calls) <= 5 and tried[0] is under
    # a staircase that never lands: the widest point measured under the budget
    best, tried = line_search(under, over, lambda w: Point(w, 0.5 if sum(w.values()) < 120 else 1.2), (0.9, 0.97, 0.935),
                              keeps, evals=4)
    assert best.r == 0.5 and len(tried) >= 2
    with pytest.raises(ValueError, match="one over it"):
        line_search(under, Point(over.widths, 0.5), measure, (0.9, 0.97, 0.935), keeps, evals=3)


def test_between_snaps_to_allowed_widths() -> None:
    keeps = {"a": [8, 16, 24, 32], "b": [4, 8, 12]}
    assert between({"a": 8, "b": 4}, {"a": 32, "b": 12}, 0.0, keeps) == {"a": 8, "b": 4}
    assert between({"a": 8, "b": 4}, {"a": 32, "b": 12}, 1.0, keeps) == {"a": 32, "b": 12}
    assert between({"a": 8, "b": 4}, {"a": 32, "b": 12}, 0.5, keeps) == {"a": 24, "b": 8}  # a: 20, a quarter's dither
    assert between({"a": 32}, {"a": 8}, 0.3, keeps) == {"a": 24}  # narrowing: 24.8 rounds toward under's side


def test_between_dithers_groups_with_the_same_steps() -> None:
    # Five groups that each have one step between under and over: plain rounding would switch them
    # all at s = 0.5; dithered, the line passes through an architecture per group.
    under = {g: 16 for g in "abcde"}
    over = {g: 32 for g in "abcde"}
    seen = {tuple(sorted(between(under, over, i / 100, {g: [16, 32] for g in under}).items())) for i in range(101)}
    assert len(seen) == 6


def test_line_search_steps_past_widths_coarser_than_its_bracket() -> None:
    # Regula falsi asks for a point that snaps back to the architecture already measured: the
    # search takes the nearest point that snaps to a new one instead of giving up.
    keeps = {"a": [16, 32, 48]}
    r = {16: 0.8, 32: 0.95, 48: 2.0}
    best, tried = line_search(Point({"a": 16}, 0.8), Point({"a": 48}, 2.0), lambda w: Point(w, r[w["a"]]),
                              (0.9, 0.97, 0.935), keeps, evals=5)
    assert best.widths == {"a": 32} and best.r == 0.95 and len(tried) == 2


def test_the_steps_walk_to_widths_the_plan_measured(tiny_run: Path, quick_target_yaml: Callable[[int], Path], tmp_path: Path,
                                                    deterministic_device: None) -> None:
    """The structured steps end at an architecture the plan stage measured (no re-plan on the
    part-pruned model), and only the last step, the one verification starts from, is measured."""
    cfg = CompressConfig(out=tmp_path / "run", weights=str(tiny_run), data="digits", data_options=DataOptions(train_limit=300),
                         target=str(quick_target_yaml(8)), latency_ratio=0.6, method="deeplsp", epochs=1, step_fraction=0,
                         sensitivity_samples=200, score_batches=2, batch_size=64, profiles=tmp_path / "profiles")
    rep = compress(cfg)
    assert rep["met_budget"] is True, rep["budget_note"]
    measured = [s["widths"] for s in rep["steps"] if s["stage"] == "plan"]
    structured = [s for s in rep["steps"] if s["stage"] == "structured"]
    assert structured[-1]["widths"] in measured
    assert [s["measured_latency_ms"] is not None for s in structured] == [False] * (len(structured) - 1) + [True]


def test_a_reading_inside_the_margin_is_measured_again_before_pruning_further() -> None:
    """The last step read 97.5 % of the budget: under it, but over the 97 % the loop accepts.
    One reading there is as likely noise as a real overshoot, so verification pools a second
    measurement (90 %) and accepts the pooled figure instead of cutting the model further."""
    from types import SimpleNamespace

    from deploy_prune.pipeline.loop import _verify

    def meas(ms: float) -> dict:
        return {"candidate": {"quiet": ms, "median": ms, "round_medians": [ms] * 3}}

    said: list[str] = []
    taken: list[str] = []
    run = SimpleNamespace(state={"last_measurement": meas(0.975), "pinned": {"widths": {}, "r": 0.95, "stage": "plan"}},
                          done=set(), cfg=SimpleNamespace(slack=0.1, margin=0.03, max_loops=5), say=said.append,
                          measure=lambda model: taken.append("again") or meas(0.90), model=None,
                          checkpoint=lambda stage: None)
    _verify(run, method=None, budget={"kind": "latency_ms", "latency_ms": 1.0})  # type: ignore[arg-type]
    assert run.state["verified"] is True and taken == ["again"]
    assert any("re-measured, pooled 94 %" in s for s in said), said
