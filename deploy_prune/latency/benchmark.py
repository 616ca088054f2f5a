"""``deploy-prune benchmark``: time ONNX models on one or more targets, interleaved."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy_prune.backends import check_onnx_inputs
from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.io import provenance
from deploy_prune.latency.measure import LocalMeasurer, measurer_for
from deploy_prune.latency.timing import Stats, measure


def benchmark(
    models: Mapping[str, str | Path],
    targets: list[Target],
    protocol: Protocol | None = None,
    on_round: Any = None,
) -> dict[str, Any]:
    """Measure every model on every target with the targets' protocol (or ``protocol``).

    All (model, target) pairs measured on this machine are interleaved round by round so that
    they share the same machine conditions; their ratios are therefore meaningful within one
    call. Targets reached through an agent are measured there, one target per request.

    Each row has ``latency_ms`` (``Stats.as_dict()``: median, p90, p95, p99, min, ...), the
    ``batch`` the model was fed and ``throughput_per_s``, inferences (samples) per second at
    that batch from the median: ``batch * 1000 / median``.

    Models are fed float32 inputs (uint8/int8 for a quantized layer's); a model with another
    input type (int64 token ids, a bool mask) is refused naming the model and the input
    (``backends.check_feedable``).
    """
    if not models or not targets:
        raise UserError("benchmark needs at least one model and one target")
    for path in models.values():
        if not Path(path).is_file():
            raise UserError(f"ONNX model {str(path)!r} not found")
        try:
            check_onnx_inputs(path)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    proto = protocol or targets[0].protocol
    rows: list[dict[str, Any]] = []
    timers: dict[str, Any] = {}
    stats: dict[str, Stats] = {}
    for target in targets:
        m = measurer_for(target)
        info = m.info()
        keys = {f"{label}@{target.name}": path for label, path in models.items()}
        if isinstance(m, LocalMeasurer):
            for key, path in keys.items():
                try:
                    timers[key] = m.timer(key, path)
                except UserError as e:  # which of the models it is (an input it cannot feed, a graph it cannot load)
                    raise type(e)(f"{path}: {e}") from None
        else:
            stats.update(m.time(keys, proto))
        for key, path in keys.items():
            rows.append({"key": key, "model": str(path), "target": target.name, **info, "input_shape": m.shapes.get(key)})
    if timers:
        stats.update(measure(timers, proto, on_round=on_round))
    for row in rows:
        st = stats[str(row.pop("key"))]
        row["latency_ms"] = st.as_dict()
        row["batch"] = row["input_shape"][0] if row["input_shape"] else None
        row["throughput_per_s"] = throughput(row["batch"], st.median)
    return {"protocol": proto.__dict__, "results": rows, "provenance": provenance()}


def throughput(batch: int | None, median_ms: float) -> float | None:
    """Inferences per second at ``batch``, one batch every ``median_ms``; None when either is unknown."""
    if not batch or not median_ms > 0:
        return None
    return round(batch * 1000.0 / median_ms, 3)
