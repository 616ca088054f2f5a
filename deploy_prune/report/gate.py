"""The CI gate: check a compress report (optionally re-measuring its model) against limits.

``run_gate`` returns one ``GateCheck`` per limit; the CLI prints ``format_result`` and exits
0 when every check passes, 1 when any fails, 2 on bad input (``UserError``). Accuracies are
fractions (0.9 = 90 %); ``max_accuracy_drop`` is baseline accuracy minus final accuracy, also a
fraction (0.01 = 1 percentage point). For a target that ships another precision (int8), the
accuracies compared are the deployed model's (``final.deployed``). With no explicit limit the gate checks the report's own
budget verdict (``met_budget``), or, when re-measuring a latency budget, the new median against it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy_prune.errors import UserError
from deploy_prune.io import atomic_write
from deploy_prune.latency.timing import quiet_of
from deploy_prune.report import load_report
from deploy_prune.report import report_path as _resolve_report

SUITE_NAME = "deploy-prune gate"
# Comparisons of accuracies (fractions) tolerate float noise: 0.93 - 0.92 counts as a drop of 0.01.
_EPS = 1e-9


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


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


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


def run_gate(
    report_path: str | os.PathLike[str],
    max_latency_ms: float | None = None,
    min_accuracy: float | None = None,
    max_accuracy_drop: float | None = None,
    remeasure_target: str | None = None,
    junit: str | os.PathLike[str] | None = None,
) -> GateResult:
    """Check the report at ``report_path`` (a run directory or its report.json) against the limits.

    ``remeasure_target`` (a target name or .yaml path) times ``run_dir/model.onnx`` on that target
    and uses its figure instead of the report's. The latency compared is the one compress decided
    on, ``Stats.quiet`` (the median of the rounds not slowed by other tenants). ``junit`` writes
    the checks as JUnit XML.
    """
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise UserError(f"--max-latency-ms must be > 0, got {max_latency_ms:g}")
    _check_fraction("min_accuracy", min_accuracy)
    _check_fraction("max_accuracy_drop", max_accuracy_drop)

    path = _resolve_report(report_path)
    rep = load_report(path)
    result = GateResult(report_path=path)
    base, fin = rep["baseline"], rep["final"]
    report_target = (rep.get("target") or {}).get("name") or "the report's target"

    # Latency: the report's final measurement, or a fresh one.
    lat = fin.get("latency_ms")
    quiet = isinstance(lat, Mapping) and bool(lat.get("round_medians"))
    if isinstance(lat, Mapping):
        median = quiet_of(lat) if quiet else _num(lat.get("median"))
    else:
        median = _num(lat)
    p90 = _num(lat.get("p90")) if isinstance(lat, Mapping) else None
    where = f"{QUIET if quiet else 'median'}, measured on {report_target}"
    fix = "the report has no measured final latency; rerun compress with a measuring target or pass --remeasure --target T"
    if remeasure_target is not None:
        stats = remeasure(path.parent, remeasure_target)
        result.remeasured = stats
        median, p90 = quiet_of(stats), float(stats["p90"])
        where = f"{QUIET}, re-measured on {stats['target']}"

    explicit = any(v is not None for v in (max_latency_ms, min_accuracy, max_accuracy_drop))
    if max_latency_ms is not None:
        result.checks.append(_latency_check(median, p90, max_latency_ms, where, fix))

    fa, ba = _num(fin.get("accuracy")), _num(base.get("accuracy"))
    name = str((rep.get("metric") or {}).get("name") or "accuracy")  # the user's metric, when compress had one
    shipped = fin.get("deployed")
    if isinstance(shipped, Mapping) and _num(shipped.get("accuracy")) is not None:  # the model as it ships
        fa, ba = _num(shipped.get("accuracy")), _num((base.get("deployed") or {}).get("accuracy"))
        name = f"{name} (deployed {shipped.get('precision')})"
    elif isinstance(shipped, Mapping):  # its backend did not run where compress did (an agent's device)
        name = f"{name} (fp32; the {shipped.get('precision')} artefact was not scored)"
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

    if not explicit:
        budget_ms = _num((rep.get("budget") or {}).get("latency_ms"))
        if remeasure_target is not None and budget_ms is not None:
            chk = _latency_check(median, p90, budget_ms, where, fix)
            chk.name = "budget"
            chk.message = f"budget: {chk.message}"
            result.checks.append(chk)
        else:
            met = bool(rep["met_budget"])
            note = str(rep.get("budget_note") or "").strip()
            msg = f"budget {'met' if met else 'NOT met'}" + (f": {note}" if note else "") + " (from the report)"
            result.checks.append(GateCheck("budget", met, met, True, msg))

    if junit is not None:
        write_junit(result, junit)
    return result


def remeasure(run_dir: str | os.PathLike[str], target_name: str) -> dict[str, Any]:
    """Time ``run_dir/model.onnx`` on ``target_name``; the Stats as a dict, with ``target``."""
    from deploy_prune.latency.measure import measurer_for
    from deploy_prune.target import load_target

    model = Path(run_dir) / "model.onnx"
    if not model.is_file():
        raise UserError(f"cannot re-measure: {str(model)!r} not found; run the gate on a run directory that holds model.onnx")
    target = load_target(target_name)
    stats = measurer_for(target).time({"model": model})["model"]
    return {**stats.as_dict(), "target": target.name}


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
    """Write ``junit_xml(result)`` atomically to ``path``."""
    tree = ET.ElementTree(junit_xml(result))
    return atomic_write(path, lambda p: tree.write(p, encoding="utf-8", xml_declaration=True))
