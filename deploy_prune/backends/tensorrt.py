"""TensorRT 10 on an NVIDIA GPU: the ONNX model built into an engine for exactly the timed shape.

Build: ``trt.OnnxParser`` fills a weakly typed network (``create_network(0)``: explicit batch is
TensorRT 10's only mode, and weak typing is what lets the precision flags below apply), then
``build_serialized_network`` with

- precision ``fp32``: TF32 cleared, so fp32 means IEEE fp32 as on the other backends
  (``options.tensorrt.tf32: true`` restores TensorRT's and trtexec's default of allowing it);
  ``fp16``: ``BuilderFlag.FP16``; ``int8``: ``BuilderFlag.INT8`` plus ``FP16`` so layers without
  an INT8 kernel fall back to fp16 rather than fp32, as a deployed INT8 engine would.
- INT8 is explicit quantization: an int8 target's model reaches the backend as the Q/DQ graph
  that ``deploy_prune.quantize`` made (symmetric int8, calibrated on the user's data for the
  deployed model's metric, on seeded random inputs for timing), and TensorRT builds INT8 layers
  where the Q/DQ nodes say. A graph with no Q/DQ node builds as fp16 under the same flags.
- ``MemoryPoolType.WORKSPACE`` limited to ``options.tensorrt.workspace_mb`` (default 1024);
  ``builder_optimization_level`` 0-5 (TensorRT's default 3).
- With ``per_layer=True``: ``ProfilingVerbosity.DETAILED`` (a separate cached engine).
- Optimization profile: when the first input has a dynamic dimension, min = opt = max =
  ``(target.batch, *input_shape)`` with the model's own static dims kept, so the engine is built
  for exactly the shape that is timed. A dim that cannot be resolved, or a target that contradicts
  a static dim, is a ``UserError``; dynamic dims on further inputs are not supported.

Engine cache: serialized engines live in ``$DEPLOY_PRUNE_CACHE/tensorrt/`` (default
``~/.cache/deploy-prune/tensorrt/``) named by ``engine_key``: sha256 over the ONNX bytes, the build
settings as sorted JSON (``build_settings``), the TensorRT version and the GPU name with its compute
capability, since an engine is only valid for that combination. Files are written to a temporary
file and ``os.replace``d; a file that fails to deserialize is rebuilt and overwritten; an
unwritable cache directory only costs the rebuild next time. ``options.tensorrt.cache: false``
always rebuilds.

Run and time: device memory, the stream and the timing come from torch (a core dependency), not
pycuda or cuda-python. Every I/O tensor is a torch CUDA tensor bound with
``context.set_tensor_address``; work goes to one ``torch.cuda.Stream`` with
``context.execute_async_v3(stream.cuda_stream)``. ``time_once`` records a
``torch.cuda.Event(enable_timing=True)`` pair around the enqueue, synchronizes, and returns
``elapsed_time``: GPU time of the engine, which is what trtexec reports as "GPU Compute Time". The
numpy feed is copied to the device before the timed region and only when the array object changes
(the measurer passes the same arrays every run; ``run`` always copies).

Per-layer times (``per_layer=True``): an ``IProfiler`` subclass on a second execution context, so
the timed context never carries profiler events. With a profiler attached, ``execute_async_v3`` is
synchronous and reports from inside the call by default (``enqueue_emits_profile`` True, per the
``IExecutionContext`` docs). We set ``enqueue_emits_profile = False`` so the enqueue stays
asynchronous and only records events, synchronize the stream, then call
``report_to_profiler()``, which calls ``report_layer_time`` once per engine layer. Names are
TensorRT's (fused layers carry the names of what they fused); ``layer_ms`` returns the interquartile mean over
``runs`` runs after as many untimed ones.

Options (``options: {tensorrt: {...}}`` in the target YAML): ``workspace_mb`` (int > 0, default
1024), ``builder_optimization_level`` (int 0-5, default 3), ``tf32`` (bool, default false),
``cache`` (bool, default true). Any other key is a ``UserError`` listing these.

Versions: written for TensorRT 10.x. TensorRT 11 removed ``BuilderFlag.FP16``/``INT8`` (strong
typing only), so there fp16/int8 targets are refused with a ``UserError``; TensorRT < 10 lacks the
name-based I/O API and is refused too.

Not yet run against TensorRT: the project's test machines have neither a GPU nor the ``tensorrt``
package (``README.md``, status). Each call is checked against TensorRT's Python
bindings and docstrings (``python/src/infer/pyCore.cpp``, ``pyGraph.cpp``, ``parsers/pyOnnx.cpp``,
``docstrings/infer/pyCoreDoc.h`` in NVIDIA/TensorRT, 10.x) and its samples
(``samples/python/common_runtime.py``); the GPU test in ``tests/test_tensorrt.py`` exercises it
where both exist.

This is one module, over the usual length, because it is one backend, registered by name like the
others: the settings that name a cached engine (``build_settings``, ``engine_key``) are the ones
``_build`` applies, and ``TrtSession`` runs what they built, so the three change together.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from deploy_prune.backends import BACKENDS, Feed, center_by_node, check_feedable
from deploy_prune.config import Target
from deploy_prune.errors import UserError
from deploy_prune.io import atomic_write

PRECISIONS = ("fp32", "fp16", "int8")
# options.tensorrt keys: type and default
OPTIONS: dict[str, tuple[type, Any]] = {
    "workspace_mb": (int, 1024),
    "builder_optimization_level": (int, 3),
    "tf32": (bool, False),
    "cache": (bool, True),
}


def parse_device(device: str) -> int:
    """The CUDA device index of ``cuda`` or ``cuda:N``, or a ``UserError``."""
    if device == "cuda":
        return 0
    head, _, idx = device.partition(":")
    if head == "cuda" and idx.isdigit():
        return int(idx)
    raise UserError(f"backend tensorrt runs on a CUDA GPU, not on device {device!r}; "
                    "set device: cuda (or cuda:N) in the target YAML")


def _options(target: Target) -> dict[str, Any]:
    raw = target.options.get("tensorrt", {})
    raw = {} if raw is None else raw
    valid = ", ".join(f"{k} ({t.__name__})" for k, (t, _) in OPTIONS.items())
    if not isinstance(raw, dict):
        raise UserError(f"target {target.name!r}: options.tensorrt must be a mapping; valid keys: {valid}")
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise UserError(f"target {target.name!r}: unknown options.tensorrt key(s) {unknown}; valid keys: {valid}")
    out: dict[str, Any] = {}
    for key, (typ, default) in OPTIONS.items():
        v = raw.get(key, default)
        # bool is an int subclass: refuse it where a number is meant
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise UserError(f"target {target.name!r}: options.tensorrt.{key} must be {typ.__name__}, got {v!r}")
        out[key] = v
    if out["workspace_mb"] <= 0:
        raise UserError(f"target {target.name!r}: options.tensorrt.workspace_mb must be > 0, got {out['workspace_mb']}")
    if not 0 <= out["builder_optimization_level"] <= 5:
        raise UserError(f"target {target.name!r}: options.tensorrt.builder_optimization_level must be 0-5, "
                        f"got {out['builder_optimization_level']}")
    return out


def build_settings(target: Target, per_layer: bool = False) -> dict[str, Any]:
    """Everything that decides the engine built for ``target`` (checked; part of the cache key)."""
    if target.precision not in PRECISIONS:
        raise UserError(f"target precision {target.precision!r} is not one TensorRT takes here; "
                        f"use one of {', '.join(PRECISIONS)}")
    opts = _options(target)
    settings: dict[str, Any] = {
        "precision": target.precision,
        "workspace_mb": opts["workspace_mb"],
        "builder_optimization_level": opts["builder_optimization_level"],
        "tf32": opts["tf32"],
        "profiling_verbosity": "detailed" if per_layer else "layer_names_only",
        "batch": target.batch,
        "input_shape": list(target.input_shape) if target.input_shape is not None else None,
    }
    return settings


def engine_key(onnx_bytes: bytes, settings: dict[str, Any], trt_version: str, gpu: str) -> str:
    """sha256 naming the engine file; ``gpu`` is the GPU name with its compute capability."""
    h = hashlib.sha256()
    parts = (onnx_bytes, json.dumps(settings, sort_keys=True, separators=(",", ":")).encode(),
             trt_version.encode(), gpu.encode())
    for part in parts:  # length-prefixed, so no two different inputs concatenate alike
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("DEPLOY_PRUNE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "deploy-prune") / "tensorrt"


def check_version(version: str, precision: str) -> None:
    """Refuse TensorRT versions this backend's build calls do not fit."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return  # unparseable: let TensorRT itself decide
    if major < 10:
        raise UserError(f"backend tensorrt needs TensorRT 10 (found {version}); "
                        "install it with pip install 'deploy-prune[tensorrt]' or 'tensorrt>=10,<11'")
    if major >= 11 and precision != "fp32":
        raise UserError(f"TensorRT {version} removed the {precision} builder flag this backend uses; "
                        "install tensorrt 10.x (pip install 'tensorrt>=10,<11') or use precision fp32")


def profile_shape(name: str, dims: list[int], batch: int, input_shape: list[int] | None) -> list[int]:
    """The one shape to build input ``name`` for: its static dims, dynamic ones from the target."""
    if input_shape is not None and len(input_shape) != len(dims) - 1:
        raise UserError(f"target input_shape {input_shape} has {len(input_shape)} dims but model input {name!r} "
                        f"{dims} has {len(dims) - 1} after the batch; fix input_shape in the target YAML")
    wanted: list[int | None] = [batch, *(input_shape if input_shape is not None else [None] * (len(dims) - 1))]
    out = []
    for i, (d, w) in enumerate(zip(dims, wanted, strict=True)):
        if d >= 0:
            if i == 0 and d != batch:
                raise UserError(f"model input {name!r} has static batch {d} but the target asks for batch {batch}; "
                                "make batch match the model or export it with that batch")
            if w is not None and w != d:
                raise UserError(f"model input {name!r} has static shape {dims} but the target asks for {wanted}; "
                                "make input_shape match the model or export it with that shape")
            out.append(d)
        elif w is None:
            raise UserError(f"model input {name!r} {dims} has a dynamic dim {i} and the target does not fix it; "
                            "set input_shape (C,H,W) in the target YAML")
        else:
            out.append(w)
    return out


def _gpu(idx: int) -> tuple[str, str]:
    """GPU ``idx``'s name and compute capability (``"8.7"``)."""
    import torch

    major, minor = torch.cuda.get_device_capability(idx)
    return torch.cuda.get_device_name(idx), f"{major}.{minor}"


def _logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors for our messages instead of printing them."""

    class Recorder(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(msg).split()))

        def last(self) -> str:
            return self.errors[-1][:300] if self.errors else "no reason given"

    return Recorder()


def _profiler(trt: Any) -> Any:
    """An ``IProfiler`` summing ``report_layer_time`` per layer name into ``.times``."""

    class LayerTimes(trt.IProfiler):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.times: dict[str, float] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.times[layer_name] = self.times.get(layer_name, 0.0) + float(ms)

    return LayerTimes()


def _parser_error(trt: Any, parser: Any) -> str:
    """A one-line error from the parser's first error, naming the failing node and op where it has them."""
    n = parser.num_errors
    e = parser.get_error(0) if n else None
    desc = " ".join(str(e.desc()).split())[:300] if e is not None else "no error reported"
    more = f" (+{n - 1} more)" if n > 1 else ""
    name = e.node_name() if e is not None and hasattr(e, "node_name") else ""  # node_name/_operator: newer 10.x
    op = e.node_operator() if e is not None and hasattr(e, "node_operator") else ""
    index = e.node() if e is not None else -1
    if not name and index < 0:
        return (f"tensorrt {trt.__version__} cannot parse the model: {desc}{more}; "
                "check that it is a valid ONNX file (onnx.checker.check_model)")
    where = f"node {name!r}" if name else f"node #{index}"
    where += f" ({op})" if op else ""
    return (f"tensorrt {trt.__version__} cannot parse the model at {where}: {desc}{more}; "
            "replace that op or export with another opset")


def _build(trt: Any, logger: Any, onnx: bytes, path: str | None, target: Target, settings: dict[str, Any]) -> bytes:
    """Parse and build; the serialized engine."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx, path):  # path resolves external weights of a file model
        raise UserError(_parser_error(trt, parser))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_mb"] << 20)
    config.builder_optimization_level = settings["builder_optimization_level"]
    if not settings["tf32"]:
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default in TensorRT
    if settings["profiling_verbosity"] == "detailed":
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if settings["precision"] in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if settings["precision"] == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # the Q/DQ nodes of the deployed graph place the INT8 layers
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = [int(d) for d in inp.shape]
        if all(d >= 0 for d in dims):
            continue
        if i > 0:
            raise UserError(f"model input {inp.name!r} {dims} is dynamic; backend tensorrt resolves dynamic dims "
                            "of the first input only: export the model with static shapes")
        shape = profile_shape(inp.name, dims, target.batch, target.input_shape)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, min=shape, opt=shape, max=shape)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"tensorrt could not build an engine for target {target.name!r}: {logger.last()}; "
                        "try a larger options.tensorrt.workspace_mb or precision fp32")
    return bytes(plan)


def _deserialize(runtime: Any, plan: bytes) -> Any:
    try:
        return runtime.deserialize_cuda_engine(plan)  # None when the plan is not a valid engine
    except Exception:  # some versions raise instead
        return None


class TrtSession:
    """An engine with torch-allocated I/O on one stream; a second context for the profiler."""

    def __init__(self, trt: Any, runtime: Any, engine: Any, device: int, per_layer: bool) -> None:
        import torch

        self.runtime, self.engine = runtime, engine  # the runtime must outlive its engine
        self.device = torch.device("cuda", device)
        self.stream = torch.cuda.Stream(device=self.device)
        self.context = engine.create_execution_context()
        self.prof_context = engine.create_execution_context() if per_layer else None
        self.profiler = _profiler(trt) if per_layer else None
        contexts = [c for c in (self.context, self.prof_context) if c is not None]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.output_names = [n for n in names if not is_input[n]]
        self.inputs: list[tuple[str, list[int | str]]] = []
        for n in (n for n in names if is_input[n]):
            shape = [int(d) for d in engine.get_tensor_shape(n)]
            if any(d < 0 for d in shape):  # built with one profile of min = opt = max
                shape = [int(d) for d in engine.get_tensor_profile_shape(n, 0)[1]]
                for c in contexts:
                    c.set_input_shape(n, shape)
            self.inputs.append((n, list(shape)))
        self.np_dtype: dict[str, np.dtype] = {}
        self.buffers: dict[str, Any] = {}
        for n in names:
            shape = [int(d) for d in self.context.get_tensor_shape(n)]
            if any(d < 0 for d in shape):
                raise UserError(f"engine tensor {n!r} has a data-dependent shape {shape}; backend tensorrt times "
                                "models with static shapes only")
            self.np_dtype[n] = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            torch_dtype = torch.from_numpy(np.empty(0, self.np_dtype[n])).dtype
            self.buffers[n] = torch.empty(shape, dtype=torch_dtype, device=self.device)
            for c in contexts:
                c.set_tensor_address(n, self.buffers[n].data_ptr())
        for n, _ in self.inputs:
            check_feedable(n, self.np_dtype[n].name)
        self.input_dtypes = {n: self.np_dtype[n] for n, _ in self.inputs if self.np_dtype[n] in (np.uint8, np.int8)}
        if self.prof_context is not None:
            self.prof_context.profiler = self.profiler
            self.prof_context.enqueue_emits_profile = False  # keep enqueue async; report after the sync
        self._fed: dict[str, np.ndarray] = {}  # the array last copied per input (held, so `is` is sound)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def _feed(self, feed: Feed, force: bool) -> None:
        import torch

        copied = False
        for name, shape in self.inputs:
            if name not in feed:
                raise UserError(f"feed lacks input {name!r}; the engine's inputs are {[n for n, _ in self.inputs]}")
            arr = feed[name]
            if not force and self._fed.get(name) is arr:
                continue
            host = np.ascontiguousarray(arr, dtype=self.np_dtype[name])
            if list(host.shape) != shape:
                raise UserError(f"input {name!r} has shape {list(host.shape)} but the engine was built for {shape}; "
                                "feed that shape or change batch/input_shape in the target")
            with torch.cuda.stream(self.stream):
                self.buffers[name].copy_(torch.from_numpy(host))
            self._fed[name] = arr
            copied = True
        if copied:
            self.stream.synchronize()

    def _enqueue(self, context: Any) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise UserError("tensorrt failed to enqueue the engine (execute_async_v3 returned False)")

    def run(self, feed: Feed) -> list[np.ndarray]:
        self._feed(feed, force=True)
        self._enqueue(self.context)
        self.stream.synchronize()
        return [self.buffers[n].cpu().numpy() for n in self.output_names]

    def time_once(self, feed: Feed) -> float:
        self._feed(feed, force=False)
        self.start.record(self.stream)
        self._enqueue(self.context)
        self.end.record(self.stream)
        self.end.synchronize()
        return float(self.start.elapsed_time(self.end))

    def layer_ms(self, feed: Feed, runs: int = 20) -> dict[str, float]:
        """Typical ms (interquartile mean) per engine layer over ``runs`` runs after as many untimed, from TensorRT's IProfiler."""
        if self.prof_context is None or self.profiler is None:
            raise UserError("load the model with per_layer=True to read TensorRT's per-layer times")
        self._feed(feed, force=False)
        per_run = []
        for i in range(2 * runs):
            self.profiler.times = {}
            self._enqueue(self.prof_context)
            self.stream.synchronize()
            if not self.prof_context.report_to_profiler():
                raise UserError("tensorrt reported no per-layer times (report_to_profiler returned False)")
            if i >= runs:  # TensorRT's layout copies ("Reformatting CopyNode ...") follow the Reorder convention
                per_run.append({("Reorder:" if "Reformatting" in n else "") + n: v for n, v in self.profiler.times.items()})
        return center_by_node(per_run)


class TensorRTBackend:
    """NVIDIA TensorRT 10 on a CUDA GPU, engines cached on disk."""

    name = "tensorrt"
    extra = "tensorrt"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("tensorrt") is None:
            return False, "tensorrt is not installed"
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to torch"
        return True, ", ".join(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count()))

    def versions(self) -> dict[str, str]:
        import tensorrt as trt
        import torch

        return {"tensorrt": str(trt.__version__), "cuda": str(torch.version.cuda)}

    def _device(self, target: Target) -> int:
        import torch

        idx = parse_device(target.device)
        if idx >= torch.cuda.device_count():
            raise UserError(f"target device {target.device!r} does not exist: torch sees {torch.cuda.device_count()} "
                            "GPU(s); fix the target's device")
        return idx

    def device_string(self, target: Target) -> str:
        name, cc = _gpu(self._device(target))
        return f"{name} (compute {cc}, {target.precision})"

    def load(self, model: Path | bytes, target: Target, per_layer: bool = False) -> TrtSession:
        parse_device(target.device)  # target errors first, before touching the GPU or TensorRT
        settings = build_settings(target, per_layer)
        use_cache = _options(target)["cache"]
        import tensorrt as trt
        import torch

        check_version(str(trt.__version__), target.precision)
        idx = self._device(target)
        torch.cuda.set_device(idx)  # TensorRT builds and runs on the current CUDA device
        if isinstance(model, bytes):
            onnx, path = model, None
        else:
            try:
                onnx, path = Path(model).read_bytes(), str(model)
            except OSError as e:
                raise UserError(f"cannot read the model {str(model)!r} ({e.strerror})") from None
        logger = _logger(trt)
        runtime = trt.Runtime(logger)
        name, cc = _gpu(idx)
        file = cache_dir() / f"{engine_key(onnx, settings, str(trt.__version__), f'{name} (compute {cc})')}.engine"
        engine = _deserialize(runtime, file.read_bytes()) if use_cache and file.is_file() else None
        if engine is None:  # not cached, or a stale/corrupt file: rebuild
            logger.errors.clear()  # a corrupt cache file's complaint is not the build's
            plan = _build(trt, logger, onnx, path, target, settings)
            engine = _deserialize(runtime, plan)
            if engine is None:
                raise UserError(f"tensorrt built an engine it cannot load: {logger.last()}")
            if use_cache:
                try:
                    atomic_write(file, lambda p: p.write_bytes(plan))
                except (OSError, UserError):
                    pass  # an unwritable cache only costs a rebuild next time
        return TrtSession(trt, runtime, engine, idx, per_layer)


BACKENDS.register("tensorrt", "NVIDIA TensorRT 10 on a CUDA GPU (engines cached on disk)")(TensorRTBackend())
