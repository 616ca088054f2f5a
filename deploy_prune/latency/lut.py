"""Latency lookup tables: per-layer configurations, their standalone ONNX graphs, and prediction
(``LatencyTable``, the one place latency is priced).

A *layer* is one conv or linear module of the model, with what the backend fuses into it in
the exported graph: BatchNorm is folded by the exporter, and the activation (Relu, Clip, ...)
and a residual Add that follow it are fused by ONNX Runtime/OpenVINO/TensorRT, so a layer's
standalone graph is ``Conv [+ Add] [+ activation]`` at the layer's real input size and batch.

Pruning changes only a layer's input and output channel counts. A *configuration* is a layer
at given counts; the LUT holds one measured entry per configuration on a grid of counts per
layer (``channel_grid``), and ``predict`` interpolates bilinearly between grid points. Layers
with identical shapes share entries.

Each entry stores the measured median and ``net_ms``, the median minus the backend's fixed cost
of one run (``overhead_graph``, timed in the same interleaved chunk), which a layer inside a
whole model does not pay. A target with ``layer_timing: counters`` (or ``auto``) also stores ``counter_ms``,
the backend's own per-node times of the layer's nodes in that graph (``own_counters``), which
leave out the layout reorders a standalone graph pays at its boundary and a whole model pays
once, and ``counter_net_ms``: the same less what the profiler itself adds to each node
(``with_probe``, measured in the same runs). Prediction uses ``predict_ms``: ``net_ms`` or
``counter_net_ms``, as the target chose (with ``auto``, the one whose calibration fits the
whole-model measurements better: ``profile.choose_entries``; the profile's ``entry_field``).

Prediction = sum of the layers' interpolated entries + the constant *remainder* (the part of
the measured whole-model latency the entries do not account for: pooling, reshapes, layout
reorders, the session's fixed cost, minus the standalone graphs' own boundary overheads).
A layer's entry is timed alone, its weights hot in the cache. Inside a model whose weights do
not fit in the cache (a core's L2 per thread; ``Target.cache_kib``), every run streams each layer's
weights in again: MobileNetV2 at 32x32 on one Intel core (2 MiB L2, 8.8 MB of weights) pays
about 0.03 ms per MB of weights on top of its hot entries (the in-model counters against the
entries, layer by layer, correlate with weight bytes at 0.88-0.94 above the cache and not below
it). So ``predict`` adds the *weight-streaming term* ``weight bytes x share streamed x ms_per_mb``,
with ``ms_per_mb`` fitted at profile time from the full model's own per-layer counters
(``profile.fit_stream``). The share streamed grows linearly from 0 at half the cache to 1 at 1.4x
the cache (``STREAM_RAMP``; activations are left out). A least-recently-used cache under a cyclic
sweep would switch from none to all at its size, but a real one does not (set-associative,
not strictly LRU, shared with activations, code and the other hyperthread, with an L3 behind
it): uniform MobileNetV2 variants from 0.6 to 5.7 MB of weights measured end to end fit this
ramp with a sixth of the step's squared error (``benchmarks/results/weight_stream_knee.md``:
relative SSE 0.018 against 0.115; the best ramp on that grid, 0.6x-1.3x, 0.014), and in the same
sweep the variant with 1.99 MB of weights, just under the 2 MiB L2, is fitted 22 % low by the step
and 2 % low by the ramp (``weight_stream_knee.json``). The allocator prices the term too
(``allocate.latency_cost``: a plan-wide term beside the layers', first order in the knapsack,
exact in the plan's total).

That "raw" prediction is exact at full width by construction; a linear *calibration*
``measured ~ a * layer_sum + b`` fitted on whole-model measurements of a few pruned variants
corrects how the layer sum scales (``profile`` fits it with ``validate.fit_calibration``; both
figures are always reported).

With ``profile --lowrank``, each plain conv also gets the two tables its factorised form needs
(``transforms.lowrank``: a k x k conv to the rank, nothing fused, then a 1 x 1 conv carrying the
layer's fused BatchNorm / Add / activation), over (inputs x ranks) and (ranks x outputs); the
halves ``X.0`` and ``X.1`` of a factorised layer ``X`` are priced from them.

This is one module, over the usual length, because it defines the table's format end to end: the
configuration key that names an entry (``Family.key``), the standalone graph that measures it
(``layer_graph``, ``with_probe``, ``overhead_graph``) and the interpolation and streaming term that
price from it (``LatencyTable``); a change to any one of them changes what the others read or write.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.graph import execution_order
from deploy_prune.io import read_json

SCHEMA_VERSION = 1
OPSET = 18
# The share of a model's weights a run streams in: 0 up to STREAM_RAMP[0] x the cache, 1 from
# STREAM_RAMP[1] x, linear between (module docstring; benchmarks/weight_stream_knee.py).
STREAM_RAMP = (0.5, 1.4)
ACTIVATIONS = ("Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "Tanh", "Elu", "Selu")


@dataclass(frozen=True)
class Family:
    """Everything about a layer except its channel counts."""

    op: str  # conv | linear
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1  # fixed group count; ignored when depthwise (groups = channels)
    depthwise: bool = False
    in_hw: tuple[int, int] = (1, 1)
    batch: int = 1
    residual: bool = False  # an Add of a same-shaped tensor is fused after the op
    act: str = ""  # activation op type, "" for none; Clip carries its bounds in act_args
    act_args: tuple[float, ...] = ()

    def key(self, cin: int, cout: int) -> str:
        """A stable, readable id of the configuration (also the LUT entry key)."""
        f = self
        return (f"{f.op}|k{f.kernel[0]}x{f.kernel[1]}|s{f.stride[0]}x{f.stride[1]}|p{f.padding[0]}x{f.padding[1]}"
                f"|d{f.dilation[0]}x{f.dilation[1]}|g{'dw' if f.depthwise else f.groups}|{f.in_hw[0]}x{f.in_hw[1]}"
                f"|b{f.batch}|{'res' if f.residual else 'nores'}|{f.act or 'none'}{list(f.act_args) if f.act_args else ''}"
                f"|{cin}x{cout}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Family:
        tup = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return Family(**{**d, **tup})

    def out_hw(self) -> tuple[int, int]:
        if self.op == "linear":
            return (1, 1)
        return tuple(  # type: ignore[return-value]
            (self.in_hw[i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1
            for i in range(2)
        )


@dataclass
class LayerSpec:
    """One prunable-or-not layer of the model as the LUT sees it."""

    name: str
    family: Family
    cin: int  # full width
    cout: int
    prunable_in: bool
    prunable_out: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family.as_dict(), "cin": self.cin, "cout": self.cout,
                "prunable_in": self.prunable_in, "prunable_out": self.prunable_out}


# ---------------------------------------------------------------------------------------------
# Which layers a model has, and what the exported graph fuses into each
# ---------------------------------------------------------------------------------------------
def onnx_layer_nodes(proto: onnx.ModelProto, order: list[tuple[str, nn.Module, torch.Size]]) -> dict[str, onnx.NodeProto] | None:
    """The ONNX Conv/Gemm/MatMul node of each module in ``order`` (execution order), or None when
    the k-th node's weight shape is not the k-th module's (an exporter that reorders, a module
    called twice)."""
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    if len(nodes) != len(order):
        return None
    for node, (_, mod, _) in zip(nodes, order, strict=True):
        w = inits.get(node.input[1])
        want = tuple(mod.weight.shape)  # type: ignore[arg-type]
        if w is None or (w != want and w[::-1] != want):
            return None
    return {name: node for node, (name, _, _) in zip(nodes, order, strict=True)}


def fused_patterns(proto: onnx.ModelProto, order: list[tuple[str, nn.Module, torch.Size]]) -> dict[str, tuple[bool, str, tuple[float, ...]]]:
    """(residual, activation, activation args) per module name, read off the exported graph.

    ONNX Conv/Gemm nodes appear in execution order, so the k-th one is the k-th module of
    ``order``; the weight shapes are checked, and on any mismatch (an exporter that reorders,
    a module called twice) every layer falls back to a plain op. An Add fed by two convs is
    attributed to the later one (the branch that finishes the block), as backends fuse it there.
    """
    g = proto.graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    consts.update({i.name: numpy_helper.to_array(i) for i in g.initializer if np.prod(i.dims) == 1})
    plain: dict[str, tuple[bool, str, tuple[float, ...]]] = {name: (False, "", ()) for name, _, _ in order}
    layer_nodes = onnx_layer_nodes(proto, order)
    if layer_nodes is None:
        return plain
    nodes = list(layer_nodes.values())
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for x in n.input:
            consumers.setdefault(x, []).append(n)
        for y in n.output:
            producer[y] = i

    def act_of(out: str) -> tuple[str, tuple[float, ...]]:
        cons = consumers.get(out, [])
        if len(cons) != 1 or cons[0].op_type not in ACTIVATIONS:
            return "", ()
        a = cons[0]
        args: tuple[float, ...] = ()
        if a.op_type == "Clip":
            args = tuple(float(consts[x]) if x in consts else float("nan") for x in a.input[1:3])
            if any(math.isnan(v) for v in args):
                return "", ()
        elif a.op_type in ("LeakyRelu", "HardSigmoid", "Elu"):
            args = tuple(float(at.f) for at in a.attribute if at.type == onnx.AttributeProto.FLOAT)
        return a.op_type, args

    out: dict[str, tuple[bool, str, tuple[float, ...]]] = {}
    for node, (name, _, _) in zip(nodes, order, strict=True):
        y = node.output[0]
        cons = consumers.get(y, [])
        adds = [c for c in cons if c.op_type == "Add"]
        residual = False
        act, args = act_of(y)
        if len(cons) == 1 and adds:
            add = adds[0]
            feeders = [producer.get(x, -1) for x in add.input]
            mine = producer[y]
            if mine == max(feeders):  # the later branch: the Add (and what follows it) fuses here
                residual = True
                act, args = act_of(add.output[0])
        out[name] = (residual, act, args)
    return out


def _dims(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def layer_specs(
    model: nn.Module, input_shape: tuple[int, ...] | list[int], batch: int, proto: onnx.ModelProto | None,
    prunable: Mapping[str, tuple[bool, bool]],
) -> list[LayerSpec]:
    """The LUT's view of every conv/linear layer (``prunable``: name -> (in, out) prunable)."""
    example = torch.zeros(batch, *input_shape)
    order = execution_order(model, example)
    patterns = fused_patterns(proto, order) if proto is not None else {}
    specs: dict[str, LayerSpec] = {}
    for name, mod, shape in order:
        if name in specs:
            continue
        residual, act, args = patterns.get(name, (False, "", ()))
        p_in, p_out = prunable.get(name, (False, False))
        if isinstance(mod, nn.Conv2d):
            if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                raise UserError(f"layer {name!r}: padding {mod.padding!r}/{mod.padding_mode} is not supported by the profiler; "
                                "use numeric zero padding or add the layer to --ignore")
            dw = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            fam = Family("conv", _dims(mod.kernel_size), _dims(mod.stride), _dims(mod.padding), _dims(mod.dilation),
                         1 if dw else mod.groups, dw, (int(shape[-2]), int(shape[-1])), batch, residual, act, args)
            specs[name] = LayerSpec(name, fam, mod.in_channels, mod.out_channels, p_in or (dw and p_out), p_out)
        else:
            rows = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
            fam = Family("linear", in_hw=(rows, 1), batch=batch, residual=residual, act=act, act_args=args)
            specs[name] = LayerSpec(name, fam, int(mod.in_features), int(mod.out_features), p_in, p_out)  # type: ignore[arg-type]
    return list(specs.values())


def current_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) channels of every conv/linear module as the model is now."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
    return out


def structure_signature(specs: list[LayerSpec]) -> str:
    """Hash of everything but channel counts: the same for a model and all its pruned variants."""
    text = json.dumps([[s.name, s.family.as_dict()] for s in specs], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def model_fingerprint(name: str, specs: list[LayerSpec], input_shape: list[int] | tuple[int, ...], batch: int) -> str:
    """File-name-safe id of the unpruned model at its input size and batch."""
    text = json.dumps([[s.name, s.family.as_dict(), s.cin, s.cout] for s in specs], sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name.split(":")[-1])[:40] or "model"
    return f"{safe}-{'x'.join(str(d) for d in input_shape)}-b{batch}-{digest}"


# ---------------------------------------------------------------------------------------------
# Grids and standalone graphs
# ---------------------------------------------------------------------------------------------
def channel_grid(full: int, prunable: bool, multiple: int = 1, step: int | None = None, max_points: int = 8,
                 narrow: Sequence[int] = ()) -> list[int]:
    """Channel counts at which a dimension is measured.

    Every count (multiple of the target's ``channel_multiple``) when that gives at most
    ``max_points`` values; otherwise ``step`` (default: the multiple of ``channel_multiple``
    that gives about ``max_points`` values; 8 is our choice, see ``benchmarks/lut_fidelity.py``
    for the accuracy it buys). The full width is always included, and so is every ``narrow``
    width below the multiple (``widths``): a group may keep one only at its measured cost, which
    interpolation between aligned points would not give (unaligned kernels are other kernels).
    """
    if not prunable or full <= 1:
        return [full]
    m = max(1, multiple)
    if step is None:
        step = m * max(1, math.ceil(full / m / max_points))
    step = m * max(1, math.ceil(step / m))
    pts = set(range(step, full, step)) | {min(m, full), full} | {n for n in narrow if n < min(m, full)}
    return sorted(p for p in pts if 1 <= p <= full)


def layer_configs(spec: LayerSpec, multiple: int = 1, step: int | None = None, max_points: int = 8,
                  narrow: Sequence[int] = ()) -> list[tuple[int, int]]:
    """The (cin, cout) grid of a layer; depthwise convs have cin == cout."""
    if spec.family.depthwise:
        return [(c, c) for c in channel_grid(spec.cout, spec.prunable_out, multiple, step, max_points, narrow)]
    g = spec.family.groups
    cins = [c for c in channel_grid(spec.cin, spec.prunable_in, max(multiple, g), step, max_points, narrow) if c % g == 0]
    couts = [c for c in channel_grid(spec.cout, spec.prunable_out, max(multiple, g), step, max_points, narrow) if c % g == 0]
    return [(ci, co) for ci in cins for co in couts]


def _act_nodes(f: Family, x: str, y: str, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    if not f.act:
        return [helper.make_node("Identity", [x], [y])]
    if f.act == "Clip":
        inits += [numpy_helper.from_array(np.array(f.act_args[0], np.float32), "clip_min"),
                  numpy_helper.from_array(np.array(f.act_args[1], np.float32), "clip_max")]
        return [helper.make_node("Clip", [x, "clip_min", "clip_max"], [y], name="act")]
    attrs: dict[str, float] = {}
    if f.act in ("LeakyRelu", "Elu") and f.act_args:
        attrs = {"alpha": f.act_args[0]}
    elif f.act == "HardSigmoid" and len(f.act_args) == 2:
        attrs = {"alpha": f.act_args[0], "beta": f.act_args[1]}
    return [helper.make_node(f.act, [x], [y], name="act", **attrs)]  # type: ignore[arg-type]


def layer_graph(f: Family, cin: int, cout: int, seed: int = 0) -> bytes:
    """A standalone ONNX model of one layer configuration, as the backend runs it in the model."""
    rng = np.random.default_rng(seed)
    b = f.batch
    inputs = []
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    if f.op == "conv":
        groups = cin if f.depthwise else f.groups
        kh, kw = f.kernel
        w = rng.standard_normal((cout, cin // groups, kh, kw), dtype=np.float32) * 0.05
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(cout, np.float32), "B")]
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, cin, *f.in_hw]))
        ph, pw = f.padding
        nodes.append(helper.make_node("Conv", ["x", "W", "B"], ["y0"], name="layer", kernel_shape=[kh, kw], strides=list(f.stride),
                                      pads=[ph, pw, ph, pw], dilations=list(f.dilation), group=groups))
        out_shape = [b, cout, *f.out_hw()]
    else:
        rows = f.in_hw[0]
        w = rng.standard_normal((cout, cin), dtype=np.float32) * 0.05
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(cout, np.float32), "B")]
        if rows == 1:
            inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, cin]))
            nodes.append(helper.make_node("Gemm", ["x", "W", "B"], ["y0"], name="layer", transB=1))
            out_shape = [b, cout]
        else:
            inits[0] = numpy_helper.from_array(np.ascontiguousarray(w.T), "W")
            inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, rows, cin]))
            nodes += [helper.make_node("MatMul", ["x", "W"], ["m"], name="layer"), helper.make_node("Add", ["m", "B"], ["y0"], name="bias")]
            out_shape = [b, rows, cout]
    last = "y0"
    if f.residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, out_shape))
        nodes.append(helper.make_node("Add", [last, "r"], ["y1"], name="residual"))
        last = "y1"
    nodes += _act_nodes(f, last, "y", inits)
    graph = helper.make_graph(nodes, "layer", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="deploy-prune")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def node_key(counter_name: str) -> str:
    """The ONNX node or tensor name a backend's counter stands for: ONNX Runtime names NCHWc kernels
    ``<tensor>_nchwc``, OpenVINO adds ``/<suffix>`` to the node it fused into."""
    return counter_name.removesuffix("_nchwc").split("/")[0]


PROBE = "probe"  # name of the probe node and prefix of its tensors (``with_probe``)


def with_probe(graph: bytes) -> bytes:
    """``graph`` plus a probe: the cheapest conv a backend runs (one channel, one pixel, 1 x 1) on
    an input and output of its own, beside the rest of the graph.

    Its counter is what the backend's profiler adds to every node it times, measured in the same
    runs as the graph's own nodes (ONNX Runtime builds the event's strings inside the timed span:
    3-8 us per node on a 2-core Intel Xeon (AVX-512), varying with the machine's state, and more than a narrow layer
    of MobileNetV2 at 32x32 computes); ``profile`` subtracts it from each node of an entry.
    """
    proto = onnx.load_from_string(graph)
    g = proto.graph
    g.input.append(helper.make_tensor_value_info(f"{PROBE}_x", TensorProto.FLOAT, [1, 1, 1, 1]))
    g.output.append(helper.make_tensor_value_info(f"{PROBE}_y", TensorProto.FLOAT, [1, 1, 1, 1]))
    g.initializer.append(numpy_helper.from_array(np.full((1, 1, 1, 1), 0.5, np.float32), f"{PROBE}_w"))
    g.node.append(helper.make_node("Conv", [f"{PROBE}_x", f"{PROBE}_w"], [f"{PROBE}_y"], name=PROBE))
    return proto.SerializeToString()


def _is_probe(counter_name: str) -> bool:
    return node_key(counter_name) in (PROBE, f"{PROBE}_y")


def probe_ms(counters: Mapping[str, float]) -> float:
    """The probe's own counter (``with_probe``): what the profiler adds to one node."""
    return sum(ms for name, ms in counters.items() if _is_probe(name) and not name.startswith("Reorder"))


def net_of_probe(counters: Mapping[str, float]) -> dict[str, float]:
    """Counters of a graph run ``with_probe``, less the probe's counter per node, the probe left out.

    Not clipped: a node that computes in less than the profiler's per-node cost reads below the
    probe as often as above it, so clipping each node at 0 would bias narrow layers up. Clip a
    layer's sum instead, as ``profile.chunk_counters`` does for the entries."""
    floor = probe_ms(counters)
    return {n: ms - floor for n, ms in counters.items() if not _is_probe(n)}


def own_names(graph: bytes) -> frozenset[str]:
    """Names of a layer graph's nodes and of the tensors they write (what ``own_counters`` keeps)."""
    proto = onnx.load_from_string(graph)
    return frozenset({n.name for n in proto.graph.node} | {y for n in proto.graph.node for y in n.output})


def own_counters(graph: bytes | frozenset[str], counters: Mapping[str, float]) -> dict[str, float]:
    """The counters of a standalone layer graph (or its ``own_names``) that are the layer's own nodes.

    Backends name what they ran after the ONNX node (OpenVINO, torch) or after the tensor it
    writes (ONNX Runtime's ``<tensor>_nchwc``); layout reorders (named ``Reorder...`` by every
    backend's ``layer_ms``) are what the graph's boundary costs, which the layer inside a model
    does not pay; the probe of ``with_probe`` is not the layer's."""
    own = own_names(graph) if isinstance(graph, bytes) else graph
    return {name: ms for name, ms in counters.items()
            if node_key(name) in own and not name.startswith("Reorder") and not _is_probe(name)}


def overhead_graph() -> bytes:
    """A graph that computes nothing (Identity on one float): its latency is the backend's fixed
    cost of one run (feeding, dispatch, fetching), which every one-layer graph pays but a
    layer inside a whole model does not."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead", [x], [y]),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="deploy-prune")
    model.ir_version = 8
    return model.SerializeToString()


def lowrank_families(spec: LayerSpec) -> tuple[Family, Family] | None:
    """The two convs a factorised layer runs as (``transforms.lowrank``): a k x k conv from the
    layer's inputs to the rank, with nothing fused, then a 1 x 1 conv to its outputs carrying
    what the layer had fused (folded BatchNorm, residual Add, activation). None for layers that
    cannot be factorised (linear, grouped and depthwise convs)."""
    f = spec.family
    if f.op != "conv" or f.depthwise or f.groups != 1:
        return None
    first = Family("conv", f.kernel, f.stride, f.padding, f.dilation, 1, False, f.in_hw, f.batch)
    second = Family("conv", (1, 1), (1, 1), (0, 0), (1, 1), 1, False, f.out_hw(), f.batch, f.residual, f.act, f.act_args)
    return first, second


def lowrank_configs(spec: LayerSpec, grid_in: list[int], grid_out: list[int], multiple: int = 1, step: int | None = None,
                    max_points: int = 8) -> tuple[list[int], list[tuple[Family, int, int]]] | None:
    """Rank grid and the (family, cin, cout) entries a factorised layer needs: the first conv over
    (inputs x ranks), the second over (ranks x outputs)."""
    fams = lowrank_families(spec)
    if fams is None:
        return None
    first, second = fams
    from deploy_prune.transforms.lowrank import rank_bound

    ranks = channel_grid(rank_bound(spec.cin, spec.cout, spec.family.kernel), True, multiple, step, max_points)
    return ranks, [(first, ci, r) for ci in grid_in for r in ranks] + [(second, r, co) for r in ranks for co in grid_out]


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------
def _bracket(grid: list[int], v: Any) -> tuple[int, int, Any]:
    """Indices of the grid points around ``v`` and the weight of the upper one. ``v`` may be a
    torch scalar: the weight is then differentiable in it (DF learns against the LUT)."""
    x = float(v.detach()) if hasattr(v, "detach") else float(v)
    if x >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    if x <= grid[0]:
        if len(grid) == 1:
            return 0, 0, 0.0
        return 0, 1, (v - grid[0]) / (grid[1] - grid[0])  # linear extrapolation below the grid
    j = max(1, bisect.bisect_left(grid, x))  # on a grid point: the segment below it (weight 1)
    return j - 1, j, (v - grid[j - 1]) / (grid[j] - grid[j - 1])


def interpolate(entries: Mapping[str, Any], fam: Family, grid_in: list[int], grid_out: list[int], cin: Any, cout: Any) -> Any:
    """Bilinear interpolation of a family's entries over its (cin, cout) grid (depthwise: cout);
    counts may be torch scalars, and the result is then differentiable in them."""

    def val(ci: int, co: int) -> float:
        e = entries[fam.key(ci, co)]
        return float(e.get("predict_ms", e.get("net_ms", e["median_ms"])))

    if fam.depthwise:
        i0, i1, t = _bracket(grid_out, cout)
        return (1 - t) * val(grid_out[i0], grid_out[i0]) + t * val(grid_out[i1], grid_out[i1])
    a0, a1, ta = _bracket(grid_in, cin)
    b0, b1, tb = _bracket(grid_out, cout)
    return ((1 - ta) * (1 - tb) * val(grid_in[a0], grid_out[b0]) + ta * (1 - tb) * val(grid_in[a1], grid_out[b0])
            + (1 - ta) * tb * val(grid_in[a0], grid_out[b1]) + ta * tb * val(grid_in[a1], grid_out[b1]))


def layer_grid(profile: Mapping[str, Any], name: str) -> tuple[Family, list[int], list[int], int, int] | None:
    """(family, grid_in, grid_out, full cin, full cout) of layer ``name``; the halves of a
    factorised layer ``X`` (``X.0``, ``X.1``) use ``X``'s low-rank tables. None when unknown."""
    layers = profile["layers"]
    if name in layers:
        lay = layers[name]
        return Family.from_dict(lay["family"]), lay["grid_in"], lay["grid_out"], lay["cin"], lay["cout"]
    parent, _, half = name.rpartition(".")
    lr = layers.get(parent, {}).get("lowrank")
    if lr is None or half not in ("0", "1"):
        return None
    lay, ranks = layers[parent], lr["grid_rank"]
    if half == "0":
        return Family.from_dict(lr["first"]), lay["grid_in"], ranks, lay["cin"], ranks[-1]
    return Family.from_dict(lr["second"]), ranks, lay["grid_out"], ranks[-1], lay["cout"]


def layer_ms(profile: Mapping[str, Any], name: str, cin: int, cout: int) -> float:
    """Interpolated latency of layer ``name`` at (cin, cout) channels from the profile's grid."""
    table = layer_grid(profile, name)
    if table is None:
        raise UserError(f"the profile has no entry for layer {name!r}; it was made for another model "
                        "(or without --lowrank for a factorised one): profile this model")
    fam, gin, gout, full_in, full_out = table
    if cin > full_in or cout > full_out:
        raise UserError(f"layer {name!r} has {cin}x{cout} channels, more than the {full_in}x{full_out} "
                        "the profile was made for; profile this model instead")
    return interpolate(profile["entries"], fam, gin, gout, cin, cout)


def _bad_number(v: Any, non_negative: bool) -> bool:
    return (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            or (non_negative and v < 0))


def entry_problem(entry: Any) -> str | None:
    """What is wrong with one LUT entry, or None: an entry is a mapping whose times (every
    ``*_ms`` field) are finite numbers >= 0, and holds the field ``interpolate`` reads."""
    if not isinstance(entry, Mapping):
        return f"is a {type(entry).__name__}, not a mapping"
    for k, v in entry.items():
        if k.endswith("_ms") and v is not None and _bad_number(v, non_negative=True):
            return f"{k} is {v!r}; a time must be a finite number >= 0"
    read = next((f for f in ("predict_ms", "net_ms", "median_ms") if f in entry), None)
    if read is None or entry[read] is None:
        return "has no predict_ms, net_ms or median_ms"
    return None


def table_problem(data: Mapping[str, Any]) -> str | None:
    """What makes ``data`` unusable as a latency table, or None: a malformed layer, an entry a
    layer's grid needs that is missing or not a finite time >= 0 (``entry_problem``), or a
    non-finite remainder, calibration or weight-streaming figure. The first problem found."""
    entries, layers = data.get("entries"), data.get("layers")
    if not isinstance(entries, Mapping) or not isinstance(layers, Mapping):
        return "it has no entries or layers"
    for key, e in entries.items():
        why = entry_problem(e)
        if why is not None:
            return f"entry {key!r} {why}"
    for name, lay in layers.items():
        try:
            fam = Family.from_dict(lay["family"])
            tables = [(fam, list(lay["grid_in"]), list(lay["grid_out"]))]
            lr = lay.get("lowrank")
            if lr is not None:
                ranks = list(lr["grid_rank"])
                tables += [(Family.from_dict(lr["first"]), tables[0][1], ranks),
                           (Family.from_dict(lr["second"]), ranks, tables[0][2])]
        except (KeyError, TypeError, ValueError):
            return f"layer {name!r} is malformed (family, grid_in or grid_out)"
        for f, gin, gout in tables:
            if not gin or not gout or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in gin + gout):
                return f"layer {name!r} has a grid that is not a list of channel counts >= 1"
            pairs = [(c, c) for c in gout] if f.depthwise else [(ci, co) for ci in gin for co in gout]
            missing = next((f.key(ci, co) for ci, co in pairs if f.key(ci, co) not in entries), None)
            if missing is not None:
                return f"layer {name!r} lacks its entry {missing!r}"
    if _bad_number(data.get("remainder_ms", 0.0), non_negative=False):
        return f"remainder_ms is {data.get('remainder_ms')!r}, not a finite number"
    cal = data.get("calibration") or {}
    for k in ("a", "b"):
        if k in cal and _bad_number(cal[k], non_negative=False):
            return f"calibration {k} is {cal[k]!r}, not a finite number"
    ws = data.get("weight_stream") or {}
    if ws.get("ms_per_mb") is not None:
        if _bad_number(ws["ms_per_mb"], non_negative=True):
            return f"weight_stream ms_per_mb is {ws['ms_per_mb']!r}; it must be a finite number >= 0"
        if _bad_number(ws.get("cache_bytes"), non_negative=True) or not ws["cache_bytes"] > 0:
            return f"weight_stream cache_bytes is {ws.get('cache_bytes')!r}; it must be a number > 0"
    return None


def check_table(data: Mapping[str, Any], source: str) -> None:
    """Refuse a latency table that ``table_problem`` finds fault with, in one line naming the
    file and what is wrong; the fix is to profile again."""
    why = table_problem(data)
    if why is not None:
        raise UserError(f"latency profile {source!r} is unusable: {why}; delete it and profile again "
                        "(deploy-prune profile, or rerun compress, which profiles when none is found)")


class LatencyTable:
    """A target's latency table of one model (the profile file's content): the one place latency
    is priced. ``predict`` (a whole model) and the allocator's cost model (``allocate.latency_cost``,
    a plan's widths) both compose a price as ``a * (layer sum + weight streaming) + b`` from its
    ``layer_cost``, ``stream_cost`` and ``calibration``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        if "entries" not in data or "layers" not in data:
            raise UserError("not a deploy-prune latency table (no entries or layers); make one with deploy-prune profile")
        self.data = data

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """A profile file written by ``deploy-prune profile``, checked (``check_table``)."""
        data = read_json(path, what="deploy-prune latency table", fix="delete it and profile again")
        if not isinstance(data, dict):
            raise UserError(f"{str(path)!r} is not a deploy-prune latency table; make one with deploy-prune profile")
        check_table(data, str(path))
        return cls(data)

    @property
    def fingerprint(self) -> str:
        return str(self.data.get("fingerprint", ""))

    @property
    def calibration(self) -> tuple[float, float]:
        """``(a, b)`` of ``a * sum + b``: the profile's fit, or (1, remainder) without one (or for a
        degenerate fit, a <= 0, which noise can give)."""
        cal = self.data.get("calibration") or {}
        a = float(cal.get("a", 1.0))
        if not cal or a <= 0:
            return 1.0, float(self.data.get("remainder_ms", 0.0))
        return a, float(cal["b"])

    def layer_cost(self, name: str, cin: int, cout: int) -> float:
        """Interpolated ms of layer ``name`` at (cin, cout) channels."""
        return layer_ms(self.data, name, cin, cout)

    def stream_cost(self, total_bytes: float) -> float:
        """The weight-streaming term of ``total_bytes`` of conv/linear weights."""
        return stream_ms(total_bytes, self.data.get("weight_stream"))

    def price(self, layer_sum: float, stream: float) -> float:
        """The calibrated price of a model whose layers sum to ``layer_sum`` and stream ``stream``."""
        a, b = self.calibration
        return a * (layer_sum + stream) + b

    def check(self, model: nn.Module, measure_missing: Any = None) -> list[str]:
        """Layers of ``model`` the table lacks (an error unless ``measure_missing`` can time them);
        a layer of the table that ``model`` lacks is an error: the table is another model's."""
        widths = current_widths(model)
        missing = [n for n in widths if layer_grid(self.data, n) is None]
        if missing and measure_missing is None:
            raise UserError(f"the profile has no entry for layer(s) {', '.join(missing[:5])}; it was made for another "
                            "model: run deploy-prune profile for this one")
        gone = [n for n in self.data["layers"] if n not in widths and f"{n}.0" not in widths]
        if gone:
            raise UserError(f"layer(s) {', '.join(gone[:5])} of the profile are not in this model; profile it again")
        return missing

    def predict(self, model: nn.Module, measure_missing: Any = None) -> dict[str, Any]:
        """Predicted latency of ``model`` (any pruned variant of the profiled model), in ms.

        Returns ``raw_ms`` (layer sum + remainder), ``calibrated_ms`` (``price``), ``layer_sum_ms``
        and ``per_layer``. A conv/linear layer the table lacks is measured on the spot by
        ``measure_missing(name, module)`` when given, else it is a clear error."""
        missing = self.check(model, measure_missing)
        per_layer = {name: self.layer_cost(name, cin, cout) if name not in missing else float(measure_missing(name, model))
                     for name, (cin, cout) in current_widths(model).items()}
        stream = weight_stream_ms(model, self.data.get("weight_stream"))
        s = sum(per_layer.values()) + stream
        return {"layer_sum_ms": s, "raw_ms": s + float(self.data.get("remainder_ms", 0.0)),
                "calibrated_ms": self.price(sum(per_layer.values()), stream),
                "per_layer": per_layer, "weight_stream_ms": stream, "measured_on_the_spot": missing}


def predict(model: nn.Module, profile: Mapping[str, Any] | LatencyTable, measure_missing: Any = None) -> dict[str, Any]:
    """``LatencyTable(profile).predict(model)``: the predicted latency of ``model`` in ms."""
    table = profile if isinstance(profile, LatencyTable) else LatencyTable(profile)
    return table.predict(model, measure_missing)


def weight_bytes(model: nn.Module, bytes_per_weight: int = 4) -> dict[str, int]:
    """Bytes of every conv/linear layer's weights (what a run streams in when they are cold)."""
    return {n: m.weight.numel() * bytes_per_weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def streamed_share(total_bytes: float, ws: Mapping[str, Any]) -> float:
    """Share of ``total_bytes`` of weights a run streams in (module docstring). A profile made
    before the ramp stores none and keeps the step it was made with: all above the cache, else none."""
    if ws.get("every_byte"):  # a term fitted on whole models: every weight byte costs (profile.whole_model_weight_term)
        return 1.0
    cache = float(ws["cache_bytes"])
    lo, hi = ws.get("ramp") or (1.0, 1.0)
    if hi <= lo:
        return 1.0 if total_bytes > lo * cache else 0.0
    return min(max((total_bytes - lo * cache) / ((hi - lo) * cache), 0.0), 1.0)


def stream_ms(total_bytes: float, ws: Mapping[str, Any] | None) -> float:
    """The weight-streaming term (module docstring) of ``total_bytes`` of weights: 0 when the
    profile has no term or the weights fit in the cache."""
    if not ws or not ws.get("ms_per_mb"):
        return 0.0
    return total_bytes / 1e6 * float(ws["ms_per_mb"]) * streamed_share(total_bytes, ws)


def weight_stream_ms(model: nn.Module, ws: Mapping[str, Any] | None) -> float:
    """``stream_ms`` of ``model``'s conv/linear weights."""
    if not ws or not ws.get("ms_per_mb"):
        return 0.0
    return stream_ms(sum(weight_bytes(model, int(ws.get("bytes_per_weight", 4))).values()), ws)
