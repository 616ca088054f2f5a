"""Experiment tracking: a finished compress run recorded in TensorBoard or MLflow.

``--log tensorboard:DIR`` writes event files under ``DIR/<run name>`` with
``torch.utils.tensorboard.SummaryWriter``; ``--log mlflow`` (or ``mlflow:URI``) records an MLflow
run, by default in MLflow's local file store (``./mlruns``), so nothing needs a server. Both get
the same things from ``report.json``: per step the measured latency (quiet figure), the
predicted latency, the metric, FLOPs and parameters; the final widths of every group; the
baseline and final figures and the run's settings; and the report itself (MLflow: the report
files as artifacts; TensorBoard: the Markdown report as text).

Recording happens once the run has written its report, from that report, so a tracker never
sees a half-finished run and a run can be recorded again later (``deploy-prune report --log``).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy_prune.errors import UserError
from deploy_prune.registry import Registry


@dataclass(frozen=True)
class Tracker:
    """A parsed ``--log`` value: the tracker's name and its argument (a directory or URI)."""

    name: str
    where: str | None


Recorder = Callable[[Tracker, Mapping[str, Any], Path], str]
TRACKERS: Registry[Recorder] = Registry("tracker")
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}  # module, pip name


def parse_trackers(specs: Sequence[str]) -> list[Tracker]:
    """``["tensorboard:runs/tb", "mlflow"]`` as trackers, checked now (name, argument, installed,
    and a local store writable: ``check_writable``), so a bad value fails before the run starts,
    not after it."""
    out = []
    for spec in specs:
        name, _, where = spec.partition(":")
        if name not in TRACKERS:
            raise UserError(f"--log {spec!r}: unknown tracker {name!r}; use tensorboard:DIR or mlflow[:URI]")
        if name == "tensorboard" and not where:
            raise UserError(f"--log {spec!r}: give the directory for the event files, e.g. tensorboard:runs/tb")
        module, pip = NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--log {name} needs {pip}: pip install 'deploy-prune[tracking]'")
        tracker = Tracker(name, where or None)
        store = local_store(tracker)
        if store is not None:
            check_writable(store, f"--log {spec}")
        out.append(tracker)
    return out


def local_store(t: Tracker) -> Path | None:
    """The directory a tracker writes into on this machine: TensorBoard's ``DIR``; MLflow's local
    file store (``./mlruns``, a ``file:`` URI or a plain path); None for a tracking server."""
    if t.name == "tensorboard":
        return Path(str(t.where))
    uri = t.where or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return Path("mlruns")
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if "://" in uri or uri.startswith("databricks"):
        return None
    return Path(uri)


def check_writable(directory: Path, what: str) -> None:
    """A ``UserError`` naming ``directory`` unless files can be made in it: a probe file is created
    and removed in it, or, where it does not exist yet, in its nearest existing parent (which must
    be a directory; nothing is created on the way)."""
    probe_in = directory
    try:
        while not probe_in.exists():
            if probe_in.parent == probe_in:
                break
            probe_in = probe_in.parent
        ok = probe_in.is_dir()
    except OSError as e:  # a parent that cannot be searched
        raise UserError(f"{what}: cannot write into {str(directory)!r} ({e.strerror or e}); "
                        "give a directory you can write to") from None
    if not ok:
        raise UserError(f"{what}: cannot write into {str(directory)!r}: {str(probe_in)!r} is a file, not a directory; "
                        "give a directory you can write to")
    try:
        fd, name = tempfile.mkstemp(dir=probe_in, prefix=".deploy-prune-probe.")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"{what}: cannot write into {str(directory)!r} ({e.strerror or e}); "
                        "give a directory you can write to") from None


def record(trackers: Sequence[Tracker], report: Mapping[str, Any], run_dir: Path) -> list[str]:
    """Record the finished run in every tracker; what each wrote, one line each."""
    return [TRACKERS.get(t.name)(t, report, Path(run_dir)) for t in trackers]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _quiet(lat: Any) -> float | None:
    """A latency record's quiet figure (median where it has none)."""
    if not isinstance(lat, Mapping):
        return _num(lat)
    return _num(lat.get("quiet", lat.get("median")))


def step_series(report: Mapping[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """Per step, the scalars both trackers plot (missing figures left out)."""
    metric = str((report.get("metric") or {}).get("name") or "accuracy")
    rows = []
    for i, s in enumerate(report.get("steps") or [], start=1):
        vals = {"latency_ms": _quiet(s.get("measured_latency_ms")), "predicted_latency_ms": _num(s.get("predicted_latency_ms")),
                metric: _num(s.get("accuracy")), "flops": _num(s.get("flops")), "params": _num(s.get("params"))}
        rows.append((int(s.get("step") or i), {k: v for k, v in vals.items() if v is not None}))
    return rows


def summary(report: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The run's figures (baseline and final) and its settings, flat."""
    metric = str((report.get("metric") or {}).get("name") or "accuracy")
    figures: dict[str, float] = {}
    for side in ("baseline", "final"):
        d = report.get(side) or {}
        for key, val in ((metric, _num(d.get("accuracy"))), ("latency_ms", _quiet(d.get("latency_ms"))),
                         ("flops", _num(d.get("flops"))), ("params", _num(d.get("params"))),
                         (f"deployed_{metric}", _num((d.get("deployed") or {}).get("accuracy")))):
            if val is not None:
                figures[f"{side}/{key}"] = val
    figures["met_budget"] = 1.0 if report.get("met_budget") else 0.0
    budget, target = report.get("budget") or {}, report.get("target") or {}
    params = {"method": str((report.get("method") or {}).get("name")), "target": str(target.get("name")),
              "precision": str(target.get("precision", "fp32")), "budget_kind": str(budget.get("kind")),
              "budget_value": str(budget.get("value"))}
    return figures, params


def _widths(report: Mapping[str, Any]) -> dict[str, float]:
    return {f"widths/{g['group']}": float(g["channels_after"]) for g in report.get("layers") or []
            if isinstance(g, Mapping) and _num(g.get("channels_after")) is not None}


def _run_name(run_dir: Path) -> str:
    return run_dir.resolve().name


@TRACKERS.register("tensorboard", "TensorBoard event files (torch.utils.tensorboard) under DIR/<run name>")
def _tensorboard(t: Tracker, report: Mapping[str, Any], run_dir: Path) -> str:
    from torch.utils.tensorboard import SummaryWriter

    logdir = Path(str(t.where)) / _run_name(run_dir)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for step, vals in step_series(report):
            for k, v in vals.items():
                writer.add_scalar(f"steps/{k}", v, step)
        figures, params = summary(report)
        for k, v in {**figures, **_widths(report)}.items():
            writer.add_scalar(k, v, 0)
        writer.add_text("settings", "\n".join(f"- {k}: {v}" for k, v in params.items()))
        md = run_dir / "report.md"
        if md.is_file():
            writer.add_text("report", md.read_text())
    finally:
        writer.close()
    return f"tensorboard: {logdir}"


@TRACKERS.register("mlflow", "an MLflow run (local file store ./mlruns unless mlflow:URI)")
def _mlflow(t: Tracker, report: Mapping[str, Any], run_dir: Path) -> str:
    import mlflow

    # MLflow's local file store (./mlruns unless the URI or MLFLOW_TRACKING_URI names another
    # store): no server and no database package. MLflow 3 keeps that store in maintenance mode
    # and refuses it unless told it is wanted.
    uri = t.where or os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_name=_run_name(run_dir)) as run:
        figures, params = summary(report)
        mlflow.log_params(params)
        for step, vals in step_series(report):
            mlflow.log_metrics({f"step_{k}": v for k, v in vals.items()}, step=step)
        mlflow.log_metrics({k.replace("/", "_"): v for k, v in {**figures, **_widths(report)}.items()})
        for name in ("report.json", "report.md", "report.html"):
            if (run_dir / name).is_file():
                mlflow.log_artifact(str(run_dir / name))
        run_id = run.info.run_id
    return f"mlflow: run {run_id} at {mlflow.get_tracking_uri()}"
