"""ONNX Runtime on the CPU: threads pinned to the target's count, sequential execution.

Per-layer times come from ORT's own profiler: ``layer_ms`` opens a second session with
``enable_profiling`` (so the timed session is never slowed by it), runs the feed, and reads each
node's ``*_kernel_time`` events from the trace ORT writes.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploy_prune.backends import BACKENDS, Feed, center_by_node, check_feedable, conv_pool_graph, with_boundary
from deploy_prune.config import Target
from deploy_prune.errors import UserError
from deploy_prune.io import cpu_id

ORT_DTYPES = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8}  # non-float inputs a feed must match
ORT_NAMES = {"float": "float32", "double": "float64"}  # ORT's element type names that are not numpy's


def _dtype_name(ort_type: str) -> str:
    """``tensor(int64)`` -> ``int64``, ``tensor(float)`` -> ``float32``."""
    inner = ort_type[len("tensor("):-1] if ort_type.startswith("tensor(") and ort_type.endswith(")") else ort_type
    return ORT_NAMES.get(inner, inner)


class OrtSession:
    def __init__(self, sess: object, reopen: Callable[[Any], Any] | None = None) -> None:
        self.sess = sess
        self._reopen = reopen  # builds a session with extra options (profiling), for layer_ms
        self.inputs: list[tuple[str, list[int | str]]] = [
            (i.name, [d if isinstance(d, int) else str(d) for d in i.shape]) for i in sess.get_inputs()  # type: ignore[attr-defined]
        ]
        for i in sess.get_inputs():  # type: ignore[attr-defined]
            check_feedable(i.name, _dtype_name(i.type))
        self.input_dtypes: dict[str, np.dtype] = {
            i.name: np.dtype(ORT_DTYPES[i.type]) for i in sess.get_inputs() if i.type in ORT_DTYPES  # type: ignore[attr-defined]
        }

    def run(self, feed: Feed) -> list[np.ndarray]:
        return self.sess.run(None, feed)  # type: ignore[attr-defined,no-any-return]

    def time_once(self, feed: Feed) -> float:
        t0 = time.perf_counter_ns()
        self.sess.run(None, feed)  # type: ignore[attr-defined]
        return (time.perf_counter_ns() - t0) / 1e6

    def layer_ms(self, feed: Feed, runs: int = 20) -> dict[str, float]:
        """Typical ms (interquartile mean) per graph node over ``runs`` runs (after as many untimed), from ORT's profiler."""
        if self._reopen is None:
            raise UserError("load the model with per_layer=True to read ONNX Runtime's per-node times")
        with tempfile.TemporaryDirectory() as tmp:
            def profiling(so: Any) -> None:
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(tmp) / "ort")

            sess = self._reopen(profiling)
            for _ in range(2 * runs):
                sess.run(None, feed)
            events = json.loads(Path(sess.end_profiling()).read_text())
        seen: dict[str, list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
                seen.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e3)
        per_run = [{n: v[runs + i] for n, v in seen.items() if len(v) > runs + i} for i in range(runs)]
        return center_by_node(per_run)


def optimized_graph(model: bytes) -> Any:
    """The graph ONNX Runtime's CPU provider runs for ``model`` after every optimization (NCHWc
    layout included), as an ``onnx.ModelProto``: which ops it fused, blocked or left plain."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def without_layout_transposes(model: bytes) -> bytes:
    """``model`` as ONNX Runtime runs it, less the layout transposes at its boundary: the
    optimized graph with each ``Transpose`` that reads a graph input or writes a graph output
    removed, those tensors becoming the graph's inputs and outputs (in the layout the kernel
    uses). ORT runs int8 convs as channels-last ``QLinearConv`` kernels, so a one-layer int8
    graph runs Transpose, QLinearConv, Transpose, while inside a whole model consecutive int8
    layers stay channels-last and only the model's own input and output are transposed (which
    the whole-model calibration sees). A graph with no such transposes, or whose input is also
    read untransposed, comes back as given."""
    from onnx import helper

    proto = optimized_graph(model)
    g = proto.graph
    ins, outs = {i.name: i for i in g.input}, {o.name: o for o in g.output}
    drop: set[int] = set()  # node indices (protobuf wrappers are not stable objects to key on)
    new_in, new_out = dict(ins), dict(outs)

    def dims(vi: Any) -> list[int]:
        return [d.dim_value for d in vi.type.tensor_type.shape.dim]

    readers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    for idx, n in enumerate(g.node):
        if n.op_type != "Transpose" or n.domain not in ("", "ai.onnx"):
            continue
        if n.input[0] in ins and readers[n.input[0]] > 1:  # the input also read as it is: keep the graph
            return model
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        if perm is None:
            continue
        if n.input[0] in ins:
            src = ins[n.input[0]]
            d = dims(src)
            new_in.pop(n.input[0])
            new_in[n.output[0]] = helper.make_tensor_value_info(n.output[0], src.type.tensor_type.elem_type, [d[i] for i in perm])
            drop.add(idx)
        elif n.output[0] in outs:
            dst = outs[n.output[0]]
            d = dims(dst)
            inverse = [perm.index(i) for i in range(len(perm))]
            new_out.pop(n.output[0])
            new_out[n.input[0]] = helper.make_tensor_value_info(n.input[0], dst.type.tensor_type.elem_type, [d[i] for i in inverse])
            drop.add(idx)
    if not drop:
        return model
    return with_boundary(proto, drop, list(new_in.values()), list(new_out.values()))


INT8_CHANNEL_STEP = 16


@functools.lru_cache(maxsize=1)
def nchwc_block() -> int:
    """The channel block of ORT's NCHWc layout on this CPU (MLAS: 8 with AVX2, 16 with AVX-512),
    1 where it has none. ORT does not expose it, so ask its optimizer: the smallest width whose
    MaxPool it moves into the blocked layout (pooling needs whole blocks; convs pad instead)."""
    for c in (4, 8, 16, 32):
        if any(n.op_type == "MaxPool" and n.domain == "com.microsoft.nchwc" for n in optimized_graph(conv_pool_graph(c)).graph.node):
            return c
    return 1


class OnnxRuntimeBackend:
    """ONNX Runtime, CPU execution provider."""

    name = "onnxruntime"
    extra = "onnxruntime"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime is not installed"
        return True, "CPUExecutionProvider"

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}

    def device_string(self, target: Target) -> str:
        return f"{cpu_id()} ({target.resolved_threads()} threads)"

    def channel_block(self, target: Target) -> int:
        if target.precision == "int8":
            # QDQ convs run as ORT's int8 kernels, outside the NCHWc layout. Their output channels go
            # 16 at a time: a conv with 24 or 40 outputs times like one with 32 or 48, and one with
            # 8 is slower than one with 16 (benchmarks/results/channel_steps_cpu-ort-int8-1t.md, on
            # AVX-512 VNNI). A group's width is one conv's outputs, so groups keep multiples of 16.
            return INT8_CHANNEL_STEP
        return nchwc_block()

    def load(self, model: Path | bytes, target: Target, per_layer: bool = False) -> OrtSession:
        import onnxruntime as ort

        if target.device != "cpu":
            raise UserError(f"backend onnxruntime here runs on device 'cpu', not {target.device!r}; fix the target's device")
        if target.precision not in ("fp32", "int8"):
            raise UserError(f"backend onnxruntime here runs fp32 and int8 (QDQ) models, not precision "
                            f"{target.precision!r}; set precision: fp32 or int8 in the target")
        # An int8 target's model arrives quantized (QDQ) from quantize.deploy_onnx, which the
        # measurer applies; the session runs the graph it is given.
        src = model if isinstance(model, bytes) else str(model)

        def open_session(extra: Callable[[Any], None] | None = None) -> Any:
            so = ort.SessionOptions()
            # Pin the thread count so measurements are comparable and recorded; one inter-op
            # thread because a single image's graph has no useful parallel branches.
            so.intra_op_num_threads = target.resolved_threads()
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            if extra is not None:
                extra(so)
            try:
                return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own exception types for bad models
                raise UserError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None

        return OrtSession(open_session(), open_session if per_layer else None)


BACKENDS.register("onnxruntime", "ONNX Runtime, CPU execution provider")(OnnxRuntimeBackend())
