"""``deploy-prune benchmark``: time ONNX models on one or more targets, interleaved."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    """
    if not models or not targets:
        raise UserError("benchmark needs at least one model and one target")
    for path in models.values():
        if not Path(path).is_file():
            raise UserError(f"ONNX model {str(path)!r} not found")
    proto = protocol or targets[0].protocol
    rows: list[dict[str, Any]] = []
    timers: dict[str, Any] = {}
    stats: dict[str, Stats] = {}
    for target in targets:
        m = measurer_for(target)
        info = m.info()
        keys = {f"{label}@{target.name}": path for label, path in models.items()}
        if isinstance(m, LocalMeasurer):
            timers.update({key: m.timer(key, path) for key, path in keys.items()})
        else:
            stats.update(m.time(keys, proto))
        for key, path in keys.items():
            rows.append({"key": key, "model": str(path), "target": target.name, **info, "input_shape": m.shapes.get(key)})
    if timers:
        stats.update(measure(timers, proto, on_round=on_round))
    for row in rows:
        row["latency_ms"] = stats[str(row.pop("key"))].as_dict()
    return {"protocol": proto.__dict__, "results": rows, "provenance": provenance()}
