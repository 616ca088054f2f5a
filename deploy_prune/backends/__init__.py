"""Inference backends behind one protocol, registered by name.

A backend loads an ONNX model into a ``Session`` for a ``Target``; a session runs a feed (input
name -> array) and times one run in milliseconds (wall clock by default; GPU backends override
with device events). Timing statistics are computed by ``deploy_prune.latency`` for every
backend alike, locally or inside the remote agent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deploy_prune.config import Target
from deploy_prune.errors import UserError
from deploy_prune.registry import Registry

Feed = dict[str, np.ndarray]


class Session(Protocol):
    inputs: list[tuple[str, list[int | str]]]  # name and shape (ints, or names of dynamic dims)

    def run(self, feed: Feed) -> list[np.ndarray]: ...

    def time_once(self, feed: Feed) -> float: ...


class Backend(Protocol):
    name: str
    extra: str  # pip extra that installs it

    def available(self) -> tuple[bool, str]: ...

    def versions(self) -> dict[str, str]: ...

    def device_string(self, target: Target) -> str: ...

    def load(self, model: Path | bytes, target: Target) -> Session: ...


BACKENDS: Registry[Backend] = Registry("backend")


def get_backend(name: str) -> Backend:
    """The registered backend, or a clear error naming the extra to install."""
    backend = BACKENDS.get(name)
    ok, why = backend.available()
    if not ok:
        raise UserError(f"backend {name!r} is not usable here: {why}; install it with pip install 'deploy-prune[{backend.extra}]'")
    return backend


def backend_status() -> dict[str, dict[str, Any]]:
    """Availability and versions of every registered backend (for ``doctor``)."""
    out = {}
    for name in BACKENDS.names():
        b = BACKENDS.get(name)
        ok, why = b.available()
        out[name] = {"available": ok, "detail": why, "versions": b.versions() if ok else {}}
    return out


# Registration happens on import.
from deploy_prune.backends import onnxruntime as _ort  # noqa: E402,F401
from deploy_prune.backends import openvino as _ov  # noqa: E402,F401
