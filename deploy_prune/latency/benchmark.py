"""``deploy-prune benchmark``: time ONNX models on one or more targets, interleaved."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deploy_prune.backends import get_backend
from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.export import onnx_input_shape
from deploy_prune.io import provenance
from deploy_prune.latency.timing import measure


def input_for(onnx_path: str | Path, target: Target) -> np.ndarray:
    """A fixed random input of the shape the target asks for, or the model's static shape."""
    shape = onnx_input_shape(onnx_path)
    if target.input_shape:
        shape = [target.batch, *target.input_shape]
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(f"{str(onnx_path)!r} has dynamic input dims {shape}; set input_shape in the target YAML")
    return np.random.default_rng(0).standard_normal([int(d) for d in shape], dtype=np.float32)


def benchmark(
    models: Mapping[str, str | Path],
    targets: list[Target],
    protocol: Protocol | None = None,
    on_round: Any = None,
) -> dict[str, Any]:
    """Measure every model on every target with the targets' protocol (or ``protocol``).

    All (model, target) pairs are interleaved round by round so that they share the same
    machine conditions; their ratios are therefore meaningful within one call.
    """
    if not models or not targets:
        raise UserError("benchmark needs at least one model and one target")
    for path in models.values():
        if not Path(path).is_file():
            raise UserError(f"ONNX model {str(path)!r} not found")
    proto = protocol or targets[0].protocol
    timers, rows = {}, []
    for target in targets:
        backend = get_backend(target.backend)
        for label, path in models.items():
            x = input_for(path, target)
            sess = backend.load(Path(path), target)
            key = f"{label}@{target.name}"
            timers[key] = (lambda s=sess, x=x: s.time_once(x))
            rows.append({
                "key": key, "model": str(path), "target": target.name, "backend": backend.name,
                "backend_versions": backend.versions(), "device": backend.device_string(target),
                "threads": target.resolved_threads(), "precision": target.precision, "input_shape": list(x.shape),
            })
    stats = measure(timers, proto, on_round=on_round)
    for row in rows:
        row["latency_ms"] = stats[str(row.pop("key"))].as_dict()
    return {"protocol": proto.__dict__, "results": rows, "provenance": provenance()}
