"""A backend's own per-node counters, attributed to the model's layers, beside the LUT's entries.

Backends name what they executed after their own fusions, so each name is traced back to an
ONNX node and from there to a module (``lut.onnx_layer_nodes``):

* OpenVINO and torch (onnx2torch) keep the ONNX node names;
* ONNX Runtime's NCHWc kernels are named after the tensor they write (``relu_3_nchwc``): the
  writer of that tensor is followed back through fused activations and residual Adds (at an Add,
  the later-finishing conv, as ``lut.fused_patterns`` attributes it) to the Conv that ran them.

What cannot be traced (layout reorders, pooling, the head's reshape) is summed as ``(other)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import onnx
import torch
from torch import nn

from deploy_prune.graph import execution_order
from deploy_prune.latency.lut import ACTIVATIONS, node_key, onnx_layer_nodes

OTHER = "(other)"


def node_to_layer(proto: onnx.ModelProto, model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """ONNX node name -> module name for every conv/linear node, plus tensor name -> module name
    for the tensors a fused chain starting at that node writes (for runtimes that name by tensor)."""
    layers = onnx_layer_nodes(proto, execution_order(model, example))
    if layers is None:
        return {}
    by_node = {n.name: layer for layer, n in layers.items()}
    producer = {y: n for n in proto.graph.node for y in n.output}
    index = {n.name: i for i, n in enumerate(proto.graph.node)}
    out = dict(by_node)
    for n in proto.graph.node:
        start: onnx.NodeProto | None = n
        while start is not None and start.name not in by_node:
            if start.op_type in ACTIVATIONS:
                start = producer.get(start.input[0])
            elif start.op_type == "Add":
                feeders = [producer[x] for x in start.input if x in producer and producer[x].name in by_node]
                start = max(feeders, key=lambda f: index[f.name]) if feeders else None
            else:
                start = None
        if start is not None:  # runtimes that run the fused op alone name it by node or by output
            for key in (n.name, *n.output):
                out.setdefault(key, by_node[start.name])
    return out


def attribute(counters: Mapping[str, float], names: Mapping[str, str]) -> dict[str, float]:
    """Sum a backend's per-node ms into layers (``names`` from ``node_to_layer``); the rest is ``(other)``."""
    out: dict[str, float] = {}
    for node, ms in counters.items():
        layer = names.get(node_key(node), OTHER)
        out[layer] = out.get(layer, 0.0) + ms
    return out


def compare(per_layer_lut: Mapping[str, float], per_layer_counter: Mapping[str, float]) -> dict[str, Any]:
    """Per-layer ratios LUT / counter and their spread (layers present in both)."""
    import numpy as np
    from scipy.stats import spearmanr

    common = [n for n in per_layer_lut if n in per_layer_counter and per_layer_counter[n] > 0]
    ratios = np.array([per_layer_lut[n] / per_layer_counter[n] for n in common])
    rho = float(spearmanr([per_layer_lut[n] for n in common], [per_layer_counter[n] for n in common])[0]) if len(common) > 2 else float("nan")
    return {
        "layers_compared": len(common), "layers_in_lut": len(per_layer_lut),
        "median_ratio": float(np.median(ratios)) if len(ratios) else float("nan"),
        "median_abs_dev_pct": float(np.median(np.abs(ratios - 1)) * 100) if len(ratios) else float("nan"),
        "spearman": rho,
    }
