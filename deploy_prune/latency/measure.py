"""Where measurements happen: on this machine through a backend, or on a device through the agent.

Every latency figure in deploy-prune (profile entries, whole-model calibration and validation,
benchmark, compress) goes through a ``Measurer``: ``measurer_for(target)`` returns a local one,
or, when the target YAML has ``agent: {url, token_env}``, one that sends the ONNX bytes to
``deploy-prune agent serve`` on the device. Both time with the same protocol code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np

from deploy_prune.backends import Feed, Session, get_backend, layer_times
from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.latency.timing import Stats, measure

ModelSource = bytes | str | Path


def feed_for(session: Session, target: Target, seed: int = 0) -> Feed:
    """Fixed random inputs for every input of ``session``: float32 standard normal, or uniform
    over the range of an integer input (``session.input_dtypes``: a quantized layer's).

    Static dims are kept as the model declares them; dynamic ones come from the target
    (``batch`` for the first dim, ``input_shape`` for the rest of the first input).
    """
    rng = np.random.default_rng(seed)
    feed: Feed = {}
    for i, (name, shape) in enumerate(session.inputs):
        want: list[int | str] = list(shape)
        if i == 0 and want and not isinstance(want[0], int):
            want[0] = target.batch
        if i == 0 and target.input_shape and any(not isinstance(d, int) for d in want[1:]):
            want = [want[0], *target.input_shape]
        if not all(isinstance(d, int) and d > 0 for d in want):
            raise UserError(f"model input {name!r} has dynamic dims {shape}; set input_shape (and batch) in the target YAML")
        dims, dtype = [int(d) for d in want], getattr(session, "input_dtypes", {}).get(name)
        if dtype is None:
            feed[name] = rng.standard_normal(dims, dtype=np.float32)
        else:
            info = np.iinfo(dtype)
            feed[name] = rng.integers(info.min, info.max, dims, dtype=dtype, endpoint=True)
    return feed


class Measurer(TypingProtocol):
    target: Target
    shapes: dict[str, list[int]]  # first input's shape of every model timed so far, by key

    def info(self) -> dict[str, Any]:
        """Backend, its versions, device string and threads, and where it runs."""
        ...

    def time(
        self, models: Mapping[str, ModelSource], protocol: Protocol | None = None, on_round: Callable[[int], None] | None = None
    ) -> dict[str, Stats]:
        """Time every model with ``protocol`` (default: the target's), interleaved round by round."""
        ...

    def layer_times(self, models: Mapping[str, ModelSource], runs: int = 20) -> dict[str, dict[str, float]]:
        """The backend's own per-node times of every model (ms, interquartile mean over ``runs`` runs)."""
        ...


class LocalMeasurer:
    """Measures on this machine with the target's backend."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.backend = get_backend(target.backend)
        self.shapes: dict[str, list[int]] = {}

    def info(self) -> dict[str, Any]:
        return {
            "where": "local", "backend": self.backend.name, "backend_versions": self.backend.versions(),
            "device": self.backend.device_string(self.target), "threads": self.target.resolved_threads(),
            "precision": self.target.precision,
        }

    def deployed(self, model: ModelSource) -> bytes | Path:
        """What the target runs for ``model``: the fp32 ONNX itself, or its quantized artefact
        (``quantize.deploy_cached``: calibrated on random batches, which is all timing needs)."""
        if isinstance(model, str):
            model = Path(model)
        if isinstance(model, Path) and not model.is_file():
            raise UserError(f"ONNX model {str(model)!r} not found")
        if self.target.precision == "fp32":
            return model
        from deploy_prune.quantize import deploy_cached

        return deploy_cached(model.read_bytes() if isinstance(model, Path) else model, self.target)

    def load(self, model: ModelSource) -> Session:
        return self.backend.load(self.deployed(model), self.target)

    def timer(self, key: str, model: ModelSource) -> Callable[[], float]:
        """Load ``model`` and return a function that times one run (for interleaving by the caller)."""
        sess = self.load(model)
        feed = feed_for(sess, self.target)
        self.shapes[key] = list(next(iter(feed.values())).shape)
        return lambda: sess.time_once(feed)

    def time(
        self, models: Mapping[str, ModelSource], protocol: Protocol | None = None, on_round: Callable[[int], None] | None = None
    ) -> dict[str, Stats]:
        timers = {key: self.timer(key, src) for key, src in models.items()}
        return measure(timers, protocol or self.target.protocol, on_round=on_round)

    def layer_times(self, models: Mapping[str, ModelSource], runs: int = 20) -> dict[str, dict[str, float]]:
        out = {}
        for key, src in models.items():
            sess = self.backend.load(self.deployed(src), self.target, per_layer=True)
            out[key] = layer_times(sess, feed_for(sess, self.target), runs)
        return out


def measurer_for(target: Target) -> Measurer:
    """A remote measurer when the target names an agent, else a local one."""
    if target.agent:
        from deploy_prune.latency.remote import AgentMeasurer

        return AgentMeasurer(target)
    return LocalMeasurer(target)
