"""Inference backends behind one protocol, registered by name.

A backend loads an ONNX model into a ``Session`` for a ``Target``; a session runs a feed (input
name -> array) and times one run in milliseconds (wall clock on the CPU; GPU backends time with
device events). Timing statistics are computed by ``deploy_prune.latency`` for every backend
alike, locally or inside the remote agent.

Per-layer timings are optional: a session loaded with ``per_layer=True`` may offer
``layer_ms(feed, runs)``, the typical time of each node over ``runs`` runs (``center_by_node``), from the backend's own
counters (ONNX Runtime's profiler, OpenVINO's ``PERF_COUNT``, TensorRT's ``IProfiler``, hooks
in eager torch). Node names are the backend's; fused nodes carry the time of what they fused;
layout conversions the backend inserts are named ``Reorder...`` (ORT's own names; OpenVINO's
and TensorRT's get the prefix), so that LUT entries can leave them out.
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
    # Inputs that are not float32, by name (a quantized layer's uint8 input); feeds follow it.
    input_dtypes: dict[str, np.dtype]

    def run(self, feed: Feed) -> list[np.ndarray]: ...

    def time_once(self, feed: Feed) -> float: ...


class LayerTimed(Protocol):
    """A session that reports per-layer times (loaded with ``per_layer=True``)."""

    def layer_ms(self, feed: Feed, runs: int = 20) -> dict[str, float]: ...


class Backend(Protocol):
    name: str
    extra: str  # pip extra that installs it

    def available(self) -> tuple[bool, str]: ...

    def versions(self) -> dict[str, str]: ...

    def device_string(self, target: Target) -> str: ...

    def load(self, model: Path | bytes, target: Target, per_layer: bool = False) -> Session: ...


class ChannelBlocked(Protocol):
    """A backend whose CPU kernels keep activations in a channel-blocked layout (ONNX Runtime's
    NCHWc, oneDNN's nChw8c/nChw16c) and can say the block it uses on this machine."""

    def channel_block(self, target: Target) -> int: ...


BACKENDS: Registry[Backend] = Registry("backend")

# What a feed (``latency.measure.feed_for``) holds: float32 images, or the uint8/int8 input of a
# quantized layer; the remote agent feeds the same. Other inputs (token ids, masks, shapes) are
# refused rather than fed zeros or noise: what they should hold decides what the model computes.
FEED_DTYPES = ("float32", "uint8", "int8")


def check_feedable(name: str, dtype: str, allowed: tuple[str, ...] = FEED_DTYPES, who: str = "deploy-prune") -> None:
    """A ``UserError`` naming input ``name`` when its element type ``dtype`` (numpy's name:
    ``float32``, ``int64``, ...) is not one ``who`` feeds."""
    if dtype in allowed:
        return
    also = " or uint8/int8 for a quantized layer's input" if "uint8" in allowed else ""
    raise UserError(f"model input {name!r} is {dtype}; {who} times models with float inputs (float32{also}), "
                    "not other types: export the model with a float32 input")


def onnx_dtype_name(value: Any) -> str:
    """An ONNX ``ValueInfoProto``'s element type as numpy names it (``float32``, ``int64``), else
    ONNX's name in lower case (``bfloat16``, ``string``) or what the value is (``a sequence_type``)."""
    from onnx import TensorProto, helper

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return f"a {kind or 'value of no type'}"
    elem = value.type.tensor_type.elem_type
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name)
    except Exception:  # no numpy type
        return TensorProto.DataType.Name(elem).lower() if elem in TensorProto.DataType.values() else str(elem)


def check_onnx_inputs(path: str | Path) -> None:
    """``check_feedable`` for every input of the ONNX file at ``path``, before any backend (or
    quantizer) sees it; a file that does not parse is left to the backend to report."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:
        return
    weights = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.name not in weights:
            check_feedable(value.name, onnx_dtype_name(value))


def conv_pool_graph(channels: int) -> bytes:
    """Conv 1x1 (channels -> channels) then MaxPool 2x2 on 8x8 pixels: the smallest graph whose
    optimized form shows whether a pool at this width stays in ORT's blocked (NCHWc) layout."""
    from onnx import TensorProto, helper, numpy_helper

    c = channels
    w = numpy_helper.from_array(np.full((c, c, 1, 1), 0.1, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    g = helper.make_graph(nodes, "conv_pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def with_boundary(proto: Any, drop: set[int], inputs: list[Any], outputs: list[Any]) -> bytes:
    """``proto`` (an ONNX ``ModelProto``, changed in place) without the nodes at indices ``drop``
    and with ``inputs`` and ``outputs`` as its graph's boundary, serialized and checked. Used to
    time a one-layer graph as its layer runs inside a model: boundary nodes that a whole model
    runs once (layout transposes, int8 quantize/dequantize) are cut off, and the tensors they made
    or read become the graph's inputs and outputs."""
    import onnx

    g = proto.graph
    nodes = [n for i, n in enumerate(g.node) if i not in drop]
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def channel_block(target: Target) -> tuple[int, str]:
    """``channel_multiple: auto``: the channel block of the target backend's layout on this machine,
    and where the number came from.

    Why prune in those units: a width between two multiples of the block computes as the next
    multiple up (the kernels pad), and an op the blocked layout cannot take at that width runs in
    the plain layout behind reorders. On ONNX Runtime with AVX-512, ResNet-18@224 pruned to
    multiples of 8 gained a MaxPool and two Add + Relu outside the blocked layout and seven
    reorders, up to 10 % of its latency (benchmarks/results/layout_transitions.md), which no one-layer
    entry of the LUT sees (multiples of 16: none). 1 where the backend is missing or has no blocked layout."""
    backend = BACKENDS.get(target.backend)
    ok, why = backend.available()
    if not ok:
        return 1, f"auto: 1 ({target.backend} not usable here: {why})"
    fn = getattr(backend, "channel_block", None)
    if fn is None:
        return 1, f"auto: 1 ({target.backend} has no channel-blocked layout)"
    block = max(1, int(fn(target)))
    if block == 1:
        return 1, f"auto: 1 ({target.backend} keeps no channel-blocked layout on this machine)"
    return block, f"auto: {block} ({target.backend}'s channel block on this machine)"


def get_backend(name: str) -> Backend:
    """The registered backend, or a clear error naming the extra to install."""
    backend = BACKENDS.get(name)
    ok, why = backend.available()
    if not ok:
        raise UserError(f"backend {name!r} is not usable here: {why}; install it with pip install 'deploy-prune[{backend.extra}]'")
    return backend


def layer_times(session: Session, feed: Feed, runs: int = 20) -> dict[str, float]:
    """Per-node ms (interquartile mean over runs) from the backend's own counters, or a clear error where it has none."""
    fn = getattr(session, "layer_ms", None)
    if fn is None:
        raise UserError(f"{type(session).__name__} has no per-layer counters; load it with per_layer=True on a backend that has them")
    return fn(feed, runs)  # type: ignore[no-any-return]


def interquartile_mean(values: list[float]) -> float:
    """The mean of the middle half: as robust to stray runs as the median and, unlike it, finer
    than the counters' resolution (ONNX Runtime and OpenVINO report whole microseconds, and a
    layer of MobileNetV2 at 32x32 takes one or two)."""
    v = np.sort(np.asarray(values, dtype=float))
    q = len(v) // 4
    return float(v[q:len(v) - q].mean())


def center_by_node(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-node interquartile mean over runs (a node missing from a run counts as absent, not zero)."""
    names = {n for r in runs for n in r}
    return {n: interquartile_mean([r[n] for r in runs if n in r]) for n in sorted(names)}


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
from deploy_prune.backends import pytorch as _torch  # noqa: E402,F401
from deploy_prune.backends import tensorrt as _trt  # noqa: E402,F401
