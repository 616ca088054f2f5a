"""ONNX export: torch's exporter, ``onnx.checker``, and numerical parity with torch.

An export is two files: ``X.onnx`` and its record ``X.onnx.json`` (parity, opset, and the
ONNX file's size and SHA-256). Both are written to temp names first, then renamed, the ONNX
first and the record last; a crash between the two renames leaves an ONNX file whose record
is missing or names another file, which ``export_record`` (and so ``export_run``) detects.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from deploy_prune import __version__
from deploy_prune.checks import check_number
from deploy_prune.errors import UserError
from deploy_prune.io import ensure_dir
from deploy_prune.models.checkpoint import remove_stale_temps

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
    record with ``max_abs_diff`` between torch and ONNX Runtime on sample inputs. ``out`` is
    replaced if it exists (``export_run`` decides whether it may be); the two files are
    replaced together, as the module doc says, and temp files of a killed export are removed.
    """
    check_number("--opset", opset, integer=True)
    if opset < 17:
        raise UserError(f"opset {opset} is too old; deploy-prune exports opset >= 17")
    check_number("--batch", batch, lo=1, integer=True)
    check_number("tolerance", tolerance, lo=0, lo_open=True)
    model = model.eval().cpu()
    shape = (batch, *input_shape)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    side = record_path(out)
    if out.is_dir():
        raise UserError(f"{str(out)!r} is a directory; give a file name such as {str(out / 'model.onnx')!r}")
    made_dir = not out.parent.exists()
    ensure_dir(out.parent)
    remove_stale_temps(out.parent, (out.name, side.name))
    temps: list[Path] = []
    try:
        onnx_tmp = _temp_beside(out, temps)
        try:
            proto = to_onnx(model, example, opset)
            for k, v in {"deploy_prune_version": __version__, **(metadata or {})}.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(k), str(v)
            onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(onnx_tmp))
        except Exception as e:
            raise UserError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        record = {"onnx": str(out), "opset": opset, "input_shape": list(shape),
                  **parity(model, onnx_tmp, example, parity_inputs, tolerance), **_fingerprint(onnx_tmp)}
        side_tmp = _temp_beside(side, temps)
        side_tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(onnx_tmp, out)
        os.replace(side_tmp, side)  # last: until here the old record (if any) does not match the new ONNX
    except BaseException:
        for t in temps:
            t.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                out.parent.rmdir()  # only if empty: a failed export leaves no empty directory
        raise
    return record


def record_path(onnx_path: str | Path) -> Path:
    """Where the export record of ``onnx_path`` lives: ``X.onnx`` -> ``X.onnx.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def export_record(onnx_path: str | Path) -> dict[str, Any] | None:
    """The record of an ONNX export if it is there and describes this very file (same size and
    SHA-256); None for a file without a matching record: an interrupted export, one from before
    records were fingerprinted, or another tool's file."""
    p, side = Path(onnx_path), record_path(onnx_path)
    try:
        rec = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not p.is_file() or rec.get("onnx_bytes") != p.stat().st_size:
        return None
    return rec if rec.get("onnx_sha256") == _fingerprint(p)["onnx_sha256"] else None


def _fingerprint(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"onnx_bytes": path.stat().st_size, "onnx_sha256": h.hexdigest()}


def _temp_beside(dest: Path, temps: list[Path]) -> Path:
    """A temp file named as ``io.atomic_write`` names them (so ``remove_stale_temps`` finds it
    after a kill), with ordinary file permissions rather than mkstemp's 0600."""
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    temps.append(tmp)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return tmp


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """``deploy-prune export``: load a checkpoint/run, export it, check parity on real samples.

    Everything is checked before a byte is written: an existing output is refused unless
    ``overwrite``, and the data's channels and classes must match the checkpoint's (a
    3-class model checked against 10-class data would "pass" parity and mean nothing).
    """
    from deploy_prune.data import DataOptions, load_data
    from deploy_prune.models import check_runs_on
    from deploy_prune.models.checkpoint import load_model, resolve_weights

    check_number("--batch", batch, lo=1, integer=True)
    check_number("--opset", opset, integer=True)
    model, meta = load_model(weights, model_spec, trust=trust)
    recorded = meta.get("model", {})
    if input_shape:
        try:
            shape = [int(v) for v in input_shape.replace("x", ",").split(",")]
            assert len(shape) == 3 and min(shape) > 0
        except (ValueError, AssertionError):
            raise UserError(f"bad --input-shape {input_shape!r}; use C,H,W such as 3,32,32") from None
        if "in_channels" in recorded and shape[0] != recorded["in_channels"]:
            raise UserError(f"--input-shape {input_shape} has {shape[0]} channel(s) but {str(weights)!r} takes "
                            f"{recorded['in_channels']}; give C = {recorded['in_channels']}")
    elif "input_shape" in meta:
        shape = list(meta["input_shape"])
    else:
        raise UserError(f"{str(weights)!r} does not record its input shape; pass --input-shape C,H,W")
    w = Path(weights)
    dest = Path(out) if out is not None else (w / "model.onnx" if w.is_dir() else w.with_suffix(".onnx"))
    _check_dest(dest, resolve_weights(weights), overwrite)
    check_runs_on(model, tuple(shape))
    samples = None
    spec = data_spec or meta.get("data", {}).get("spec")
    if spec:
        try:  # real samples make the parity check meaningful; skip quietly if the data is not here
            bundle = load_data(spec, DataOptions(data_dir=data_dir, image_size=shape[-1], val_limit=8 * batch))
        except UserError:
            if data_spec:
                raise
        else:
            classes = recorded["num_classes"] if "num_classes" in recorded else _output_classes(model, shape)
            _check_data_fits(bundle, spec, shape, classes, weights)
            samples = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])  # type: ignore[arg-type]
    md = {"model": meta.get("model", {}).get("spec", model_spec or "unknown"), "input_shape": shape}
    if "data" in meta:
        md.update({"normalize_mean": meta["data"]["mean"], "normalize_std": meta["data"]["std"]})
    return export_onnx(model, shape, dest, batch=batch, opset=opset, parity_inputs=samples,
                       metadata={k: json_dumps(v) for k, v in md.items()})


def _check_dest(dest: Path, checkpoint: Path, overwrite: bool) -> None:
    """An existing output (a finished export or any other file) is replaced only when asked."""
    if dest.is_dir():
        raise UserError(f"--out {str(dest)!r} is a directory; give a file name such as {str(dest / 'model.onnx')!r}")
    if dest.resolve() == checkpoint.resolve():
        raise UserError(f"--out {str(dest)!r} is the checkpoint being exported; choose another --out")
    if not dest.exists() or overwrite:
        return
    if export_record(dest) is not None:
        raise UserError(f"{str(dest)!r} already holds an export; pass --overwrite to replace it, or another --out")
    raise UserError(f"{str(dest)!r} already exists and its record {record_path(dest).name!r} is missing or does not "
                    "match it (an interrupted export, or another file); pass --overwrite to replace it, or another --out")


def _output_classes(model: nn.Module, shape: list[int]) -> int:
    with torch.no_grad():
        return int(model.eval()(torch.zeros(1, *shape)).shape[-1])


def _check_data_fits(bundle: Any, spec: str, shape: list[int], classes: int, weights: str | Path) -> None:
    """The parity samples must be inputs the model was built for, from a task with its classes."""
    if bundle.in_channels != shape[0]:
        raise UserError(f"--data {spec} has {bundle.in_channels}-channel images but {str(weights)!r} takes {shape[0]} "
                        "channel(s); pass the --data it was trained on")
    if bundle.num_classes != classes:
        raise UserError(f"--data {spec} has {bundle.num_classes} classes but {str(weights)!r} predicts {classes}; "
                        "pass the --data it was trained on")
    if list(bundle.input_shape) != list(shape):
        raise UserError(f"--data {spec} gives inputs of shape {list(bundle.input_shape)} but the export input is "
                        f"{shape}; pass the --data it was trained on, or a matching --input-shape")


def json_dumps(v: Any) -> str:
    import json

    return v if isinstance(v, str) else json.dumps(v)
