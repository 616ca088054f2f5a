"""torch: the ONNX model run by PyTorch, eager or ``torch.compile``, on the CPU or a CUDA GPU.

This backend exists to measure GPU latency where TensorRT is not installed (and to compare
PyTorch's kernels with the inference runtimes on the CPU). Every other part of deploy-prune
hands backends ONNX, so the model is converted back to a torch module with onnx2torch, the
field's converter, rather than carried as a second artefact. Two shims, both semantics-preserving,
make our exports convert: ``Reshape(allowzero=1)`` becomes ``allowzero=0`` when the shape is a
constant without zeros (the two then mean the same), and a model onnx2torch cannot convert at its
opset is converted to opset 17 first (onnx2torch lacks e.g. ReduceMean-18). For ``torch.compile``
reshapes to a constant shape become plain ``torch.reshape`` calls in the FX graph, because
dynamo cannot trace onnx2torch's tensor-valued shape.

Target settings: ``device`` ``cpu``, ``cuda`` or ``cuda:N``; ``precision`` fp32, fp16 (CUDA only)
or bf16; ``threads`` pins ``torch.set_num_threads`` around each timed run on the CPU (restored
after, outside the timed region, because training in the same process must keep its threads).
``options: {torch: {compile: true, compile_mode: max-autotune, cudnn_benchmark: true}}``.

Timing: wall clock around the call on the CPU; on CUDA, events recorded on the current stream
around the call, then a synchronize, so the figure is GPU time of the enqueued work. Inputs are
copied to the device outside the timed region. Per-layer times (eager only) come from forward
hooks on the converted graph's node modules, synchronizing the GPU at each boundary.
"""

from __future__ import annotations

import importlib.util
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploy_prune.backends import BACKENDS, Feed, center_by_node, check_feedable, onnx_dtype_name
from deploy_prune.config import Target
from deploy_prune.errors import UserError

OPTIONS = {"compile": bool, "compile_mode": str, "cudnn_benchmark": bool}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _constant(model: Any, name: str) -> np.ndarray | None:
    """The value of tensor ``name`` when it is an initializer or a Constant node's output."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)  # type: ignore[no-any-return]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)  # type: ignore[no-any-return]
    return None


def to_torch(model: Any) -> torch.fx.GraphModule:
    """An ``onnx.ModelProto`` as a torch module (onnx2torch, with the shims the module doc names)."""
    from onnx import version_converter
    from onnx2torch import convert

    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        for a in list(node.attribute):
            shape = _constant(model, node.input[1])
            if a.name == "allowzero" and a.i == 1 and shape is not None and not (shape == 0).any():
                node.attribute.remove(a)
    try:
        return convert(model)  # type: ignore[no-any-return]
    except NotImplementedError as first:
        try:
            return convert(version_converter.convert_version(model, 17))  # type: ignore[no-any-return]
        except Exception:
            raise UserError(f"backend torch cannot convert the ONNX model: {first}; "
                            "use an onnxruntime or openvino target for this model") from None


def static_reshapes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Turn onnx2torch reshapes to a constant, zero-free shape into ``torch.reshape(x, ints)``."""
    from onnx2torch.node_converters.reshape import OnnxReshape

    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), OnnxReshape):
            continue
        shape_node = node.args[1]
        if getattr(shape_node, "op", None) != "get_attr":
            continue
        shape = [int(v) for v in gm.get_buffer(shape_node.target).tolist()]
        if 0 not in shape:
            node.op, node.target, node.args = "call_function", torch.reshape, (node.args[0], tuple(shape))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class TorchSession:
    def __init__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype, threads: int,
                 inputs: list[tuple[str, list[int | str]]], per_layer: bool) -> None:
        self.module = module
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.inputs = inputs
        self.input_dtypes: dict[str, np.dtype] = {}  # float inputs only: the module casts them to its dtype
        self.per_layer = per_layer
        self._cached: tuple[list[int], list[torch.Tensor]] | None = None

    def _tensors(self, feed: Feed) -> list[torch.Tensor]:
        # The measurer passes the same arrays every run: copy them to the device once.
        key = [id(feed[name]) for name, _ in self.inputs]
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, [torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.device, self.dtype)
                                  for name, _ in self.inputs])
        return self._cached[1]

    def _call(self, xs: list[torch.Tensor]) -> Any:
        with torch.inference_mode():
            return self.module(*xs)

    def run(self, feed: Feed) -> list[np.ndarray]:
        out = self._call(self._tensors(feed))
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.float().cpu().numpy() for o in outs]

    def time_once(self, feed: Feed) -> float:
        xs = self._tensors(feed)
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._call(xs)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        prev = torch.get_num_threads()
        if prev != self.threads:
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter_ns()
        self._call(xs)
        ms = (time.perf_counter_ns() - t0) / 1e6
        if prev != self.threads:
            torch.set_num_threads(prev)
        return ms

    def layer_ms(self, feed: Feed, runs: int = 20) -> dict[str, float]:
        """Typical ms (interquartile mean) per converted node over ``runs`` runs after as many untimed (eager only)."""
        if not self.per_layer:
            raise UserError("load the model with per_layer=True (and compile off) to read per-node times from torch")
        cuda = self.device.type == "cuda"
        current: dict[str, float] = {}
        started: dict[str, float] = {}

        def now() -> float:
            if cuda:
                torch.cuda.synchronize(self.device)
            return time.perf_counter()

        def before(name: str) -> Any:
            return lambda mod, args: started.__setitem__(name, now())

        def after(name: str) -> Any:
            return lambda mod, args, out: current.__setitem__(name, current.get(name, 0.0) + (now() - started[name]) * 1e3)

        handles = []
        for name, mod in self.module.named_children():
            handles += [mod.register_forward_pre_hook(before(name)), mod.register_forward_hook(after(name))]
        prev = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        per_run = []
        try:
            xs = self._tensors(feed)
            for i in range(2 * runs):
                current.clear()
                self._call(xs)
                if i >= runs:
                    per_run.append(dict(current))
        finally:
            torch.set_num_threads(prev)
            for h in handles:
                h.remove()
        return center_by_node(per_run)


class TorchBackend:
    """PyTorch eager or torch.compile, CPU or CUDA."""

    name = "torch"
    extra = "torch"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("onnx2torch") is None:
            return False, "onnx2torch is not installed"
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        return True, "devices: cpu" + "".join(f", cuda:{i} ({n})" for i, n in enumerate(gpus))

    def versions(self) -> dict[str, str]:
        v = {"torch": torch.__version__, "onnx2torch": metadata.version("onnx2torch")}
        if torch.cuda.is_available():
            v["cuda"] = str(torch.version.cuda)
            v["cudnn"] = str(torch.backends.cudnn.version())
        return v

    def _device(self, target: Target) -> torch.device:
        try:
            dev = torch.device(target.device)
        except RuntimeError:
            raise UserError(f"backend torch does not know device {target.device!r}; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"target device {target.device!r} needs a CUDA GPU and torch sees none here; "
                                "use device: cpu or run on a GPU machine")
            if (dev.index or 0) >= torch.cuda.device_count():
                raise UserError(f"target device {target.device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
        elif dev.type != "cpu":
            raise UserError(f"backend torch runs on cpu or cuda, not {target.device!r}; fix the target's device")
        return dev

    def device_string(self, target: Target) -> str:
        from deploy_prune.io import cpu_id

        dev = self._device(target)
        if dev.type == "cuda":
            return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}, {target.precision})"
        return f"{cpu_id()} ({target.resolved_threads()} threads)"

    def settings(self, target: Target) -> dict[str, Any]:
        """The target's ``options.torch``, checked."""
        opts = target.options.get("torch", {}) or {}
        bad = {k for k in opts if k not in OPTIONS or not isinstance(opts[k], OPTIONS[k])}
        if not isinstance(opts, dict) or bad:
            raise UserError(f"target {target.name!r}: bad options.torch key(s) {sorted(bad)}; valid: "
                            + ", ".join(f"{k} ({t.__name__})" for k, t in OPTIONS.items()))
        return opts

    def load(self, model: Path | bytes, target: Target, per_layer: bool = False) -> TorchSession:
        import onnx

        dev = self._device(target)
        opts = self.settings(target)
        if target.precision not in DTYPES:
            raise UserError(f"target precision {target.precision!r} is not one backend torch takes; use one of {', '.join(DTYPES)}")
        if target.precision == "fp16" and dev.type != "cuda":
            raise UserError("precision fp16 with backend torch needs a CUDA device (CPU fp16 kernels are not what a target runs); use fp32 or bf16")
        if per_layer and opts.get("compile"):
            raise UserError("per-layer times need eager torch: drop options.torch.compile for this measurement")
        try:
            proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        except Exception as e:
            raise UserError(f"backend torch cannot read the ONNX model: {str(e).splitlines()[0][:300]}") from None
        init = {i.name for i in proto.graph.initializer}
        for i in proto.graph.input:  # float32 only: the session casts its feed to the precision's dtype
            if i.name not in init:
                check_feedable(i.name, onnx_dtype_name(i), ("float32",), "backend torch")
        inputs: list[tuple[str, list[int | str]]] = [
            (i.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in i.type.tensor_type.shape.dim])
            for i in proto.graph.input if i.name not in init
        ]
        gm = to_torch(proto).to(dev, DTYPES[target.precision]).eval()
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = bool(opts.get("cudnn_benchmark", True))
        module: Any = gm
        if opts.get("compile"):
            module = torch.compile(static_reshapes(gm), mode=opts.get("compile_mode", "default"), dynamic=False)
        return TorchSession(module, dev, DTYPES[target.precision], target.resolved_threads(), inputs, per_layer)


BACKENDS.register("torch", "PyTorch eager or torch.compile on CPU or CUDA (ONNX converted by onnx2torch)")(TorchBackend())
