"""ONNX export: torch's exporter, ``onnx.checker``, and numerical parity with torch."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from deploy_prune import __version__
from deploy_prune.errors import UserError
from deploy_prune.io import atomic_write, write_json

DEFAULT_OPSET = 18  # torch's dynamo exporter emits 18 natively; >= 17 as required


def to_onnx(model: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """torch's dynamo exporter (with its graph optimiser: BN folded into convs), in memory."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=opset,
            input_names=["input"], output_names=["logits"], verbose=False,
        )
    if prog is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return prog.model_proto


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...] | list[int], batch: int = 1, opset: int = DEFAULT_OPSET) -> bytes:
    """The model as ONNX bytes for latency measurement (same exporter as ``export_onnx``; no
    parity check, since only the graph's shapes matter for timing)."""
    model = model.eval().cpu()
    try:
        return to_onnx(model, torch.zeros(batch, *input_shape), opset).SerializeToString()
    except Exception as e:
        raise UserError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    out: str | Path,
    *,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    parity_inputs: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Export ``model`` with a static input ``[batch, *input_shape]`` to ``out`` atomically.

    Static shapes on purpose: latency is measured at a fixed batch, and TensorRT/OpenVINO
    optimise best for one shape. Returns (and writes beside ``out`` as ``.json``) the export
    record with ``max_abs_diff`` between torch and ONNX Runtime on sample inputs.
    """
    if opset < 17:
        raise UserError(f"opset {opset} is too old; deploy-prune exports opset >= 17")
    model = model.eval().cpu()
    shape = (batch, *input_shape)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = Path(out)

    def write(tmp: Path) -> None:
        proto = to_onnx(model, example, opset)
        for k, v in {"deploy_prune_version": __version__, **(metadata or {})}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(k), str(v)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))

    try:
        atomic_write(out, write)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    record = {"onnx": str(out), "opset": opset, "input_shape": list(shape), **parity(model, out, example, parity_inputs, tolerance)}
    write_json(out.with_suffix(out.suffix + ".json"), record)
    return record


def parity(
    model: nn.Module, onnx_path: Path, example: torch.Tensor, extra: torch.Tensor | None, tolerance: float
) -> dict[str, Any]:
    """Max |torch - ONNX Runtime| over random inputs and, when given, real samples."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    batch = example.shape[0]
    inputs = [example, torch.randn_like(example)]
    if extra is not None and len(extra) >= batch:
        inputs += [extra[i : i + batch] for i in range(0, min(len(extra), 8 * batch) - batch + 1, batch)]
    max_diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for x in inputs:
            ref = model(x).numpy()
            got = sess.run(None, {name: x.numpy().astype(np.float32)})[0]
            max_diff = max(max_diff, float(np.abs(ref - got).max()))
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            total += len(ref)
    return {
        "max_abs_diff": max_diff, "parity_samples": total, "top1_agreement": agree / total,
        "parity_ok": max_diff <= tolerance, "tolerance": tolerance,
    }


def onnx_input_shape(path: str | Path) -> list[int | str]:
    """The first input's shape as stored (ints, or names for dynamic axes)."""
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{str(path)!r} is not a readable ONNX model: {str(e).splitlines()[0]}") from None
    dims = m.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def export_run(
    weights: str | Path,
    *,
    out: str | Path | None = None,
    model_spec: str | None = None,
    data_spec: str | None = None,
    data_dir: str | None = None,
    input_shape: str | None = None,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    trust: bool = False,
) -> dict[str, Any]:
    """``deploy-prune export``: load a checkpoint/run, export it, check parity on real samples."""
    from deploy_prune.data import DataOptions, load_data
    from deploy_prune.models.checkpoint import load_model

    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    model, meta = load_model(weights, model_spec, trust=trust)
    if input_shape:
        try:
            shape = [int(v) for v in input_shape.replace("x", ",").split(",")]
            assert len(shape) == 3 and min(shape) > 0
        except (ValueError, AssertionError):
            raise UserError(f"bad --input-shape {input_shape!r}; use C,H,W such as 3,32,32") from None
    elif "input_shape" in meta:
        shape = list(meta["input_shape"])
    else:
        raise UserError(f"{str(weights)!r} does not record its input shape; pass --input-shape C,H,W")
    w = Path(weights)
    dest = Path(out) if out is not None else (w / "model.onnx" if w.is_dir() else w.with_suffix(".onnx"))
    samples = None
    spec = data_spec or meta.get("data", {}).get("spec")
    if spec:
        try:  # real samples make the parity check meaningful; skip quietly if the data is not here
            bundle = load_data(spec, DataOptions(data_dir=data_dir, image_size=shape[-1], val_limit=8 * batch))
            samples = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])  # type: ignore[arg-type]
        except UserError:
            if data_spec:
                raise
    md = {"model": meta.get("model", {}).get("spec", model_spec or "unknown"), "input_shape": shape}
    if "data" in meta:
        md.update({"normalize_mean": meta["data"]["mean"], "normalize_std": meta["data"]["std"]})
    return export_onnx(model, shape, dest, batch=batch, opset=opset, parity_inputs=samples,
                       metadata={k: json_dumps(v) for k, v in md.items()})


def json_dumps(v: Any) -> str:
    import json

    return v if isinstance(v, str) else json.dumps(v)
