"""Reports of a compress run: ``report.json`` (written by compress) rendered as Markdown, HTML and plots.

``report.json`` is the machine-readable truth; ``write_reports(run_dir)`` (what
``deploy-prune report runs/NAME`` calls) reads it and writes beside it ``report.md``,
a self-contained ``report.html`` (plots embedded as base64 PNG) and the PNG plots.
Only the keys in ``REQUIRED_KEYS`` must be present; everything else is rendered when it is there.

This is one module, over the usual length, because it renders one report: Markdown and HTML
lay out the same sections from the same row builders (``_headline_rows``, ``_step_rows`` and the
like), and the plots are what both embed, so a field added to ``report.json`` is rendered here once.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy_prune.config import PRECISIONS
from deploy_prune.errors import UserError
from deploy_prune.io import atomic_write, read_json, write_text

SCHEMA_VERSION = 2  # 2: final.verdict, what a latency budget's verdict was decided on
READS = (1, 2)  # the report schema versions this deploy-prune reads
REQUIRED_KEYS = ("schema_version", "budget", "method", "baseline", "final", "met_budget", "steps", "provenance")
REPORT_FILE = "report.json"
# What a compress run writes in its directory besides its plots (PLOTS): --overwrite replaces
# these and nothing else, and gate --junit never writes over them.
RUN_FILES = ("model.onnx", "model.onnx.json", "model.pt", "model.pt2", "report.json", "report.md", "report.html",
             "sensitivity.json", *(f"model.{p}.onnx" for p in PRECISIONS if p != "fp32"))
RUN_DIRS = ("checkpoints", "finetune")

# Plot file stems, in the order they appear in the reports, with their captions.
PLOTS: dict[str, str] = {
    "accuracy_vs_latency": "Accuracy vs measured latency along the steps",
    "widths": "Channels per group, before and after",
    "predicted_vs_measured": "Predicted vs measured latency",
    "sensitivity": "Sensitivity: accuracy drop of each group pruned alone",
}

_DASH = "—"

__all__ = [
    "REQUIRED_KEYS", "SCHEMA_VERSION", "encode_plots", "load_report", "make_plots", "render_html",
    "render_markdown", "report_path", "write_reports",
]


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def report_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it is a file, ``path/report.json`` when it is a directory."""
    p = Path(path)
    return p / REPORT_FILE if p.is_dir() else p


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a compress report; ``path`` is the run directory or its ``report.json``."""
    p = report_path(path)
    if not p.exists():
        where = f"{str(p)!r}" if p.name == REPORT_FILE else f"{str(p)!r} (nor a run directory holding {REPORT_FILE})"
        raise UserError(f"report not found: {where}; pass a run directory written by deploy-prune compress or its {REPORT_FILE}")
    rep = read_json(p, what="deploy-prune report", fix="rerun deploy-prune compress")
    if not isinstance(rep, dict):
        raise UserError(f"{str(p)!r} is not a deploy-prune report (expected a JSON object); rerun deploy-prune compress")
    version = rep.get("schema_version")
    if "schema_version" in rep and (isinstance(version, bool) or version not in READS):
        raise UserError(
            f"{str(p)!r} has report schema_version {version!r}, this deploy-prune reads versions "
            f"{', '.join(map(str, READS))}; "
            "rerun compress with this version or use the deploy-prune that wrote it"
        )
    missing = [k for k in REQUIRED_KEYS if k not in rep]
    if missing:
        raise UserError(
            f"{str(p)!r} is not a complete deploy-prune report: missing key(s) {', '.join(missing)}; "
            "rerun deploy-prune compress to regenerate it"
        )
    shapes: dict[str, tuple[type, str]] = {
        "budget": (dict, "an object"), "method": (dict, "an object"), "baseline": (dict, "an object"),
        "final": (dict, "an object"), "met_budget": (bool, "true or false"), "steps": (list, "a list"),
        "provenance": (dict, "an object"),
    }
    for key, (typ, want) in shapes.items():
        if not isinstance(rep[key], typ):
            raise UserError(f"{str(p)!r}: {key!r} must be {want}, got {type(rep[key]).__name__}; rerun deploy-prune compress")
    for i, s in enumerate(rep["steps"]):
        if not isinstance(s, dict):
            raise UserError(f"{str(p)!r}: steps[{i}] must be an object, got {type(s).__name__}; rerun deploy-prune compress")
    return rep


# --------------------------------------------------------------------------------------------
# Value helpers (every field may be absent or null)
# --------------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _lat(x: Any, key: str = "median") -> float | None:
    """A latency field: ``{"median": .., "p90": ..}`` (or a bare number, taken as the median)."""
    if isinstance(x, Mapping):
        return _num(x.get(key))
    return _num(x) if key == "median" else None


def _ms(x: float | None) -> str:
    if x is None:
        return _DASH
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.2f}" if abs(x) < 100 else f"{x:.1f}"


def _metric(rep: Mapping[str, Any]) -> str:
    """The name of the run's metric (``accuracy`` unless the run had the user's ``evaluate``);
    figures hold it under ``accuracy`` in schema 1, shown x100 as for accuracy."""
    return str((rep.get("metric") or {}).get("name") or "accuracy")


def _pct(x: float | None, digits: int = 2) -> str:
    return _DASH if x is None else f"{100 * x:.{digits}f}"


def _mega(x: float | None, digits: int = 2) -> str:
    return _DASH if x is None else f"{x / 1e6:.{digits}f}"


def _rel(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return _DASH
    return f"{100 * (after / before - 1):+.1f} %"


def _value(v: Any) -> str:
    if v is None:
        return _DASH
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items())
    return str(v)


def _run_name(rep: Mapping[str, Any]) -> str:
    rd = rep.get("run_dir")
    return Path(str(rd)).name if rd else "compress run"


def budget_text(rep: Mapping[str, Any]) -> str:
    """The budget in words, e.g. ``latency <= 50 % of baseline (1.050 ms)``."""
    b = rep.get("budget") or {}
    kind, value, ms = b.get("kind"), _num(b.get("value")), _num(b.get("latency_ms"))
    target = (rep.get("target") or {}).get("name")
    on = f" on {target}" if target else ""
    if kind == "latency_ms":
        return f"latency <= {_ms(value if value is not None else ms)} ms (median{on})"
    ratio = f"{100 * value:g} %" if value is not None else "?"
    if kind == "latency_ratio":
        return f"latency <= {ratio} of baseline" + (f" = {_ms(ms)} ms (median{on})" if ms is not None else "")
    if kind == "flops_ratio":
        return f"FLOPs <= {ratio} of baseline"
    if kind == "params_ratio":
        return f"parameters <= {ratio} of baseline"
    if kind == "keep_ratio":
        return f"keep {ratio} of the channels"
    return f"{kind} = {_value(b.get('value'))}" if kind else _value(dict(b)) or _DASH


def budget_status(rep: Mapping[str, Any]) -> str:
    """``MET`` (with the note) or ``NOT MET: <budget_note>``."""
    note = str(rep.get("budget_note") or "").strip()
    if rep.get("met_budget"):
        return f"MET ({note})" if note else "MET"
    return f"NOT MET: {note}" if note else "NOT MET"


def _headline_rows(rep: Mapping[str, Any]) -> list[list[str]]:
    base, fin = rep.get("baseline") or {}, rep.get("final") or {}
    rows: list[list[str]] = []
    ba, fa = _num(base.get("accuracy")), _num(fin.get("accuracy"))
    drop = f"{100 * (fa - ba):+.2f} pp" if ba is not None and fa is not None else _DASH
    dep = fin.get("deployed") or {}
    rows.append([f"{_metric(rep)}{' (fp32)' if dep else ''} (%)", _pct(ba), _pct(fa), drop])
    if dep:  # the model as it ships (int8): its metric, and the latencies below are of it too
        bd, fd = _num((base.get("deployed") or {}).get("accuracy")), _num(dep.get("accuracy"))
        rows.append([f"{_metric(rep)} ({dep.get('precision')}, deployed) (%)", _pct(bd), _pct(fd),
                     f"{100 * (fd - bd):+.2f} pp" if bd is not None and fd is not None else _DASH])
        b32, f32 = _lat((base.get("deployed") or {}).get("fp32_latency_ms")), _lat(dep.get("fp32_latency_ms"))
        rows.append(["latency of the fp32 graph, same backend (ms)", _ms(b32), _ms(f32), _rel(b32, f32)])
    for label, get, fmt in (
        ("latency median (ms)", lambda d: _lat(d.get("latency_ms"), "median"), _ms),
        ("latency p90 (ms)", lambda d: _lat(d.get("latency_ms"), "p90"), _ms),
        ("predicted latency (ms)", lambda d: _num(d.get("predicted_latency_ms")), _ms),
        ("FLOPs (M)", lambda d: _num(d.get("flops")), _mega),
        ("params (M)", lambda d: _num(d.get("params")), lambda x: _mega(x, 3)),
    ):
        b, f = get(base), get(fin)
        rows.append([label, fmt(b), fmt(f), _rel(b, f)])
    sb, sf = _num(base.get("sparsity")), _num(fin.get("sparsity"))
    rows.append(["sparsity (%)", _pct(sb, 1), _pct(sf, 1), _DASH])
    return rows


def _context_line(rep: Mapping[str, Any]) -> str:
    parts = []
    m = rep.get("model") or {}
    if m.get("spec"):
        s = str(m["spec"])
        if m.get("input_shape"):
            s += f", input {'x'.join(str(d) for d in m['input_shape'])}"
        if m.get("num_classes"):
            s += f", {m['num_classes']} classes"
        parts.append(f"model {s}")
    d = rep.get("data") or {}
    if d.get("name"):
        parts.append(f"data {d['name']}")
    t = rep.get("target") or {}
    if t.get("name"):
        extra = [str(t[k]) for k in ("backend", "device", "precision") if t.get(k)]
        thr = t.get("threads_resolved", t.get("threads"))
        if thr:
            extra.append(f"{thr} thread{'s' if thr != 1 else ''}")
        parts.append(f"target {t['name']}" + (f" ({', '.join(extra)})" if extra else ""))
    return "; ".join(parts)


def _step_rows(rep: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for s in rep.get("steps") or []:
        rows.append([
            _value(s.get("step")), _value(s.get("stage")), _ms(_num(s.get("predicted_latency_ms"))),
            _ms(_lat(s.get("measured_latency_ms"), "median")), _ms(_lat(s.get("measured_latency_ms"), "p90")),
            _pct(_num(s.get("accuracy"))), _mega(_num(s.get("flops"))), _mega(_num(s.get("params")), 3),
            _secs(s.get("seconds")),
        ])
    return rows


def _secs(x: Any) -> str:
    n = _num(x)
    return f"{n:.1f}" if n is not None else _value(x)


def _kept_rows(items: list[Mapping[str, Any]] | None, name: str, before: str, after: str) -> list[list[str]]:
    """[name, before, after, kept %] per item (channels per group, or rank per factorised layer)."""
    rows = []
    for g in items or []:
        b, a = _num(g.get(before)), _num(g.get(after))
        kept = f"{100 * a / b:.0f} %" if a is not None and b else _DASH
        rows.append([_value(g.get(name)), _value(g.get(before)), _value(g.get(after)), kept])
    return rows


def _layer_rows(rep: Mapping[str, Any]) -> list[list[str]]:
    return _kept_rows(rep.get("layers"), "group", "channels_before", "channels_after")


def _rank_rows(rep: Mapping[str, Any]) -> list[list[str]]:
    return _kept_rows(rep.get("ranks"), "layer", "full_rank", "rank")


def _stage_rows(rep: Mapping[str, Any]) -> list[list[str]]:
    """One row per stage, then the run's wall-clock total (``total`` in the report, else the sum),
    with what the stages do not account for (loading, planning, writing) as ``other``."""
    st = dict(rep.get("stage_seconds") or {})
    wall = _num(st.pop("total", None))
    rows = [[str(k), _secs(v)] for k, v in st.items()]
    summed = sum(v for v in (_num(x) for x in st.values()) if v is not None)
    if wall is not None and wall - summed >= 0.05:
        rows.append(["other", f"{wall - summed:.1f}"])
    if rows:
        rows.append(["total", f"{wall if wall is not None else summed:.1f}"])
    return rows


def _settings(rep: Mapping[str, Any]) -> list[list[str]]:
    """Method settings; nested records (per-layer fits, learning histories) stay in report.json."""
    return [[str(k), _value(v) if not isinstance(v, (dict, list)) or len(str(v)) <= 120 else "(in report.json)"]
            for k, v in ((rep.get("method") or {}).get("settings") or {}).items()]


def _provenance(rep: Mapping[str, Any]) -> list[list[str]]:
    return [[str(k), _value(v)] for k, v in (rep.get("provenance") or {}).items()]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    out.append("|" + "|".join(("---:" if a == "r" else "---") for a in (align or "l" * len(header))) + "|")
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out


def render_markdown(rep: Mapping[str, Any], plots: Mapping[str, str | os.PathLike[str]] | None = None) -> str:
    """The report as Markdown; ``plots`` (stem -> PNG path) are linked by file name when given."""
    lines = [f"# deploy-prune report: {_run_name(rep)}", ""]
    ctx = _context_line(rep)
    if ctx:
        lines += [ctx, ""]
    lines += ["## Result", ""]
    lines.append(f"**Budget:** {budget_text(rep)}  ")
    lines.append(f"**Verdict:** {budget_status(rep)}")
    lines.append("")
    lines += _md_table(["", "baseline", "final", "change"], _headline_rows(rep), "lrrr")
    lines.append("")

    method = rep.get("method") or {}
    lines += ["## Method", "", f"**{method.get('name', _DASH)}**", ""]
    if _settings(rep):
        lines += _md_table(["setting", "value"], _settings(rep))
        lines.append("")

    if rep.get("steps"):
        lines += ["## Steps", ""]
        lines += _md_table(
            ["step", "stage", "predicted (ms)", "measured median (ms)", "measured p90 (ms)", f"{_metric(rep)} (%)",
             "FLOPs (M)", "params (M)", "seconds"], _step_rows(rep), "rlrrrrrrr")
        lines.append("")
    if rep.get("layers"):
        lines += ["## Channels per group", ""]
        lines += _md_table(["group", "before", "after", "kept"], _layer_rows(rep), "lrrr")
        lines.append("")
    if rep.get("ranks"):
        lines += ["## Low-rank layers", "", "Each runs as a k x k conv to *rank* channels and a 1 x 1 conv back out.", ""]
        lines += _md_table(["layer", "full rank", "rank", "kept"], _rank_rows(rep), "lrrr")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for stem, path in plots.items():
            lines += [f"![{PLOTS.get(stem, stem)}]({Path(path).name})", ""]
    if rep.get("stage_seconds"):
        lines += ["## Time per stage", ""]
        lines += _md_table(["stage", "seconds"], _stage_rows(rep), "lr")
        lines.append("")
    if rep.get("notes"):
        lines += ["## Notes", ""]
        lines += [f"- {str(n).strip()}" for n in rep["notes"]]
        lines.append("")
    lines += ["## Provenance", ""]
    prov = _provenance(rep)
    lines += _md_table(["key", "value"], prov) if prov else [_DASH]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}th{background:#f5f5f5}
.status{display:inline-block;padding:.15rem .6rem;border-radius:.3rem;font-weight:bold;color:#fff}
.met{background:#2e7d32}.notmet{background:#c62828}.muted{color:#666}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#666;font-size:.9rem}
""".strip()


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _html_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" * len(header)

    def cls(i: int) -> str:
        return ' class="r"' if i < len(align) and align[i] == "r" else ""

    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def encode_plots(paths: Mapping[str, str | os.PathLike[str]]) -> dict[str, str]:
    """Read PNG files (stem -> path) into base64 strings for ``render_html``."""
    return {k: base64.b64encode(Path(p).read_bytes()).decode("ascii") for k, p in paths.items()}


def render_html(rep: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """A self-contained HTML page; ``plots`` maps a plot stem to its PNG as a base64 string."""
    title = f"deploy-prune report: {_run_name(rep)}"
    met = bool(rep.get("met_budget"))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
    ]
    ctx = _context_line(rep)
    if ctx:
        parts.append(f'<p class="muted">{_e(ctx)}</p>')
    parts.append("<h2>Result</h2>")
    parts.append(f"<p><strong>Budget:</strong> {_e(budget_text(rep))}</p>")
    parts.append(f'<p><span class="status {"met" if met else "notmet"}">{_e("MET" if met else "NOT MET")}</span> '
                 f"{_e(budget_status(rep))}</p>")
    parts.append(_html_table(["", "baseline", "final", "change"], _headline_rows(rep), "lrrr"))

    method = rep.get("method") or {}
    parts.append(f"<h2>Method</h2><p><strong>{_e(method.get('name', _DASH))}</strong></p>")
    if _settings(rep):
        parts.append(_html_table(["setting", "value"], _settings(rep)))
    if rep.get("steps"):
        parts.append("<h2>Steps</h2>")
        parts.append(_html_table(
            ["step", "stage", "predicted (ms)", "measured median (ms)", "measured p90 (ms)", f"{_metric(rep)} (%)",
             "FLOPs (M)", "params (M)", "seconds"], _step_rows(rep), "rlrrrrrrr"))
    if rep.get("layers"):
        parts.append("<h2>Channels per group</h2>")
        parts.append(_html_table(["group", "before", "after", "kept"], _layer_rows(rep), "lrrr"))
    if rep.get("ranks"):
        parts.append("<h2>Low-rank layers</h2>")
        parts.append(_html_table(["layer", "full rank", "rank", "kept"], _rank_rows(rep), "lrrr"))
    if plots:
        parts.append("<h2>Plots</h2>")
        for stem, b64 in plots.items():
            cap = PLOTS.get(stem, stem)
            parts.append(f'<figure><img alt="{_e(cap)}" src="data:image/png;base64,{_e(b64)}">'
                         f"<figcaption>{_e(cap)}</figcaption></figure>")
    if rep.get("stage_seconds"):
        parts.append("<h2>Time per stage</h2>")
        parts.append(_html_table(["stage", "seconds"], _stage_rows(rep), "lr"))
    if rep.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(str(n).strip())}</li>" for n in rep["notes"]) + "</ul>")
    parts.append("<h2>Provenance</h2>")
    prov = _provenance(rep)
    parts.append(_html_table(["key", "value"], prov) if prov else f"<p>{_DASH}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def make_plots(rep: Mapping[str, Any], run_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the PNG plots into ``run_dir`` (stem -> path); a plot without data is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(run_dir)
    written: dict[str, Path] = {}

    def save(stem: str, fig: Any) -> None:
        fig.tight_layout()
        try:
            written[stem] = atomic_write(out_dir / f"{stem}.png", lambda p: fig.savefig(p, format="png", dpi=120))
        finally:
            plt.close(fig)

    for stem, draw in (("accuracy_vs_latency", _plot_accuracy), ("widths", _plot_widths),
                       ("predicted_vs_measured", _plot_predicted)):
        fig = draw(rep, plt)
        if fig is not None:
            save(stem, fig)
    return written


def _plot_accuracy(rep: Mapping[str, Any], plt: Any) -> Any:
    pts = [(m, _num(s.get("accuracy")), s) for s in rep.get("steps") or []
           if (m := _lat(s.get("measured_latency_ms"))) is not None and _num(s.get("accuracy")) is not None]
    ends = {}
    for key in ("baseline", "final"):
        d = rep.get(key) or {}
        m, a = _lat(d.get("latency_ms")), _num(d.get("accuracy"))
        if m is not None and a is not None:
            ends[key] = (m, a)
    if not pts and not ends:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs, ys = [p[0] for p in pts], [100 * float(p[1] or 0) for p in pts]
    if "baseline" in ends:  # the path starts at the baseline
        xs, ys = [ends["baseline"][0], *xs], [100 * ends["baseline"][1], *ys]
    if xs:
        ax.plot(xs, ys, "-o", color="#1f77b4", ms=4, lw=1, label="steps")
        # Steps that land on (nearly) the same point share one label ("3,4"), and neighbouring
        # labels alternate above and below the line, so none is drawn over another.
        xr, yr = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
        spots: dict[tuple[int, int], tuple[float, float, list[str]]] = {}
        for (x, y, s) in pts:
            cell = (round(40 * (x - min(xs)) / xr), round(40 * (100 * float(y or 0) - min(ys)) / yr))
            spots.setdefault(cell, (x, 100 * float(y or 0), []))[2].append(str(s.get("step", "")))
        for i, (x, y, labels) in enumerate(sorted(spots.values())):
            ax.annotate(",".join(labels), (x, y), textcoords="offset points", xytext=(4, 5 if i % 2 == 0 else -11), fontsize=7)
    if "baseline" in ends:
        ax.scatter([ends["baseline"][0]], [100 * ends["baseline"][1]], marker="s", s=70, color="0.3", zorder=3, label="baseline")
    if "final" in ends:
        ax.scatter([ends["final"][0]], [100 * ends["final"][1]], marker="*", s=160, color="#d62728", zorder=3, label="final")
    budget_ms = _num((rep.get("budget") or {}).get("latency_ms"))
    if budget_ms is not None:
        ax.axvline(budget_ms, color="#d62728", ls="--", lw=1, label=f"budget {_ms(budget_ms)} ms")
    target = (rep.get("target") or {}).get("name")
    ax.set_xlabel("measured latency, median (ms)" + (f" on {target}" if target else ""))
    ax.set_ylabel(f"{_metric(rep)} (%)")
    ax.set_title(f"{_run_name(rep)}: {_metric(rep)} vs latency", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_widths(rep: Mapping[str, Any], plt: Any) -> Any:
    layers = [g for g in rep.get("layers") or []
              if _num(g.get("channels_before")) is not None and _num(g.get("channels_after")) is not None]
    if not layers:
        return None
    n = len(layers)
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * n + 1.8))
    ys = list(range(n))
    before = [float(_num(g["channels_before"]) or 0) for g in layers]
    after = [float(_num(g["channels_after"]) or 0) for g in layers]
    ax.barh(ys, before, color="#c7d7ea")
    ax.barh(ys, after, height=0.5, color="#1f77b4")
    for y, b, a in zip(ys, before, after, strict=True):
        ax.text(b, y, f" {a:g}/{b:g}", va="center", fontsize=7)
    ax.set_yticks(ys, [str(g.get("group", "?")) for g in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(before) * 1.2)
    ax.set_xlabel("channels (light: before, dark: after)")
    ax.set_title(f"{_run_name(rep)}: channels per group", fontsize=10)
    return fig


def _plot_predicted(rep: Mapping[str, Any], plt: Any) -> Any:
    pts = [(m, p) for s in rep.get("steps") or []
           if (m := _lat(s.get("measured_latency_ms"))) is not None and (p := _num(s.get("predicted_latency_ms"))) is not None]
    ends = {}
    for key in ("baseline", "final"):
        d = rep.get(key) or {}
        m, p = _lat(d.get("latency_ms")), _num(d.get("predicted_latency_ms"))
        if m is not None and p is not None:
            ends[key] = (m, p)
    if not pts and not ends:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    allv = [v for xy in [*pts, *ends.values()] for v in xy]
    lo, hi = min(allv) * 0.9, max(allv) * 1.1
    ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="y = x")
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#1f77b4", s=20, label="steps")
    if "baseline" in ends:
        ax.scatter(*zip(ends["baseline"], strict=True), marker="s", s=60, color="0.3", label="baseline")
    if "final" in ends:
        ax.scatter(*zip(ends["final"], strict=True), marker="*", s=140, color="#d62728", label="final")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured median (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.set_title(f"{_run_name(rep)}: predicted vs measured latency", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def write_reports(run_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Read ``run_dir/report.json``; write the plots, ``report.md`` and ``report.html`` beside it.

    Returns ``{"markdown": ..., "html": ..., <plot stem>: ...}``.
    """
    path = report_path(run_dir)
    rep = load_report(path)
    out_dir = path.parent
    plots = make_plots(rep, out_dir)
    heat = Path(str((rep.get("sensitivity") or {}).get("path") or out_dir / "sensitivity.json")).with_suffix(".png")
    if heat.is_file():  # the heat map the sensitivity analysis drew (sensitivity.plot_heatmap)
        plots["sensitivity"] = heat
    md = write_text(out_dir / "report.md", render_markdown(rep, plots))
    page = write_text(out_dir / "report.html", render_html(rep, encode_plots(plots)))
    return {"markdown": md, "html": page, **plots}
