"""The model as it ships: the fp32 ONNX export turned into the target's deployed artefact.

A target with ``precision: int8`` runs a quantized model, so everything that times or scores a
model for it (``benchmark``, ``profile``'s one-layer graphs, ``compress``'s measurements, the
deployed model's metric) goes through ``deploy_onnx`` first. Quantizers are registered per
``backend:precision``; a pair with none is refused, naming what the backend does run.

- ``openvino:int8``: NNCF's post-training quantization (``nncf.quantize``) of the ONNX graph
  into QDQ pairs, compiled by OpenVINO to int8 kernels; ``openvino:bf16`` / ``fp16``: the
  fp32 graph, which OpenVINO runs at that precision itself.
- ``onnxruntime:int8``: ONNX Runtime's static quantization (``onnxruntime.quantization``), QDQ
  format, weights int8 per output channel, activations uint8 (the U8S8 pair its x86 kernels,
  VNNI included, run fastest), activation ranges calibrated on ``Calibration.samples`` inputs
  with ``Calibration.method`` (``minmax``, ``entropy`` or ``percentile``). On an x86 CPU without
  VNNI, weights take 7 bits (``reduce_range``, ORT's advice for such CPUs): there the U8S8
  kernels sum pairs of 8-bit products in 16 bits, which saturates at full range (a small CNN
  with 8-bit weights scored 31 % at int8 against 61 % at fp32 on an AVX2 EPYC).
- ``tensorrt:int8``: the same quantizer with symmetric int8 activations and weights (zero point
  0), the Q/DQ graph TensorRT's explicit quantization builds INT8 layers from (its implicit,
  calibrator-based mode is deprecated since TensorRT 10.1); ``tensorrt:fp16``: the fp32 graph,
  built with the FP16 flag. ``torch:fp16`` / ``bf16``: the fp32 graph, cast by the backend.

Calibration data: a model's accuracy at int8 depends on the activation ranges, so the deployed
model is calibrated on the user's data (``calibration=``). Its *latency* does not: int8 kernels
take as long whatever values they multiply, so timing quantizes with two seeded random inputs
(``calibration=None``), which is what the measurer does: the one-layer graphs of a profile have
no data of their own. ``DeployedModule`` runs an artefact as an ``nn.Module``, so the metric of
the deployed model is scored by the same ``evaluate`` as the fp32 one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from deploy_prune.config import Target
from deploy_prune.errors import UserError
from deploy_prune.registry import Registry

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


@dataclass(frozen=True)
class Calibration:
    """How activation ranges are found (target YAML ``calibration: {method, samples}``):
    ``samples`` model inputs (of the target's batch) from the training data."""

    method: str = "minmax"
    samples: int = 128

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UserError(f"calibration method {self.method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise UserError(f"calibration samples must be a positive integer, got {self.samples!r}")


Feeds = Sequence[dict[str, np.ndarray]]  # calibration: one {input name: array} per sample
Quantizer = Callable[[bytes, Target, Feeds], bytes]
QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


def calibration_of(target: Target) -> Calibration:
    """The target's calibration settings (defaults where its YAML gives none)."""
    return Calibration(**target.calibration)


# Why a backend:precision pair that users ask for has no quantizer (said in the refusal).
NO_PATH = {
    "torch:int8": "PyTorch's int8 kernels (torch.ao.quantization) are for its own eager or exported "
                  "modules, not a runtime for the ONNX graph; time int8 on onnxruntime, openvino or tensorrt",
    "onnxruntime:fp16": "the CPU execution provider has no fp16 kernels for most ops (it would time casts)",
    "onnxruntime:bf16": "the CPU execution provider has no bf16 kernels; OpenVINO runs bf16 on this CPU",
}
PRECISION_KEY = "deploy_prune.precision"  # metadata of an artefact deploy_onnx made


def is_quantized(model: bytes | onnx.ModelProto) -> bool:
    """Whether the graph is already a deployed artefact (made by ``deploy_onnx``, or holding
    quantized ops); it is then run as it is."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    if any(p.key == PRECISION_KEY for p in proto.metadata_props):
        return True
    return any(n.op_type in QUANTIZED_OPS for n in proto.graph.node)


def _graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    init = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in init]


def random_inputs(model: bytes, target: Target, n: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` seeded standard-normal feeds of every input of ``model`` (for timing only: a
    profile's one-layer graphs of a residual add have two)."""
    proto = onnx.load_from_string(model)
    rng = np.random.default_rng(seed)
    shapes = {}
    for inp in _graph_inputs(proto):
        dims = [d.dim_value if d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
        if dims and dims[0] is None:
            dims[0] = target.batch
        if any(d is None for d in dims):
            raise UserError(f"model input {inp.name!r} has dynamic dims; set input_shape and batch in the target YAML")
        shapes[inp.name] = [int(d) for d in dims if d is not None]
    return [{k: rng.standard_normal(v, dtype=np.float32) for k, v in shapes.items()} for _ in range(n)]


def deploy_onnx(model: bytes, target: Target, calibration: Sequence[np.ndarray] | None = None) -> bytes:
    """The artefact ``target`` runs for the fp32 ONNX ``model``: the model itself at fp32 or when
    it is already quantized, else the registered quantizer's output, calibrated on
    ``calibration`` (model inputs; None: seeded random ones, for timing only)."""
    if target.precision == "fp32" or is_quantized(model):
        return model
    key = f"{target.backend}:{target.precision}"
    if key not in QUANTIZERS.names():
        runs = sorted(k.split(":")[1] for k in QUANTIZERS.names() if k.startswith(f"{target.backend}:"))
        why = f": {NO_PATH[key]}" if key in NO_PATH else ""
        raise UserError(f"target {target.name!r}: backend {target.backend} has no {target.precision} path "
                        f"(it runs fp32{''.join(', ' + r for r in runs)}){why}; change the target's precision")
    if calibration is not None:
        first = _graph_inputs(onnx.load_from_string(model))[0].name
        batches = [{first: x} for x in calibration]
    else:
        batches = random_inputs(model, target)
    if not batches:
        raise UserError(f"target {target.name!r} quantizes to {target.precision}: give calibration data (none was given)")
    out = onnx.load_from_string(QUANTIZERS.get(key)(model, target, batches))
    # Marked, so a graph with nothing to quantize (a probe, a lone pool) is still known as deployed.
    onnx.helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props}, PRECISION_KEY: target.precision})
    return out.SerializeToString()


def in_model_view(artefact: bytes) -> bytes:
    """A quantized one-layer graph as its layer runs inside a quantized model: between two int8
    layers a tensor stays int8, so the graph's inputs become the quantized tensors its
    ``QuantizeLinear`` nodes made and its outputs the quantized tensors its final
    ``DequantizeLinear`` nodes read. Timing it leaves out the input quantization and output
    dequantization a standalone graph pays per layer and a whole model pays once (at its own
    input and output, which the whole-model calibration sees). Other graphs come back as given."""
    proto = onnx.load_from_string(artefact)
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    users: dict[str, list[int]] = {}  # node indices (protobuf wrappers are not stable objects to key on)
    producer: dict[str, int] = {}
    for idx, n in enumerate(g.node):
        for i in n.input:
            users.setdefault(i, []).append(idx)
        for o in n.output:
            producer[o] = idx

    def quantized(node: onnx.NodeProto, like: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto | None:
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zp is None:
            return None
        dims = [d.dim_value for d in like.type.tensor_type.shape.dim]
        return onnx.helper.make_tensor_value_info(name, zp.data_type, dims)

    drop: set[int] = set()
    inputs, outputs = [], []
    for inp in g.input:
        u = users.get(inp.name, [])
        qi = u[0] if len(u) == 1 and g.node[u[0]].op_type == "QuantizeLinear" and inp.name not in inits else None
        new = quantized(g.node[qi], inp, g.node[qi].output[0]) if qi is not None else None
        if new is None or qi is None:
            inputs.append(inp)
            continue
        drop.add(qi)
        inputs.append(new)
    for out in g.output:
        di = producer.get(out.name)
        dq = g.node[di] if di is not None else None
        new = quantized(dq, out, dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if new is None or di is None:
            outputs.append(out)
            continue
        drop.add(di)
        outputs.append(new)
    if not drop:
        return artefact
    from deploy_prune.backends import with_boundary

    return with_boundary(proto, drop, inputs, outputs)


_CACHE: dict[tuple[str, str], bytes] = {}


def deploy_cached(model: bytes, target: Target) -> bytes:
    """``deploy_onnx`` with random calibration, cached by content (the closed loop times the same
    baseline again and again; quantizing it each time would cost seconds)."""
    if target.precision == "fp32":
        return model
    key = (hashlib.sha256(model).hexdigest(), f"{target.backend}:{target.precision}:{calibration_of(target).method}")
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = deploy_onnx(model, target)
    return _CACHE[key]


def _runtime_converts(model: bytes, target: Target, batches: Feeds) -> bytes:
    """The backend runs the fp32 graph at this precision itself (OpenVINO's
    ``INFERENCE_PRECISION_HINT``): the artefact is the fp32 ONNX."""
    return model


QUANTIZERS.register("openvino:bf16", "OpenVINO runs the fp32 graph in bf16 (INFERENCE_PRECISION_HINT)")(_runtime_converts)
QUANTIZERS.register("openvino:fp16", "OpenVINO runs the fp32 graph in fp16 (INFERENCE_PRECISION_HINT)")(_runtime_converts)
QUANTIZERS.register("tensorrt:fp16", "TensorRT builds the fp32 graph with BuilderFlag.FP16")(_runtime_converts)
QUANTIZERS.register("torch:fp16", "the torch backend casts the converted module to fp16 (CUDA)")(_runtime_converts)
QUANTIZERS.register("torch:bf16", "the torch backend casts the converted module to bf16")(_runtime_converts)


@QUANTIZERS.register("openvino:int8", "NNCF post-training quantization (nncf.quantize) of the ONNX model, run by OpenVINO")
def _nncf_int8(model: bytes, target: Target, batches: Feeds) -> bytes:
    """NNCF quantizes the ONNX graph (its ONNX backend, with the OpenVINO-oriented default
    preset: symmetric int8 weights per channel, activations per tensor) into QDQ pairs, which
    OpenVINO's CPU plugin compiles to int8 kernels. The artefact stays ONNX bytes, as every
    other target's does, so the measurer, the agent and ``DeployedModule`` need nothing new."""
    try:
        import nncf
    except ImportError:
        raise UserError("target precision int8 on openvino needs nncf: pip install 'deploy-prune[openvino]'") from None

    proto = onnx.load_from_string(model)
    cal = calibration_of(target)
    if cal.method != "minmax":
        raise UserError(f"target {target.name!r}: NNCF's post-training quantization takes calibration method minmax "
                        f"here, not {cal.method!r}")
    try:
        # NNCF draws progress bars on the console for every model it quantizes, and the closed
        # loop quantizes many: they would bury compress's own output.
        nncf.set_log_level(logging.ERROR)  # "the model has no operations to quantize" for every pool graph
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            out = nncf.quantize(proto, nncf.Dataset(list(batches)), subset_size=len(batches))
    except Exception as e:  # NNCF names the node or op it could not handle
        raise UserError(f"nncf cannot quantize the model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return out.SerializeToString()  # type: ignore[no-any-return]


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's U8S8 int8 kernels can saturate on this CPU: x86 with no VNNI
    instruction (``avx512_vnni`` or ``avx_vnni``), where they add pairs of u8*s8 products into
    int16 (``vpmaddubsw``). Unknown flags (not Linux) count as VNNI present."""
    import platform

    from deploy_prune.io import cpu_flags

    flags = cpu_flags()
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return not flags & {"avx512_vnni", "avx_vnni"}


def _ort_static(model: bytes, target: Target, batches: Feeds, symmetric: bool, reduce_range: bool = False) -> bytes:
    """``onnxruntime.quantization.quantize_static`` to QDQ with per-channel int8 weights;
    activations uint8 (asymmetric) or, with ``symmetric``, int8 with zero point 0;
    ``reduce_range``: 7-bit weights."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration_of(target).method]
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # calibration sessions warn about initializers the quantizer left unused
    with tempfile.TemporaryDirectory(prefix="deploy-prune-q-") as d:
        raw, src, dst = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        raw.write_bytes(model)
        try:
            # ORT's recommended pre-processing: shape inference and graph optimisation (conv+bn
            # fusion and the like), so ranges are calibrated on the graph the kernels will run.
            quant_pre_process(raw, src)
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method, reduce_range=reduce_range,
                            calibration_providers=["CPUExecutionProvider"],
                            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
        except Exception as e:  # the quantizer's own errors name the node it could not handle
            raise UserError(f"onnxruntime.quantization cannot quantize the model: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        return dst.read_bytes()


@QUANTIZERS.register("onnxruntime:int8", "ONNX Runtime static quantization, QDQ, per-channel int8 weights, uint8 activations")
def _ort_int8(model: bytes, target: Target, batches: Feeds) -> bytes:
    # decided by the CPU that quantizes: for timing that is the one that runs the model (an agent
    # quantizes on its own), for the shipped model.int8.onnx it is this machine
    return _ort_static(model, target, batches, symmetric=False, reduce_range=u8s8_saturates())


@QUANTIZERS.register("tensorrt:int8", "ONNX Runtime static quantization to symmetric int8 QDQ, for TensorRT's explicit quantization")
def _trt_int8(model: bytes, target: Target, batches: Feeds) -> bytes:
    """TensorRT takes Q/DQ with zero point 0 only, so activations are symmetric int8 as well."""
    return _ort_static(model, target, batches, symmetric=True)


class DeployedModule(nn.Module):
    """A deployed artefact run by the target's backend, called like the model it came from (for
    scoring the metric of the model as it ships). Inputs are run ``target.batch`` at a time."""

    def __init__(self, artefact: bytes, target: Target) -> None:
        from deploy_prune.backends import get_backend

        super().__init__()
        self.target = target
        self.session = get_backend(target.backend).load(artefact, target)
        self.input_name = self.session.inputs[0][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, outs = self.target.batch, []
        for i in range(0, x.shape[0], b):
            chunk = x[i:i + b].detach().cpu().float()
            n = chunk.shape[0]
            if n < b:  # the artefact's batch is static: pad the last chunk, keep its own rows
                chunk = torch.cat([chunk, chunk.new_zeros(b - n, *chunk.shape[1:])])
            out = self.session.run({self.input_name: chunk.numpy()})[0]
            outs.append(torch.from_numpy(np.asarray(out))[:n])
        return torch.cat(outs)


def calibration_inputs(batches: Sequence[object], target: Target) -> list[np.ndarray]:
    """``Calibration.samples`` model inputs (of the target's batch) cut from training batches
    (``(inputs, targets)`` pairs or input tensors)."""
    want, b, out = calibration_of(target).samples, target.batch, []
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise UserError("calibration needs input tensors: training batches are neither tensors nor (input, target) pairs")
        for i in range(0, x.shape[0] - b + 1, b):
            out.append(x[i:i + b].detach().cpu().float().numpy())
            if len(out) == want:
                return out
    if not out:
        raise UserError(f"target {target.name!r} quantizes to {target.precision}: the training data gave no calibration inputs")
    return out
