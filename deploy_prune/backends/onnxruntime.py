"""ONNX Runtime on the CPU: threads pinned to the target's count, sequential execution."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np

from deploy_prune.backends import BACKENDS, Feed
from deploy_prune.config import Target
from deploy_prune.errors import UserError
from deploy_prune.io import cpu_model


class OrtSession:
    def __init__(self, sess: object) -> None:
        self.sess = sess
        self.inputs: list[tuple[str, list[int | str]]] = [
            (i.name, [d if isinstance(d, int) else str(d) for d in i.shape]) for i in sess.get_inputs()  # type: ignore[attr-defined]
        ]

    def run(self, feed: Feed) -> list[np.ndarray]:
        return self.sess.run(None, feed)  # type: ignore[attr-defined,no-any-return]

    def time_once(self, feed: Feed) -> float:
        t0 = time.perf_counter_ns()
        self.sess.run(None, feed)  # type: ignore[attr-defined]
        return (time.perf_counter_ns() - t0) / 1e6


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
        return f"{cpu_model()} ({target.resolved_threads()} threads)"

    def load(self, model: Path | bytes, target: Target) -> OrtSession:
        import onnxruntime as ort

        if target.device != "cpu":
            raise UserError(f"backend onnxruntime here runs on device 'cpu', not {target.device!r}; fix the target's device")
        so = ort.SessionOptions()
        # Pin the thread count so measurements are comparable and recorded; one inter-op
        # thread because a single image's graph has no useful parallel branches.
        so.intra_op_num_threads = target.resolved_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        src = model if isinstance(model, bytes) else str(model)
        try:
            sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for bad models
            raise UserError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None
        return OrtSession(sess)


BACKENDS.register("onnxruntime", "ONNX Runtime, CPU execution provider")(OnnxRuntimeBackend())
