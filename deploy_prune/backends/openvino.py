"""OpenVINO: an ONNX model compiled by ``ov.Core`` for the target's device, run synchronously.

The target's thread count becomes ``INFERENCE_NUM_THREADS``, one stream (``NUM_STREAMS``: a
single request at a time is what a latency budget measures), the ``LATENCY`` performance hint
and ``INFERENCE_PRECISION_HINT`` from the target's precision (fp32 by default, so the CPU plugin
does not silently run bf16 on CPUs that have it). ``options:`` in the target YAML pass any other
OpenVINO property through. With ``per_layer=True`` the model is compiled with ``PERF_COUNT``
and ``layer_ms(feed, runs)`` returns OpenVINO's own per-node times, interquartile mean over the runs.

``time_once`` times what the runtime executes: the feed is bound once as zero-copy input tensors
and each timed call is ``infer`` with shared inputs and outputs, so no per-call input copy or
output dict is counted. Against ``benchmark_app -api sync`` at the same settings, a MobileNetV2
at 32x32 measured 1.06x its figure this way and 1.18x through ``infer(feed)``; ResNet-20 1.02x and
1.09x (``benchmarks/results/backend_vs_native.md``).
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from deploy_prune.backends import BACKENDS, Feed, center_by_node, check_feedable, conv_pool_graph
from deploy_prune.config import Target
from deploy_prune.errors import UserError

# int8 comes from the model's QDQ pairs (quantize.deploy_onnx); what is left unquantized runs f32.
PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}


def _dtype_name(t: Any) -> str:
    """An OpenVINO element type as numpy names it (``float32``, ``int64``), else OpenVINO's name."""
    if t.get_type_name() == "bf16":  # to_dtype() says float16
        return "bfloat16"
    try:
        return str(np.dtype(t.to_dtype()).name)
    except Exception:  # no numpy type
        return str(t.get_type_name())


class OvSession:
    def __init__(self, compiled: Any, per_layer: bool = False) -> None:
        self.compiled = compiled
        self.per_layer = per_layer
        self.request = compiled.create_infer_request()
        self._bound: dict[str, np.ndarray] = {}  # the caller's arrays last bound (identity)
        self._keep: dict[str, np.ndarray] = {}  # the contiguous arrays the input tensors share memory with
        self.inputs: list[tuple[str, list[int | str]]] = [
            (i.get_any_name(), [d.get_length() if d.is_static else str(d) for d in i.get_partial_shape()])
            for i in compiled.inputs
        ]
        for i in compiled.inputs:
            check_feedable(i.get_any_name(), _dtype_name(i.get_element_type()))
        self.input_dtypes: dict[str, np.dtype] = {
            i.get_any_name(): np.dtype(i.get_element_type().to_dtype()) for i in compiled.inputs
            if i.get_element_type().to_dtype() in (np.uint8, np.int8)
        }

    def run(self, feed: Feed) -> list[np.ndarray]:
        # Bound, never copied in: a copy would write into the memory a bound tensor shares.
        self._bind(feed)
        self.request.infer(None, share_inputs=True)
        return [np.array(self.request.get_output_tensor(i).data) for i in range(len(self.compiled.outputs))]

    def _bind(self, feed: Feed) -> None:
        """Set the request's input tensors to ``feed``'s arrays, sharing their memory (once per feed)."""
        if self._bound.keys() == feed.keys() and all(self._bound[k] is v for k, v in feed.items()):
            return
        import openvino as ov

        arrays = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        for name, arr in arrays.items():
            self.request.set_tensor(name, ov.Tensor(arr, shared_memory=True))
        # Keyed by the caller's arrays (identity), holding the contiguous ones the tensors share.
        self._bound = dict(feed)
        self._keep = arrays

    def time_once(self, feed: Feed) -> float:
        self._bind(feed)
        t0 = time.perf_counter_ns()
        self.request.infer(None, share_inputs=True, share_outputs=True)
        return (time.perf_counter_ns() - t0) / 1e6

    def layer_ms(self, feed: Feed, runs: int = 20) -> dict[str, float]:
        """OpenVINO's per-node times in ms, interquartile mean over ``runs`` runs after as many untimed (nodes
        it executed; fused ones are folded into the node that ran them)."""
        if not self.per_layer:
            raise UserError("load the model with per_layer=True to read OpenVINO's per-node times (PERF_COUNT)")
        per_run = []
        for i in range(2 * runs):
            self._bind(feed)
            self.request.infer(None, share_inputs=True, share_outputs=True)
            if i >= runs:
                per_run.append({("Reorder:" if p.node_type == "Reorder" else "") + p.node_name: p.real_time.total_seconds() * 1e3
                                for p in self.request.profiling_info if str(p.status).endswith("EXECUTED")})
        return center_by_node(per_run)


def layout_block(layout: str) -> int:
    """The channel block of a oneDNN layout tag: ``aBcd16b`` (nChw16c) is 16; ``abcd`` (plain)
    and ``acdb`` (channels-last) are 1."""
    m = re.fullmatch(r"aB[a-z]*?(\d+)b", layout)
    return int(m.group(1)) if m else 1


class OpenVinoBackend:
    """OpenVINO runtime (CPU plugin here; GPU/NPU where the machine has them)."""

    name = "openvino"
    extra = "openvino"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("openvino") is None:
            return False, "openvino is not installed"
        import openvino as ov

        return True, "devices: " + ", ".join(ov.Core().available_devices)

    def versions(self) -> dict[str, str]:
        import openvino as ov

        return {"openvino": ov.__version__}

    def _device(self, core: Any, target: Target) -> str:
        dev = target.device.upper()
        have = core.available_devices
        if not any(d == dev or d.startswith(dev + ".") for d in have):
            raise UserError(f"OpenVINO has no device {target.device!r} on this machine (it has: {', '.join(have)}); "
                            "fix the target's device")
        return dev

    def device_string(self, target: Target) -> str:
        import openvino as ov

        core = ov.Core()
        dev = self._device(core, target)
        name = core.get_property(dev, "FULL_DEVICE_NAME")
        if dev == "CPU":  # the name alone can cover CPUs with other vector units (io.cpu_id)
            from deploy_prune.io import cpu_isa

            name = f"{name} [{cpu_isa()}]" if cpu_isa() else name
        return f"{name} ({target.resolved_threads()} threads)"

    def config(self, target: Target, per_layer: bool = False) -> dict[str, Any]:
        if target.precision not in PRECISION:
            raise UserError(f"target precision {target.precision!r} is not one OpenVINO takes here; use one of {', '.join(PRECISION)}")
        cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                               "INFERENCE_PRECISION_HINT": PRECISION[target.precision]}
        if target.device == "cpu":
            cfg["INFERENCE_NUM_THREADS"] = target.resolved_threads()
        if per_layer:
            cfg["PERF_COUNT"] = True
        cfg.update(target.options.get("openvino", {}) if isinstance(target.options.get("openvino"), dict) else {})
        return cfg

    def channel_block(self, target: Target) -> int:
        """The block of the layout the plugin gives a conv's output (oneDNN's ``aBcd16b`` is
        nChw16c: 16), read from the compiled model of a 32-channel conv and pool; 1 for a plain
        or channels-last layout."""
        layouts = []
        for op in self.load(conv_pool_graph(32), target).compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if "layerType" in rt and "outputLayouts" in rt and str(rt["layerType"].astype(str)) == "Convolution":
                layouts.append(str(rt["outputLayouts"].astype(str)))
        return max((layout_block(lay) for lay in layouts), default=1)

    def load(self, model: Path | bytes, target: Target, per_layer: bool = False) -> OvSession:
        import openvino as ov

        core = ov.Core()
        dev = self._device(core, target)
        try:
            net = core.read_model(model if isinstance(model, bytes) else str(model))
        except Exception as e:
            raise UserError(f"openvino cannot read the model: {_reason(e)}") from None
        try:
            compiled = core.compile_model(net, dev, self.config(target, per_layer))
        except UserError:
            raise
        except Exception as e:  # the message names the op the plugin cannot compile
            raise UserError(f"openvino cannot compile the model for {dev}: {_reason(e)}") from None
        return OvSession(compiled, per_layer)


def _reason(e: Exception) -> str:
    """OpenVINO's own reason from one of its exceptions: the last line that is not a source
    location (its first line is "Exception from src/...cpp:N:"), at most 300 characters."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("Exception from src", "Check '", "["))]
    return (said or lines or [type(e).__name__])[-1][:300]


BACKENDS.register("openvino", "OpenVINO runtime (CPU plugin; GPU/NPU where present)")(OpenVinoBackend())
