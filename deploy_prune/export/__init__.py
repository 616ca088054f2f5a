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
from deploy_prune.io import ensure_dir, file_kind, json_object, provenance, remove_if_empty
from deploy_prune.models.checkpoint import remove_stale_temps

DEFAULT_OPSET = 18  # torch's dynamo exporter emits 18 natively; >= 17 as required
BATCH_DIM = "batch"  # the name of the symbolic batch axis of a --dynamic-batch export
META_PREFIX = "deploy_prune."  # namespace of the metadata_props keys written here
LEGACY_VERSION_KEY = "deploy_prune_version"  # also written, for readers that look the version up by this name


def _reuse_the_torchlib_registry() -> None:
    """torch's dynamo exporter builds its table of ATen-to-ONNX functions anew for every export:
    about 0.8 s, most of the export of a small model, and compress exports many. Built once per
    process and opset here, each export gets its own copy of the table (a copy of a dict of
    lists: an export that registers custom ops changes only its copy). Written by hand because
    torch has no switch for it; a torch without this classmethod is left as it is."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return
    cls = _registration.ONNXRegistry
    build = cls.__dict__.get("from_torchlib")
    if not isinstance(build, classmethod) or getattr(build.__func__, "reused", False):
        return
    built: dict[Any, Any] = {}

    def from_torchlib(klass: Any, *args: Any, **kwargs: Any) -> Any:
        key = (klass, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build.__func__(klass, *args, **kwargs)
        table = built[key]
        fresh = klass()
        fresh.__dict__.update(table.__dict__)
        fresh.functions = {op: list(fns) for op, fns in table.functions.items()}
        return fresh

    from_torchlib.reused = True  # type: ignore[attr-defined]
    setattr(cls, "from_torchlib", classmethod(from_torchlib))  # noqa: B010


def output_names(y: Any) -> list[str]:
    """ONNX names of a forward's outputs: ``logits`` for one tensor; a dict's keys (``boxes``,
    ``feats.0``); ``output0``, ``output1``, ... for a tuple or list."""
    leaves, _ = torch.utils._pytree.tree_flatten_with_path(y)
    if len(leaves) == 1:
        return ["logits"]
    def name(path: Any, i: int) -> str:
        keys = [str(getattr(k, "key", getattr(k, "idx", ""))) for k in path]
        return ".".join(keys) if all(hasattr(k, "key") for k in path[:1]) else f"output{i}"
    return [name(p, i) for i, (p, _) in enumerate(leaves)]


def to_onnx(model: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False) -> onnx.ModelProto:
    """torch's dynamo exporter (with its graph optimiser: BN folded into convs), in memory.

    ``dynamic_batch`` makes dim 0 of the input and the output the symbolic ``batch``
    (``BATCH_DIM``); every other dim stays as in ``example``.
    """
    dynamic = ({0: torch.export.Dim(BATCH_DIM)},) if dynamic_batch else None
    _reuse_the_torchlib_registry()
    with torch.no_grad():
        names = output_names(model.eval()(example))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
            input_names=["input"], output_names=names, verbose=False,
        )
    if prog is None:
        raise RuntimeError("torch.onnx.export returned no program")
    proto = prog.model_proto
    if dynamic_batch:
        for value in (*proto.graph.input, *proto.graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            if dim.HasField("dim_value"):
                raise RuntimeError(f"the exporter kept {value.name!r} at a static batch of {dim.dim_value}")
            dim.dim_param = BATCH_DIM
    return proto


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
    dynamic_batch: bool = False,
    parity_inputs: torch.Tensor | None = None,
    model_spec: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    class_names: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Export ``model`` with the input ``[batch, *input_shape]`` to ``out`` atomically.

    Static shapes by default: latency is measured at a fixed batch, and TensorRT/OpenVINO
    optimise best for one shape. ``dynamic_batch`` makes the batch axis symbolic for serving
    stacks that batch requests; parity is then checked at ``batch`` and at one other batch
    size. The ONNX ``metadata_props`` get ``export_metadata``'s keys (``model_spec``,
    normalisation ``mean``/``std`` and ``class_names`` where given) and then ``metadata``.
    Returns (and writes beside ``out`` as ``.json``) the export record with ``max_abs_diff``
    between torch and ONNX Runtime on sample inputs. ``out`` is replaced if it exists
    (``export_run`` decides whether it may be); the two files are replaced together, as the
    module doc says, and temp files of a killed export are removed.
    """
    check_number("--opset", opset, integer=True)
    if opset < 17:
        raise UserError(f"opset {opset} is too old; deploy-prune exports opset >= 17")
    check_number("--batch", batch, lo=1, integer=True)
    check_number("tolerance", tolerance, lo=0, lo_open=True)
    model = model.eval().cpu()
    shape = (batch, *input_shape)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    props = {**export_metadata(shape, opset=opset, dynamic_batch=dynamic_batch, model_spec=model_spec, mean=mean,
                               std=std, class_names=class_names), **(metadata or {})}
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
            proto = to_onnx(model, _export_example(example, dynamic_batch), opset, dynamic_batch=dynamic_batch)
            onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                                **{str(k): json_dumps(v) for k, v in props.items()}})
            onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(onnx_tmp))
        except Exception as e:
            raise UserError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        checks = parity(model, onnx_tmp, example, parity_inputs, tolerance)
        if dynamic_batch:  # the symbolic axis must take another batch size too
            other = parity(model, onnx_tmp, torch.randn(batch + 1, *input_shape, generator=torch.Generator().manual_seed(1)),
                           None, tolerance)
            n = checks["parity_samples"] + other["parity_samples"]
            agree = None if checks["top1_agreement"] is None else (
                checks["top1_agreement"] * checks["parity_samples"] + other["top1_agreement"] * other["parity_samples"]) / n
            checks = {**checks, "max_abs_diff": max(checks["max_abs_diff"], other["max_abs_diff"]), "parity_samples": n,
                      "max_rel_diff": max(checks["max_rel_diff"], other["max_rel_diff"]), "top1_agreement": agree,
                      "parity_ok": checks["parity_ok"] and other["parity_ok"], "parity_batches": [batch, batch + 1]}
        record = {"onnx": str(out), "opset": opset, "input_shape": list(shape), "dynamic_batch": dynamic_batch,
                  **checks, **_fingerprint(onnx_tmp)}
        side_tmp = _temp_beside(side, temps)
        side_tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(onnx_tmp, out)
        os.replace(side_tmp, side)  # last: until here the old record (if any) does not match the new ONNX
    except BaseException:
        for t in temps:
            t.unlink(missing_ok=True)
        if made_dir:
            remove_if_empty(out.parent)  # a failed export leaves no empty directory
        raise
    return record


def export_metadata(
    shape: tuple[int, ...] | list[int],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    model_spec: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """The ``metadata_props`` an export carries, so that a serving stack can preprocess and label
    without the checkpoint: ``deploy_prune.version``; ``deploy_prune.input_shape`` (the graph's
    input, ``"batch"`` for a symbolic batch axis) and ``deploy_prune.dynamic_batch``;
    ``deploy_prune.mean`` / ``std`` (per-channel normalisation the model was trained with, applied
    as ``(x - mean) / std`` to pixels scaled to [0, 1], as the built-in datasets do),
    ``deploy_prune.class_names`` (label i's name) and
    ``deploy_prune.model`` where known; ``deploy_prune.provenance`` (tool version, git commit, UTC
    date, CPU, platform, Python, torch, onnx, opset). Values that are not strings are stored as
    JSON; ``read_metadata`` decodes them. ``deploy_prune_version`` repeats the version under the
    key readers of deploy-prune exports look it up by.
    """
    prov = provenance(onnx=onnx.__version__, opset=opset)
    md: dict[str, Any] = {
        LEGACY_VERSION_KEY: __version__,
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}input_shape": [BATCH_DIM if dynamic_batch else int(shape[0]), *(int(d) for d in shape[1:])],
        f"{META_PREFIX}dynamic_batch": dynamic_batch,
    }
    if model_spec:
        md[f"{META_PREFIX}model"] = model_spec
    for key, values in (("mean", mean), ("std", std)):
        if values:  # None or empty: not known (a user's dataset), so not recorded
            if len(values) != shape[1]:
                raise UserError(f"normalisation {key} has {len(values)} values but the input has {shape[1]} channel(s); "
                                "give one per channel")
            md[f"{META_PREFIX}{key}"] = [float(v) for v in values]
    if class_names:
        md[f"{META_PREFIX}class_names"] = [str(c) for c in class_names]
    md[f"{META_PREFIX}provenance"] = {k: prov[k] for k in PROVENANCE_FIELDS if k in prov}
    return md


# Which of io.provenance()'s fields an exported model carries (not the host's name: the file ships).
PROVENANCE_FIELDS = ("tool", "tool_version", "git_commit", "date", "cpu", "platform", "python", "torch", "onnx", "opset")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """An ONNX file's ``metadata_props``, JSON values decoded (``export_metadata`` says what they are)."""
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{str(path)!r} is not a readable ONNX model: {str(e).splitlines()[0] if str(e) else e}") from None
    out: dict[str, Any] = {}
    for p in m.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


def _export_example(example: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """The tensor traced: ``example``, or for a symbolic batch a batch of at least 2 (torch.export
    specialises a dim of size 1 to the constant 1)."""
    if not dynamic_batch or example.shape[0] > 1:
        return example
    return torch.cat([example, example])


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
    except (OSError, ValueError, RecursionError):
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


def _outputs(y: Any) -> list[np.ndarray]:
    """A forward's tensors in order (one, or each of a tuple, list or dict), as ONNX lists them."""
    return [t.detach().cpu().numpy() for t in torch.utils._pytree.tree_flatten(y)[0] if isinstance(t, torch.Tensor)]


def parity(
    model: nn.Module, onnx_path: Path, example: torch.Tensor, extra: torch.Tensor | None, tolerance: float
) -> dict[str, Any]:
    """Max |torch - ONNX Runtime| over random inputs and, when given, real samples, over every
    output; within ``tolerance`` of each output's own scale (max(1, max |output|): a detector's
    boxes are in pixels). Top-1 agreement where the model has one (N, classes) output."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    batch = example.shape[0]
    inputs = [example, torch.randn_like(example)]
    if extra is not None and len(extra) >= batch:
        inputs += [extra[i : i + batch] for i in range(0, min(len(extra), 8 * batch) - batch + 1, batch)]
    max_diff, worst, agree, total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for x in inputs:
            refs = _outputs(model(x))
            gots = sess.run(None, {name: x.numpy().astype(np.float32)})
            if len(refs) != len(gots):
                raise UserError(f"the ONNX model has {len(gots)} outputs where the model has {len(refs)}")
            for ref, got in zip(refs, gots, strict=True):
                diff = float(np.abs(ref - got).max()) if ref.size else 0.0
                max_diff = max(max_diff, diff)
                worst = max(worst, diff / max(1.0, float(np.abs(ref).max()) if ref.size else 1.0))
            if len(refs) == 1 and refs[0].ndim == 2:
                agree += int((refs[0].argmax(1) == gots[0].argmax(1)).sum())
                total += len(refs[0])
    classes = total > 0
    return {
        "max_abs_diff": max_diff, "max_rel_diff": worst, "parity_samples": len(inputs) * batch,
        "top1_agreement": agree / total if classes else None, "parity_ok": worst <= tolerance, "tolerance": tolerance,
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
    dynamic_batch: bool = False,
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
    bundle: Any = None
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
    elif data_spec:  # a bare state dict or pickled module: the data it was trained on gives the shape
        bundle = load_data(data_spec, DataOptions(data_dir=data_dir, val_limit=8 * batch))
        shape = list(bundle.input_shape)
        stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if stem is not None and stem.in_channels != shape[0]:
            raise UserError(f"--data {data_spec} has {shape[0]}-channel images but {str(weights)!r} takes "
                            f"{stem.in_channels} channel(s); pass the --data it was trained on")
    else:
        raise UserError(f"{str(weights)!r} does not record its input shape; pass --input-shape C,H,W "
                        "or the --data it was trained on")
    w = Path(weights)
    dest = Path(out) if out is not None else (w / "model.onnx" if w.is_dir() else w.with_suffix(".onnx"))
    _check_dest(dest, resolve_weights(weights), overwrite)
    check_runs_on(model, tuple(shape))
    samples = None
    recorded_data = meta.get("data", {})
    class_names = recorded_data.get("classes")
    spec = data_spec or recorded_data.get("spec")
    if spec:
        try:  # real samples make the parity check meaningful; skip quietly if the data is not here
            if bundle is None:
                bundle = load_data(spec, DataOptions(data_dir=data_dir, image_size=shape[-1], val_limit=8 * batch))
        except UserError:
            if data_spec:
                raise
        else:
            classes = recorded["num_classes"] if "num_classes" in recorded else _output_classes(model, shape)
            _check_data_fits(bundle, spec, shape, classes, weights)
            samples = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])  # type: ignore[arg-type]
            if class_names is None and spec == recorded_data.get("spec"):  # the training data names the classes
                class_names = bundle.classes or None
    spec_name = meta.get("model", {}).get("spec") or model_spec
    mean, std = recorded_data.get("mean"), recorded_data.get("std")
    # The un-namespaced keys are written as well, for readers that look them up by these names.
    legacy: dict[str, Any] = {"model": spec_name or "unknown", "input_shape": shape}
    if mean is not None and std is not None:
        legacy.update({"normalize_mean": mean, "normalize_std": std})
    return export_onnx(model, shape, dest, batch=batch, opset=opset, dynamic_batch=dynamic_batch, parity_inputs=samples,
                       model_spec=spec_name, mean=mean, std=std, class_names=class_names, metadata=legacy)


# What an existing --out may hold for --overwrite to replace it: an ONNX model, or data of no kind
# the tool writes (never a checkpoint, a report or a plot).
_REPLACEABLE = ("an ONNX model", "other data", "an empty file")


def _check_dest(dest: Path, checkpoint: Path, overwrite: bool) -> None:
    """An existing output (a finished export or any other file) is replaced only when asked, and
    never when it (or the record beside it) holds something else the tool wrote."""
    if dest.is_dir():
        raise UserError(f"--out {str(dest)!r} is a directory; give a file name such as {str(dest / 'model.onnx')!r}")
    if dest.resolve() == checkpoint.resolve():
        raise UserError(f"--out {str(dest)!r} is the checkpoint being exported; choose another --out")
    side = record_path(dest)
    if side.exists() and not {"onnx", "opset"} <= set(json_object(side) or {}):
        raise UserError(f"--out {str(dest)!r} would replace {str(side)!r} with its export record, and that file is not "
                        f"one (it holds {file_kind(side)}); choose another --out")
    if dest.exists() and file_kind(dest) not in _REPLACEABLE:
        raise UserError(f"--out {str(dest)!r} already exists and holds {file_kind(dest)}, not an ONNX model; "
                        "choose another --out")
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
