"""The model as it ships: the fp32 ONNX export turned into the target's deployed artefact.

A target with ``precision: int8`` runs a quantized model, so everything that times or scores a
model for it (``benchmark``, ``profile``'s one-layer graphs, ``compress``'s measurements, the
deployed model's metric) goes through ``deploy_onnx`` first. Quantizers are registered per
``backend:precision``; a pair with none is refused, naming what the backend does run.

- ``onnxruntime:int8``: ONNX Runtime's static quantization (``onnxruntime.quantization``), QDQ
  format, weights int8 per output channel, activations uint8 (the U8S8 pair its x86 kernels,
  VNNI included, run fastest), activation ranges calibrated on ``Calibration.batches`` input
  batches with ``Calibration.method`` (``minmax``, ``entropy`` or ``percentile``).

Calibration data: a model's accuracy at int8 depends on the activation ranges, so the deployed
model is calibrated on the user's data (``calibration=``). Its *latency* does not: int8 kernels
take as long whatever values they multiply, so timing may quantize with seeded random batches
(``calibration=None``), which is what the measurer does for graphs it has no data for.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from deploy_prune.config import Target
from deploy_prune.errors import UserError
from deploy_prune.registry import Registry

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


@dataclass(frozen=True)
class Calibration:
    """How activation ranges are found (target YAML ``calibration: {method, batches}``)."""

    method: str = "minmax"
    batches: int = 8

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UserError(f"calibration method {self.method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
        if not isinstance(self.batches, int) or self.batches < 1:
            raise UserError(f"calibration batches must be a positive integer, got {self.batches!r}")


Quantizer = Callable[[bytes, Target, Sequence[np.ndarray]], bytes]
QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


def calibration_of(target: Target) -> Calibration:
    return Calibration(**target.calibration)


def is_quantized(model: bytes | onnx.ModelProto) -> bool:
    """Whether the graph already holds quantized ops (it is then run as it is)."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    return any(n.op_type in QUANTIZED_OPS for n in proto.graph.node)


def random_batches(model: bytes, target: Target, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` seeded standard-normal batches of the model's first input (for timing only)."""
    proto = onnx.load_from_string(model)
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    dims = [d.dim_value if d.dim_value > 0 else None for d in inputs[0].type.tensor_type.shape.dim]
    if dims and dims[0] is None:
        dims[0] = target.batch
    if any(d is None for d in dims):
        raise UserError(f"model input {inputs[0].name!r} has dynamic dims; set input_shape and batch in the target YAML")
    rng = np.random.default_rng(seed)
    return [rng.standard_normal([int(d) for d in dims if d is not None], dtype=np.float32) for _ in range(n)]


def deploy_onnx(model: bytes, target: Target, calibration: Sequence[np.ndarray] | None = None) -> bytes:
    """The artefact ``target`` runs for the fp32 ONNX ``model``: the model itself at fp32 or when
    it is already quantized, else the registered quantizer's output, calibrated on
    ``calibration`` (input batches; None: seeded random ones, for timing only)."""
    if target.precision == "fp32" or is_quantized(model):
        return model
    key = f"{target.backend}:{target.precision}"
    if key not in QUANTIZERS.names():
        runs = sorted(k.split(":")[1] for k in QUANTIZERS.names() if k.startswith(f"{target.backend}:"))
        raise UserError(f"target {target.name!r}: backend {target.backend} has no {target.precision} path here "
                        f"(it runs fp32{''.join(', ' + r for r in runs)}); change the target's precision")
    cal = calibration_of(target)
    batches = list(calibration) if calibration is not None else random_batches(model, target, cal.batches)
    if not batches:
        raise UserError(f"target {target.name!r} quantizes to {target.precision}: give calibration data (none was given)")
    return QUANTIZERS.get(key)(model, target, batches)


_CACHE: dict[tuple[str, str], bytes] = {}


def deploy_cached(model: bytes, target: Target) -> bytes:
    """``deploy_onnx`` with random calibration, cached by content (the closed loop times the same
    baseline again and again; quantizing it each time would cost seconds)."""
    if target.precision == "fp32":
        return model
    key = (hashlib.sha256(model).hexdigest(), f"{target.backend}:{target.precision}:{calibration_of(target)}")
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = deploy_onnx(model, target)
    return _CACHE[key]


@QUANTIZERS.register("onnxruntime:int8", "ONNX Runtime static quantization, QDQ, per-channel int8 weights, uint8 activations")
def _ort_int8(model: bytes, target: Target, batches: Sequence[np.ndarray]) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = onnx.load_from_string(model)
    init = {t.name for t in proto.graph.initializer}
    name = next(i.name for i in proto.graph.input if i.name not in init)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it = iter([{name: b} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration_of(target).method]
    with tempfile.TemporaryDirectory(prefix="deploy-prune-q-") as d:
        raw, src, dst = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        raw.write_bytes(model)
        try:
            # ORT's recommended pre-processing: shape inference and graph optimisation (conv+bn
            # fusion and the like), so ranges are calibrated on the graph the kernels will run.
            quant_pre_process(raw, src)
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                            calibration_providers=["CPUExecutionProvider"])
        except Exception as e:  # the quantizer's own errors name the node it could not handle
            raise UserError(f"onnxruntime.quantization cannot quantize the model: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        return dst.read_bytes()
