"""Profile validation: a finished LUT checked against whole-model measurements of pruned variants.

The table (``latency.profile``) is built from standalone layer timings; this module measures
whole models and compares them with its predictions. ``calibration_variants`` are the full model
and uniformly pruned copies whose end-to-end times give the linear calibration
(``fit_calibration``, which the profile stores); ``validate_profile`` times random pruned variants,
half uniform and half mixed, interleaved with the calibration variants again, and scores the raw,
calibrated, anchored and same-session predictions (``fidelity``), which ``plot_validation`` draws.
``export_variants`` and ``measure_variants`` export, time and predict any such set of variants.

It is separate from ``latency.profile`` because it answers a different question: not how to
build the table (enumerating and timing layer configurations, resuming, re-timing slow chunks,
choosing entries), but how well a table predicts whole models, which needs only the table, the
model and a measurer. ``run_profile`` calls into it for the calibration and for ``--validate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from deploy_prune.config import Target
from deploy_prune.export.timing import timing_onnx
from deploy_prune.graph import ModelGraph
from deploy_prune.latency import lut
from deploy_prune.latency.measure import Measurer
from deploy_prune.latency.profile import (
    ProfileSpec,
    Progress,
    plan_variant,
    predicting_from,
    pruned_copy,
    random_shares,
)
from deploy_prune.latency.timing import quiet_of


def calibration_variants(spec: ProfileSpec, graph: ModelGraph, shares: Sequence[float], mixed: int = 0,
                         seed: int = 0) -> dict[str, nn.Module]:
    """The full model, one uniformly pruned copy per keep share, and ``mixed`` copies with a
    random share per group (in [0.2, 1.0]; drawn apart from ``validate_profile``'s variants, so
    these stay out of its sample). Uniform copies shrink every layer's work and weights together;
    the mixed ones tell the two apart (``profile.whole_model_weight_term``)."""
    variants = {"full": spec.model}
    for r in shares:
        plan = plan_variant(graph, {g.name: r for g in graph.groups()})
        variants[f"uniform-{r:g}"] = pruned_copy(spec.model, spec.input_shape, plan, spec.ignore, spec.target.channel_multiple)
    rng = np.random.default_rng(seed + 1000)
    for i in range(mixed):
        plan = plan_variant(graph, random_shares(graph, rng, uniform=False))
        variants[f"mixed-{i}"] = pruned_copy(spec.model, spec.input_shape, plan, spec.ignore, spec.target.channel_multiple)
    return variants


def fit_calibration(measured: Mapping[str, Mapping[str, Any]], predicted: Mapping[str, Mapping[str, Any]],
                    keys: Sequence[str]) -> dict[str, Any]:
    """``measured ~ a * layer_sum + b`` by least squares over the ``keys`` variants (measured:
    the quiet estimate of ``latency.timing``, which drops rounds slowed by other tenants)."""
    xs = np.array([predicted[k]["layer_sum_ms"] for k in keys])
    ys = np.array([measured[k]["quiet"] for k in keys])
    a, b = np.polyfit(xs, ys, 1) if len(xs) >= 2 else (float(ys[0] / xs[0]), 0.0)
    fit = "measured_ms = a * layer_sum_ms + b (least squares)"
    if not a > 0:  # noise swamped the variants' differences (tiny models): less work cannot cost more
        a, b = float(np.dot(xs, ys) / np.dot(xs, xs)), 0.0
        fit = "measured_ms = a * layer_sum_ms (the least-squares slope was <= 0, so a scale only)"
    return {"a": float(a), "b": float(b), "fit": fit,
            "points": [{"variant": k, "layer_sum_ms": float(x), "measured_ms": float(y)}
                       for k, x, y in zip(keys, xs, ys, strict=True)]}


def export_variants(variants: Mapping[str, nn.Module], input_shape: Sequence[int], target: Target,
                    progress: Progress | None = None, stage: str = "variants") -> dict[str, bytes]:
    """Each variant as ONNX bytes for timing (``timing_onnx``), at the target's batch."""
    blobs = {}
    for i, (k, model) in enumerate(variants.items()):
        if progress:
            progress(f"{stage}: export", i, len(variants))
        blobs[k] = timing_onnx(model, tuple(input_shape), target.batch)
    if progress:
        progress(f"{stage}: export", len(variants), len(variants))
    return blobs


def measure_variants(
    m: Measurer, variants: Mapping[str, nn.Module], input_shape: Sequence[int], target: Target, prof: Mapping[str, Any],
    progress: Progress | None = None, stage: str = "variants",
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Export every variant, measure them interleaved with the target protocol, and predict each."""
    blobs = export_variants(variants, input_shape, target, progress, stage)
    if progress:
        progress(f"{stage}: measure", 0, 1)
    stats = m.time(blobs, target.protocol)
    if progress:
        progress(f"{stage}: measure", 1, 1)
    predicted = {k: lut.predict(model, prof) for k, model in variants.items()}
    return {k: v.as_dict() for k, v in stats.items()}, predicted


def fidelity(pred: Sequence[float], meas: Sequence[float]) -> dict[str, Any]:
    """Agreement of predicted and measured latencies."""
    from scipy.stats import spearmanr

    p, y = np.asarray(pred, float), np.asarray(meas, float)
    err = 100.0 * (p - y) / y
    rho = float(spearmanr(p, y).statistic) if len(p) > 2 else float("nan")
    return {"median_abs_error_pct": float(np.median(np.abs(err))), "within_10pct_share": float(np.mean(np.abs(err) <= 10.0)),
            "max_abs_error_pct": float(np.max(np.abs(err))), "mean_error_pct": float(np.mean(err)), "spearman": rho,
            "n_variants": len(p)}


def validate_profile(spec: ProfileSpec, prof: Mapping[str, Any], graph: ModelGraph, m: Measurer, n: int, seed: int = 0,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Prune ``n`` random variants (half one share for all groups, half a share per group, in
    [0.2, 1.0]), measure each end to end and compare with the raw and calibrated predictions.

    The calibration was fitted on the uniform variants of the profile, not on these, so the
    calibrated figures are out of sample. The calibration variants are measured again here,
    interleaved with the random ones, and the calibration refitted on them: on a shared machine
    the load drifts between profiling and validation, and ``calibrated_same_session`` separates
    the table's accuracy from that drift (``drift`` = full model now / at profile time).
    ``calibrated_anchored`` is the table as compress uses it: the profile-time calibrated
    prediction times (the full model measured now / its calibrated prediction), compress's scaling
    of the budget by the baseline it measures; it corrects the drift with one measurement that
    every use of the table has, and fits nothing on the variants.
    """
    rng = np.random.default_rng(seed + 1)
    c = prof.get("calibration", {})
    cal = calibration_variants(spec, graph, c.get("shares", (0.75, 0.5, 0.3)), c.get("mixed", 0), c.get("seed", 0))
    variants: dict[str, nn.Module] = {f"cal:{k}": v for k, v in cal.items()}
    kinds = {}
    for i in range(n):
        uniform = i % 2 == 0
        plan = plan_variant(graph, random_shares(graph, rng, uniform))
        key = f"v{i:02d}-{'uniform' if uniform else 'mixed'}"
        variants[key] = pruned_copy(spec.model, spec.input_shape, plan, spec.ignore, spec.target.channel_multiple)
        kinds[key] = plan
        if progress:
            progress("validation: prune", i + 1, n)
    measured, predicted = measure_variants(m, variants, spec.input_shape, spec.target, prof, progress, "validation")
    refit = fit_calibration(measured, predicted, [f"cal:{k}" for k in cal])
    anchor = measured["cal:full"]["quiet"] / predicted["cal:full"]["calibrated_ms"]
    rows = [{"variant": k, "measured_ms": measured[k]["quiet"], "measured_median_ms": measured[k]["median"],
             "measured_p90_ms": measured[k]["p90"], "quiet_rounds": measured[k]["quiet_rounds"],
             "round_cv": measured[k]["round_cv"], "round_medians": measured[k]["round_medians"],
             "raw_ms": predicted[k]["raw_ms"], "calibrated_ms": predicted[k]["calibrated_ms"],
             "calibrated_anchored_ms": predicted[k]["calibrated_ms"] * anchor,
             "calibrated_same_session_ms": refit["a"] * predicted[k]["layer_sum_ms"] + refit["b"], "keep": kinds[k]}
            for k in variants if k in kinds]
    meas = [r["measured_ms"] for r in rows]
    # With layer_timing auto, every candidate's calibrated prediction is scored too: was the choice right?
    by_field = {f: fidelity([lut.predict(variants[r["variant"]], predicting_from(prof, f, c))["calibrated_ms"] for r in rows],
                            meas)
                for f, c in (prof.get("entry_choice") or {}).get("candidates", {}).items()}
    return {"raw": fidelity([r["raw_ms"] for r in rows], meas),
            **({"calibrated_by_entry_field": by_field} if by_field else {}),
            "calibrated": fidelity([r["calibrated_ms"] for r in rows], meas),
            "calibrated_anchored": fidelity([r["calibrated_anchored_ms"] for r in rows], meas),
            "calibrated_same_session": fidelity([r["calibrated_same_session_ms"] for r in rows], meas),
            "refit_calibration": refit, "anchor": anchor,
            "drift": measured["cal:full"]["quiet"] / quiet_of(prof["full_model"]["latency_ms"]),
            "n_variants": n, "seed": seed, "variants": rows}


def plot_validation(val: Mapping[str, Any], path: Path, title: str) -> Path:
    """Predicted-vs-measured scatter (raw and calibrated) with the ±10 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deploy_prune.io import atomic_write

    rows = val["variants"]
    y = np.array([r["measured_ms"] for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = float(y.min()) * 0.8, float(y.max()) * 1.2
    xs = np.linspace(lo, hi, 10)
    ax.plot(xs, xs, "k-", lw=1, label="exact")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="0.9", label="±10 %")
    for key, mark in (("raw", "o"), ("calibrated", "x"), ("calibrated_anchored", "^"), ("calibrated_same_session", "+")):
        if key not in val:
            continue
        f = val[key]
        ax.scatter(y, [r[f"{key}_ms"] for r in rows], marker=mark,
                   label=f"{key}: median |err| {f['median_abs_error_pct']:.1f} %, ρ {f['spearman']:.3f}")
    ax.set_xlabel("measured median (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
