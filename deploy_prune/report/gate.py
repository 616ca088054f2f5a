"""The CI gate: check a compress report (optionally re-measuring its model) against limits.

``run_gate`` returns one ``GateCheck`` per limit; the CLI prints ``format_result`` and exits
0 when every check passes, 1 when any fails, 2 on bad input (``UserError``). Accuracies are
fractions (0.9 = 90 %); ``max_accuracy_drop`` is baseline accuracy minus final accuracy, also a
fraction (0.01 = 1 percentage point). For a target that ships another precision (int8), the
accuracies compared are the deployed model's (``final.deployed``). With no explicit limit the gate checks the report's own
budget verdict (``met_budget``), or, when re-measuring a latency budget, the new median against it.
The report is validated (``Report``: types and ranges) and its verdict recomputed from its figures
(``budget_verdict``): one they contradict fails. A latency verdict is recomputed exactly from
``final.verdict`` (schema 2: the round medians of both final measurements, pooled with the
pipeline's own ``timing.quiet_estimate``); a schema 1 report, written before that block, keeps
only the second measurement, so its latency verdict is checked within ``LATENCY_TOLERANCE``.
``--remeasure`` times ``model.onnx`` only when its SHA-256 is the one ``model.onnx.json``
records; ``--junit`` never replaces a file of the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag, ValidationError

from deploy_prune.errors import UserError
from deploy_prune.io import ASIDE, atomic_write, ensure_dir
from deploy_prune.latency.timing import QUIET_BAND, quiet_estimate
from deploy_prune.report import PLOTS, load_report
from deploy_prune.report import RUN_DIRS as COMPRESS_DIRS
from deploy_prune.report import RUN_FILES as COMPRESS_FILES
from deploy_prune.report import report_path as _resolve_report

SUITE_NAME = "deploy-prune gate"
# Comparisons of accuracies (fractions) tolerate float noise: 0.93 - 0.92 counts as a drop of 0.01.
_EPS = 1e-9
RERUN = "the report is damaged or was edited: rerun deploy-prune compress"

# --------------------------------------------------------------------------------------------
# The report's schema: what the gate reads, typed and in range (other keys pass through)
# --------------------------------------------------------------------------------------------

Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Positive = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
Share = Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)]
Count = Annotated[int, Field(strict=True, ge=0)]
BUDGET_KINDS = ("latency_ms", "latency_ratio", "flops_ratio", "params_ratio", "keep_ratio", "sparsity")


class _Open(BaseModel):
    """A report object: the keys named here are checked, others (later additions) pass through."""

    model_config = ConfigDict(extra="allow", frozen=True)


class LatencyStats(_Open):
    """A stored ``Stats.as_dict()`` (or ``pool_sittings``' record): milliseconds, finite and > 0."""

    median: Positive
    p90: Positive | None = None
    p95: Positive | None = None
    p99: Positive | None = None
    mean: Positive | None = None
    min: NonNegative | None = None
    max: Positive | None = None
    iqr: NonNegative | None = None
    mad: NonNegative | None = None
    round_cv: NonNegative | None = None
    quiet: Positive | None = None
    round_medians: list[Positive] | None = None
    n: Count | None = None
    rounds: Count | None = None
    quiet_rounds: Count | None = None
    sittings: list[LatencyStats] | None = None

    @property
    def decided(self) -> float:
        """The figure compress decides on (``timing.quiet_of``): ``quiet``, else the quiet
        estimate of the round medians, else the median."""
        if self.quiet is not None:
            return self.quiet
        return quiet_estimate(self.round_medians) if self.round_medians else self.median


def _latency_form(v: Any) -> str:
    return "stats" if isinstance(v, dict) else "ms"


# A latency is a stats object or (older reports) a bare median in ms.
Latency = Annotated[Annotated[LatencyStats, Tag("stats")] | Annotated[Positive, Tag("ms")], Discriminator(_latency_form)]


def decided_ms(lat: LatencyStats | float | None) -> float | None:
    return lat.decided if isinstance(lat, LatencyStats) else lat


class Deployed(_Open):
    """The artefact a target of another precision ships (int8), and its figures."""

    precision: str
    accuracy: Finite | None = None
    latency_ms: Latency | None = None
    fp32_latency_ms: Latency | None = None


class Figures(_Open):
    """A model's figures: the run's metric (``accuracy``), latency, cost."""

    accuracy: Finite | None = None
    latency_ms: Latency | None = None
    predicted_latency_ms: Finite | None = None
    flops: NonNegative | None = None
    params: NonNegative | None = None
    sparsity: Share | None = None
    deployed: Deployed | None = None


Rounds = Annotated[list[Positive], Field(min_length=1)]


class PooledVerdict(_Open):
    """``final.verdict`` (``loop.PooledVerdict``): what a latency budget's verdict was decided on."""

    pooled: Positive  # the quiet estimate over both measurements' rounds: ms, or candidate/baseline
    limit: Positive  # budget.latency_ms, or budget.value for a ratio budget
    candidate_round_medians: Annotated[list[Rounds], Field(min_length=1)]
    baseline_round_medians: Annotated[list[Rounds], Field(min_length=1)] | None = None

    def figure(self) -> float:
        """``pooled`` recomputed from the round medians, as ``loop._pooled_over`` computes it."""
        fig = quiet_estimate([v for m in self.candidate_round_medians for v in m])
        if self.baseline_round_medians is not None:
            fig = fig / quiet_estimate([v for m in self.baseline_round_medians for v in m])
        return fig


class FinalFigures(Figures):
    baseline_same_session_ms: Positive | None = None  # the baseline timed with the final measurement
    verdict: PooledVerdict | None = None  # schema 2, latency budgets


class Budget(_Open):
    kind: Literal["latency_ms", "latency_ratio", "flops_ratio", "params_ratio", "keep_ratio", "sparsity"]
    value: Positive
    latency_ms: Positive | None = None  # the budget in ms, for latency budgets
    cost_model: str | None = None
    cost_budget: NonNegative | None = None  # the budget in the cost model's units


class Metric(_Open):
    name: str | None = None
    higher_is_better: StrictBool = True


class TargetInfo(_Open):
    name: str | None = None


class Layer(_Open):
    group: str
    channels_before: Count
    channels_after: Count


class Report(_Open):
    """``report.json`` as the gate reads it (``pipeline.stages._finish`` writes it)."""

    schema_version: Literal[1, 2]
    budget: Budget
    method: dict[str, Any]
    baseline: Figures
    final: FinalFigures
    met_budget: StrictBool
    budget_note: str | None = None
    steps: list[dict[str, Any]]
    provenance: dict[str, Any]
    metric: Metric | None = None
    target: TargetInfo | None = None
    layers: list[Layer] | None = None
    config: dict[str, Any] | None = None

    @property
    def metric_name(self) -> str:
        return (self.metric.name if self.metric is not None else None) or "accuracy"


# Metrics that are fractions (0.9 = 90 %): the built-in top-1 accuracy and names of its kind. A
# user's ``evaluate`` may return any finite number, higher is better.
_FRACTION_METRICS = ("acc", "top1", "top-1", "top5", "top-5")


def is_fraction_metric(name: str) -> bool:
    n = name.strip().lower()
    return "accuracy" in n or n in _FRACTION_METRICS


def _show(v: Any) -> str:
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    text = json.dumps(v) if isinstance(v, (str, bool, int, float)) or v is None else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(err: Any) -> str:
    """One pydantic error as ``key.path must be ..., got VALUE``."""
    loc = ".".join(str(x) for x in err["loc"] if x not in ("stats", "ms"))
    ctx, kind = err.get("ctx") or {}, err["type"]
    what = {
        "missing": "is missing", "float_type": "must be a number", "int_type": "must be an integer",
        "finite_number": "must be a finite number", "bool_type": "must be true or false", "string_type": "must be a string",
        "list_type": "must be a list", "dict_type": "must be an object", "model_type": "must be an object",
        "model_attributes_type": "must be an object",
    }.get(kind)
    if what is None and kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "?")
        what = f"must be {op} {bound:g}" if isinstance(bound, (int, float)) else f"must be {op} {bound}"
        what += " (ms)" if "latency" in loc or "_ms" in loc or "round_medians" in loc else ""
    if what is None and kind == "literal_error":
        what = f"must be one of {ctx.get('expected', '?')}"
    if what is None:
        what = f"is invalid ({err['msg']})"
    return f"{loc} {what}" + ("" if kind == "missing" else f", got {_show(err.get('input'))}")


def validate_report(raw: dict[str, Any], path: str | os.PathLike[str] = "report.json") -> Report:
    """``raw`` (a loaded report.json) as a ``Report``, or a ``UserError`` naming the first field
    out of type or range. Metrics that are fractions (``is_fraction_metric``) must lie in [0, 1]."""
    where = f"{str(path)!r}"
    try:
        rep = Report.model_validate(raw)
    except ValidationError as e:  # a value of the wrong type or range says more than a key missing beside it
        errs = e.errors()
        first = next((x for x in errs if x["type"] != "missing"), errs[0])
        raise UserError(f"{where}: {_problem(first)}; {RERUN}") from None
    except RecursionError:
        raise UserError(f"{where} nests too deeply to be a deploy-prune report; {RERUN}") from None
    name = rep.metric_name
    if is_fraction_metric(name):
        for key, figs in (("baseline", rep.baseline), ("final", rep.final)):
            for sub, value in (("accuracy", figs.accuracy), ("deployed.accuracy", figs.deployed and figs.deployed.accuracy)):
                if isinstance(value, float) and not 0.0 <= value <= 1.0:
                    raise UserError(f"{where}: {key}.{sub} is {value:g}, but the report's metric ({name}) is a fraction "
                                    f"in [0, 1] (0.9 = 90 %); {RERUN}")
    if rep.budget.kind != "latency_ms" and rep.budget.value >= 1:
        raise UserError(f"{where}: budget.value must be < 1 for a {rep.budget.kind} budget, got {rep.budget.value:g}; {RERUN}")
    _check_budget_figures(rep, where)
    return rep


def _check_budget_figures(rep: Report, where: str) -> None:
    """The budget's derived figures agree with what they are derived from (``loop._budget``,
    ``loop._final_measure``)."""
    b = rep.budget
    _check_pooled(rep, where)
    if b.latency_ms is not None and b.kind in ("latency_ms", "latency_ratio"):
        base = decided_ms(rep.baseline.latency_ms)
        want = b.value if b.kind == "latency_ms" else None if base is None else b.value * base
        if want is not None and not math.isclose(b.latency_ms, want, rel_tol=1e-6):
            of = f"{100 * b.value:g} % of the baseline's {base:.6g} ms" if b.kind == "latency_ratio" else "budget.value"
            raise UserError(f"{where}: budget.latency_ms {b.latency_ms:.6g} is not {of} ({want:.6g}); {RERUN}")
    if b.kind == "params_ratio" and b.cost_budget is not None and rep.baseline.params is not None:
        full = b.cost_budget / b.value  # the prunable layers' parameters: part of all of them
        if full > rep.baseline.params * (1 + 1e-6):
            raise UserError(f"{where}: budget.cost_budget {b.cost_budget:.6g} is {100 * b.value:g} % of {full:.6g} "
                            f"parameters, more than the baseline's {rep.baseline.params:.6g}; {RERUN}")


def _unequal(a: float | None, b: float | None) -> tuple[str, str]:
    """Two unequal numbers, shown short unless that shows them alike."""
    short = (f"{a:.6g}" if a is not None else "null", f"{b:.6g}" if b is not None else "null")
    return short if short[0] != short[1] else (repr(a), repr(b))


def _check_pooled(rep: Report, where: str) -> None:
    """``final.verdict`` agrees with the budget, with itself and with ``final.latency_ms``."""
    v, b = rep.final.verdict, rep.budget
    if v is None:
        return
    if b.kind not in ("latency_ms", "latency_ratio"):
        raise UserError(f"{where}: final.verdict is for a latency budget, not {b.kind}; {RERUN}")
    ratio = b.kind == "latency_ratio"
    limit, of = (b.value, "budget.value") if ratio else (b.latency_ms, "budget.latency_ms")
    if v.limit != limit:
        got, want = _unequal(v.limit, limit)
        raise UserError(f"{where}: final.verdict.limit {got} is not {of} ({want}); {RERUN}")
    base = v.baseline_round_medians
    if ratio != (base is not None) or base is not None and len(base) != len(v.candidate_round_medians):
        want = "one list per measurement, as for the candidate" if ratio else "null (a latency_ms budget pools the candidate alone)"
        raise UserError(f"{where}: final.verdict.baseline_round_medians must be {want}; {RERUN}")
    fig = v.figure()
    if v.pooled != fig:
        got, want = _unequal(v.pooled, fig)
        raise UserError(f"{where}: final.verdict.pooled {got} is not the quiet estimate of its round medians ({want}); {RERUN}")
    lat = rep.final.latency_ms
    if isinstance(lat, LatencyStats) and lat.round_medians is not None and lat.round_medians != v.candidate_round_medians[-1]:
        raise UserError(f"{where}: final.latency_ms.round_medians are not the last measurement's in "
                        f"final.verdict.candidate_round_medians; {RERUN}")


# --------------------------------------------------------------------------------------------
# The budget verdict, recomputed from the report's figures
# --------------------------------------------------------------------------------------------

# The pipeline's own tolerances (loop._final_measure): counted costs compare with a relative
# 1e-9, a sparsity within 1e-3 of its target counts as met.
COUNT_TOL = 1e-9
SPARSITY_SLACK = 1e-3
# A schema 1 report keeps only the second of the two sittings a latency verdict pools: the
# stored figure (scaled by how much slower the same-session baseline ran than the run's
# baseline) may sit this far either side of the budget under either verdict. Schema 2 keeps
# both (``final.verdict``), and its verdict is recomputed exactly.
LATENCY_TOLERANCE = 2.5 * QUIET_BAND


@dataclass(frozen=True)
class Verdict:
    """What a report's figures say of its budget: ``met`` True or False, or None when they fit
    either verdict (a schema 1 latency within ``LATENCY_TOLERANCE`` of its budget) or the report
    lacks the figure (``lacking`` names it). ``reason`` gives the figures in words; ``exact``
    is False for the tolerance check."""

    met: bool | None
    reason: str
    lacking: str | None = None
    exact: bool = True


def _counted(got: float, limit: float, text: str) -> Verdict:
    met = got <= limit * (1 + COUNT_TOL)
    return Verdict(met, text.format(op="<=" if met else ">"))


def budget_verdict(rep: Report) -> Verdict:
    """The budget verdict recomputed from ``rep``'s figures, by the rule compress applied."""
    b, base, fin = rep.budget, rep.baseline, rep.final
    pct = f"{100 * b.value:g} %"
    if b.kind == "flops_ratio":
        if fin.flops is None or base.flops is None:
            return Verdict(None, "", "final.flops" if fin.flops is None else "baseline.flops")
        limit = b.value * base.flops
        return _counted(fin.flops, limit, f"final FLOPs {fin.flops:.6g} {{op}} {pct} of the baseline's {base.flops:.6g}")
    if b.kind == "params_ratio":
        if fin.params is None or b.cost_budget is None:
            return Verdict(None, "", "final.params" if fin.params is None else "budget.cost_budget")
        # The budget counts the prunable layers' parameters; the report, all of them. Pruning never
        # adds others, so the final count in those layers lies in [all - others at baseline, all].
        others = 0.0 if base.params is None else max(0.0, base.params - b.cost_budget / b.value)
        lo, hi, limit = fin.params - others, fin.params, b.cost_budget * (1 + COUNT_TOL)
        met = True if hi <= limit else False if lo > limit else None
        op = "<=" if met else ">" if met is False else "~"
        return Verdict(met, f"final params {fin.params:.6g} ({lo:.6g} to {hi:.6g} in the pruned layers) {op} "
                            f"budget {b.cost_budget:.6g}")
    if b.kind == "keep_ratio":
        if not rep.layers:
            return Verdict(None, "", "layers")
        before = sum(la.channels_before for la in rep.layers)
        after = sum(la.channels_after for la in rep.layers)
        return _counted(after, b.value * before, f"{after} of {before} channels kept {{op}} {pct}")
    if b.kind == "sparsity":
        if fin.sparsity is None:
            return Verdict(None, "", "final.sparsity")
        # final.sparsity is over every conv/linear weight, rounded to 6 digits; compress counted it
        # without the --ignore layers, which are never pruned, so leaving them out can only raise it.
        thr, s = b.value - SPARSITY_SLACK, fin.sparsity
        ignored = bool((rep.config or {}).get("ignore"))
        met = True if s - 5e-7 >= thr else False if s + 5e-7 < thr and not ignored else None
        op = ">=" if met else "<" if met is False else "~"
        return Verdict(met, f"sparsity {s:.4f} {op} target {b.value:.4f}")
    return _latency_verdict(rep)


def _latency_verdict(rep: Report) -> Verdict:
    b, fin = rep.budget, rep.final
    v = fin.verdict
    if v is not None:  # the pipeline's rule on the pipeline's figures (``loop._pooled_over``)
        r = v.figure() / v.limit
        op = "<=" if r <= 1.0 else ">"
        what = (f"pooled ratio to the baseline {v.pooled:.4g} {op} budget {v.limit:.4g}" if b.kind == "latency_ratio"
                else f"pooled final latency {v.pooled:.4g} ms {op} budget {v.limit:.4g} ms")
        n = len(v.candidate_round_medians)
        return Verdict(r <= 1.0, f"{what} ({100 * r:.0f} % of it; quiet rounds of {n} measurement{'s' * (n != 1)})")
    if rep.schema_version >= 2:  # written with the block: without it, nothing decides the verdict
        return Verdict(None, "", "final.verdict")
    q = decided_ms(fin.latency_ms)
    if q is None:
        return Verdict(None, "", "final.latency_ms")
    b0, b2 = decided_ms(rep.baseline.latency_ms), fin.baseline_same_session_ms
    if b.kind == "latency_ratio":
        ref = b2 if b2 is not None else b0
        if ref is None:
            return Verdict(None, "", "baseline.latency_ms")
        fig, limit = q / ref, b.value
        what, unit = f"final latency {q:.4g} ms / baseline {ref:.4g} ms = {fig:.3f}", ""
    else:
        limit = b.latency_ms if b.latency_ms is not None else b.value
        scale = min(1.0, b0 / b2) if b0 is not None and b2 is not None else 1.0
        fig, unit = q * scale, " ms"
        what = f"final latency {q:.4g} ms" + (f" ({fig:.4g} ms at the baseline's quiet state)" if scale < 1 else "")
    r = fig / limit
    met = True if r <= 1 / (1 + LATENCY_TOLERANCE) else False if r > 1 + LATENCY_TOLERANCE else None
    op = "<=" if r <= 1 else ">"
    return Verdict(met, f"{what} {op} budget {limit:.4g}{unit} ({100 * r:.0f} % of it)", exact=False)


def _disagreement(rep: Report, v: Verdict) -> str | None:
    """The line saying ``rep``'s stored verdict contradicts its figures, or None if it does not."""
    if v.met is None or v.met == rep.met_budget:
        return None
    said, found = ("met", "do not meet it") if rep.met_budget else ("NOT met", "meet it")
    slack = "" if v.exact else f", beyond the {100 * LATENCY_TOLERANCE:.0f} % re-measurement tolerance"
    return f"budget: the report says {said}, but its own figures {found}: {v.reason}{slack}; {RERUN}, or gate --remeasure"


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------


@dataclass
class GateCheck:
    """One limit: what was checked, the value found, the limit, and a one-line message."""

    name: str
    passed: bool
    value: float | bool | None
    limit: float | bool | None
    message: str


@dataclass
class GateResult:
    report_path: Path
    checks: list[GateCheck] = field(default_factory=list)
    remeasured: dict[str, Any] | None = None  # Stats.as_dict() of the re-measured model, plus "target"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


def _pair(value: float, limit: float, digits: int = 2) -> tuple[str, str]:
    """Format value and limit with enough digits that unequal numbers do not print alike."""
    for d in range(digits, digits + 5):
        a, b = f"{value:.{d}f}", f"{limit:.{d}f}"
        if a != b or value == limit:
            return a, b
    return f"{value:g}", f"{limit:g}"


def _check_fraction(name: str, v: float | None) -> None:
    if v is not None and not (0.0 <= v <= 1.0):
        flag = name.replace("_", "-")
        raise UserError(f"--{flag} {v:g} is out of range: accuracies are fractions (0.9 = 90 %, 0.01 = 1 point); pass a value in [0, 1]")


QUIET = "median of the quiet rounds"


def _latency_check(median: float | None, p90: float | None, limit: float, where: str, fix: str) -> GateCheck:
    if median is None:
        return GateCheck("latency", False, None, limit, f"latency unknown: {fix}")
    ok = median <= limit
    v, lim = _pair(median, limit)
    tail = where + (f"; p90 {p90:.2f} ms" if p90 is not None else "")
    return GateCheck("latency", ok, median, limit, f"latency {v} ms {'<=' if ok else '>'} {lim} ms ({tail})")


def _verdict_check(rep: Report, v: Verdict) -> GateCheck:
    """The default check: the report's verdict, when its figures bear it out."""
    met = rep.met_budget
    bad = _disagreement(rep, v)
    if bad is not None:
        return GateCheck("budget", False, met, True, bad)
    if met and v.lacking is not None:
        return GateCheck("budget", False, met, True, f"budget: the report says met but lacks {v.lacking}, the figure that "
                                                     f"decides it; {RERUN}")
    note = (rep.budget_note or "").strip()
    msg = f"budget {'met' if met else 'NOT met'}" + (f": {note}" if note else "") + " (from the report)"
    return GateCheck("budget", met, met, True, msg)


def run_gate(
    report_path: str | os.PathLike[str],
    max_latency_ms: float | None = None,
    min_accuracy: float | None = None,
    max_accuracy_drop: float | None = None,
    remeasure_target: str | None = None,
    junit: str | os.PathLike[str] | None = None,
) -> GateResult:
    """Check the report at ``report_path`` (a run directory or its report.json) against the limits.

    The report is validated (``validate_report``) and its budget verdict recomputed
    (``budget_verdict``): a verdict its figures contradict is a failed check. ``remeasure_target``
    (a target name or .yaml path) times ``run_dir/model.onnx`` on that target, once its SHA-256
    matches its export record, and uses its figure instead of the report's. The latency compared
    is the one compress decided on, ``Stats.quiet`` (the median of the rounds not slowed by other
    tenants). ``junit`` writes the checks as JUnit XML; a directory or a file of the run is refused
    before anything runs.
    """
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise UserError(f"--max-latency-ms must be > 0, got {max_latency_ms:g}")
    _check_fraction("min_accuracy", min_accuracy)
    _check_fraction("max_accuracy_drop", max_accuracy_drop)

    path = _resolve_report(report_path)
    if junit is not None:
        check_junit_path(junit, path)
    rep = validate_report(load_report(path), path)
    result = GateResult(report_path=path)
    base, fin = rep.baseline, rep.final
    report_target = (rep.target.name if rep.target is not None else None) or "the report's target"
    verdict = budget_verdict(rep)

    # Latency: the report's final measurement, or a fresh one.
    lat = fin.latency_ms
    quiet = isinstance(lat, LatencyStats) and bool(lat.round_medians)
    median: float | None = decided_ms(lat) if quiet else lat.median if isinstance(lat, LatencyStats) else lat
    p90 = lat.p90 if isinstance(lat, LatencyStats) else None
    where = f"{QUIET if quiet else 'median'}, measured on {report_target}"
    fix = "the report has no measured final latency; rerun compress with a measuring target or pass --remeasure --target T"
    if remeasure_target is not None:
        stats = remeasure(path.parent, remeasure_target)
        result.remeasured = stats
        median, p90 = float(stats["quiet"]), float(stats["p90"])
        where = f"{QUIET}, re-measured on {stats['target']}"

    explicit = any(v is not None for v in (max_latency_ms, min_accuracy, max_accuracy_drop))
    if max_latency_ms is not None:
        result.checks.append(_latency_check(median, p90, max_latency_ms, where, fix))

    fa, ba = fin.accuracy, base.accuracy
    name = rep.metric_name  # the user's metric, when compress had one
    shipped = fin.deployed
    if shipped is not None and shipped.accuracy is not None:  # the model as it ships
        fa, ba = shipped.accuracy, base.deployed.accuracy if base.deployed is not None else None
        name = f"{name} (deployed {shipped.precision})"
    elif shipped is not None:  # its backend did not run where compress did (an agent's device)
        name = f"{name} (fp32; the {shipped.precision} artefact was not scored)"
    if min_accuracy is not None:
        if fa is None:
            result.checks.append(GateCheck("accuracy", False, None, min_accuracy,
                                           "accuracy unknown: the report has no final accuracy; rerun compress"))
        else:
            ok = fa >= min_accuracy - _EPS
            v, lim = _pair(100 * fa, 100 * min_accuracy)
            result.checks.append(GateCheck("accuracy", ok, fa, min_accuracy,
                                           f"{name} {v} % {'>=' if ok else '<'} {lim} % (final, validation)"))
    if max_accuracy_drop is not None:
        if fa is None or ba is None:
            result.checks.append(GateCheck("accuracy_drop", False, None, max_accuracy_drop,
                                           "accuracy drop unknown: the report lacks the baseline or final accuracy; rerun compress"))
        else:
            drop = ba - fa
            ok = drop <= max_accuracy_drop + _EPS
            v, lim = _pair(100 * drop, 100 * max_accuracy_drop)
            result.checks.append(GateCheck(
                "accuracy_drop", ok, drop, max_accuracy_drop,
                f"{name} drop {v} pp {'<=' if ok else '>'} {lim} pp ({100 * ba:.2f} % -> {100 * fa:.2f} %)"))

    budget_ms = rep.budget.latency_ms
    if not explicit and remeasure_target is not None and budget_ms is not None:
        chk = _latency_check(median, p90, budget_ms, where, fix)
        chk.name = "budget"
        chk.message = f"budget: {chk.message}"
        result.checks.append(chk)
    elif not explicit:
        result.checks.append(_verdict_check(rep, verdict))
    if explicit or remeasure_target is not None and budget_ms is not None:  # the stored verdict must still hold
        bad = _disagreement(rep, verdict)
        if bad is not None:
            result.checks.append(GateCheck("budget_verdict", False, rep.met_budget, verdict.met, bad))

    if junit is not None:
        write_junit(result, junit)
    return result


# --------------------------------------------------------------------------------------------
# Re-measuring the run's model, and the files the gate must not replace
# --------------------------------------------------------------------------------------------


def remeasure(run_dir: str | os.PathLike[str], target_name: str) -> dict[str, Any]:
    """Time ``run_dir/model.onnx`` on ``target_name``; the Stats as a dict, with ``target``.
    The bytes timed are the ones whose SHA-256 ``verified_model`` checked."""
    from deploy_prune.latency.measure import measurer_for
    from deploy_prune.target import load_target

    model = verified_model(Path(run_dir) / "model.onnx")
    target = load_target(target_name)
    stats = measurer_for(target).time({"model": model})["model"]
    return {**stats.as_dict(), "target": target.name}


def verified_model(model: Path) -> bytes:
    """``model``'s bytes, when their SHA-256 is the one its export record (``X.onnx.json``,
    written with it by compress) holds; else a ``UserError``: the file is not the model the
    report describes."""
    record = model.with_name(model.name + ".json")
    if not model.is_file():
        raise UserError(f"cannot re-measure: {str(model)!r} not found; run the gate on a run directory that holds model.onnx")
    try:
        rec = json.loads(record.read_text())
    except FileNotFoundError:
        raise UserError(f"cannot re-measure {str(model)!r}: its export record {record.name} is missing, so nothing says it "
                        "is the model the report describes; rerun compress to write both") from None
    except (OSError, ValueError, RecursionError) as e:
        why = e.strerror if isinstance(e, OSError) else "not JSON"
        raise UserError(f"cannot re-measure {str(model)!r}: its export record {str(record)!r} is unreadable ({why}); "
                        "rerun compress to write both") from None
    want = rec.get("onnx_sha256") if isinstance(rec, dict) else None
    if not isinstance(want, str):
        raise UserError(f"cannot re-measure {str(model)!r}: its export record {str(record)!r} holds no onnx_sha256; "
                        "rerun compress to write both")
    data = model.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != want.lower():
        raise UserError(f"{str(model)!r} is not the model the report describes: its SHA-256 {got[:12]}... is not the "
                        f"{want[:12]}... recorded in {record.name}; restore the run's model.onnx or rerun compress")
    return data


# What a run directory holds that ``--junit`` must never replace: a compress run's files and
# plots, train's metrics, and the run an --overwrite is replacing (``io.ASIDE``).
RUN_FILES = (*COMPRESS_FILES, *(f"{stem}.png" for stem in PLOTS), "metrics.json")
RUN_DIRS = (*COMPRESS_DIRS, ASIDE)
_RUN_SUFFIXES = (".onnx", ".onnx.json", ".pt", ".pt2", ".png")


def _owned(p: Path, run_dir: Path) -> bool:
    """Whether ``p`` (resolved) is a file of the run in ``run_dir`` (resolved)."""
    if p.parent == run_dir:
        return p.name in RUN_FILES or p.name.endswith(_RUN_SUFFIXES) or p.name.startswith("report.")
    return any(p.is_relative_to(run_dir / d) for d in RUN_DIRS)


def check_junit_path(junit: str | os.PathLike[str], report: Path) -> Path:
    """``junit`` if the gate may write JUnit XML there: not a directory, not the report nor any
    file of its run (``RUN_FILES``, also through a link), under a directory that can be made."""
    out = Path(junit)
    flag = f"--junit {str(out)!r}"
    if out.is_dir():
        raise UserError(f"{flag} is a directory; give a file name such as {str(out / 'gate.xml')!r}")
    run_dir = report.parent.resolve()
    target = out.resolve()
    same = target == report.resolve() or (out.exists() and report.exists() and os.path.samefile(out, report))
    if same:
        raise UserError(f"{flag} is the report itself: the JUnit XML would replace it; give another file such as 'gate.xml'")
    if _owned(target, run_dir) or (out.exists() and any(
            q.exists() and os.path.samefile(out, q) for q in (run_dir / n for n in RUN_FILES))):
        raise UserError(f"{flag} is {target.name}, a file of the run in {str(report.parent)!r}: the JUnit XML would replace "
                        f"it; give another file such as {str(report.parent / 'gate.xml')!r}")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag}: {str(parent)!r} is a file, not a directory; give a path in a directory")
            break
    return out


def format_result(result: GateResult) -> list[str]:
    """One line per check: ``PASS latency 4.81 ms <= 5.00 ms (...)`` or ``FAIL ...``."""
    return [f"{'PASS' if c.passed else 'FAIL'} {c.message}" for c in result.checks]


def junit_xml(result: GateResult) -> ET.Element:
    """One ``<testsuite name="deploy-prune gate">`` with a ``<testcase>`` per check."""
    failures = len(result.failed)
    suite = ET.Element("testsuite", {
        "name": SUITE_NAME, "tests": str(len(result.checks)), "failures": str(failures), "errors": "0", "skipped": "0",
    })
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", {"name": "report", "value": str(result.report_path)})
    if result.remeasured is not None:
        ET.SubElement(props, "property", {"name": "remeasured_on", "value": str(result.remeasured.get("target"))})
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", {"classname": "deploy_prune.gate", "name": c.name})
        if not c.passed:
            fail = ET.SubElement(case, "failure", {"message": c.message, "type": "GateFailure"})
            fail.text = f"{c.message}\nvalue: {c.value}\nlimit: {c.limit}"
        out = ET.SubElement(case, "system-out")
        out.text = c.message
    ET.indent(suite)
    return suite


def write_junit(result: GateResult, path: str | os.PathLike[str]) -> Path:
    """Write ``junit_xml(result)`` atomically to ``path`` (``check_junit_path`` first)."""
    check_junit_path(path, result.report_path)
    tree = ET.ElementTree(junit_xml(result))
    try:
        ensure_dir(Path(path).parent)
        return atomic_write(path, lambda p: tree.write(p, encoding="utf-8", xml_declaration=True))
    except (OSError, UserError) as e:
        why = e.strerror if isinstance(e, OSError) else "its directory cannot be written"
        raise UserError(f"cannot write --junit {str(path)!r} ({why}); give a writable file") from None
