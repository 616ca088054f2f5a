"""ONNX exports for timing, shared by every model of the same architecture in this process.

Latency depends on a graph's operators and shapes, not on its weights, and torch's exporter
costs about a second a model. ``timing_onnx`` returns the bytes of an earlier export when the
model has the same architecture (``architecture_key``), so the baseline, a width measured again
and the variants a profile and a loop share are exported once per process. The bytes may carry
another model's weights: they are for timing only, never for scoring or shipping
(``onnx_bytes`` / ``export_onnx`` are). A model with forward hooks is exported every time.
Written by hand because neither torch nor onnx caches exports.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import nn

from deploy_prune.export import DEFAULT_OPSET, onnx_bytes

CACHE_BYTES = 256 << 20  # the most ONNX bytes held; least recently used go first
_MODULE_STATE = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (parameters, hooks, ...)
_FX_STATE = _MODULE_STATE | frozenset(vars(torch.fx.GraphModule(nn.Module(), torch.fx.Graph())))  # its graph is its code
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)

_cache: OrderedDict[Hashable, bytes] = OrderedDict()
_held = 0
_lock = threading.Lock()


def _frozen(v: Any) -> Hashable:
    """A hashable stand-in for an attribute that may shape the exported graph."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, torch.Tensor):  # values are weights or constants: only the shape shapes the graph
        return ("tensor", tuple(v.shape), v.dtype)
    if isinstance(v, tuple | list):
        return (type(v), tuple(_frozen(x) for x in v))
    if isinstance(v, dict):
        return (dict, tuple(sorted((repr(k), _frozen(x)) for k, x in v.items())))
    if isinstance(v, nn.Module):  # a module held outside _modules: its own entry decides nothing more
        return ("module", type(v))
    if callable(v):
        try:
            hash(v)
            return ("callable", v)
        except TypeError:
            return ("callable", id(v), repr(v))
    return (type(v), repr(v))  # a default repr names the object's address: such a model never matches another


def architecture_key(model: nn.Module, shape: Sequence[int], opset: int = DEFAULT_OPSET) -> Hashable | None:
    """What decides the graph ``model`` exports to at input ``shape``: every module's class (an
    fx ``GraphModule``'s code), its plain attributes and its tensors' shapes and dtypes, but not
    its train/eval mode (exports run in eval mode). None when it cannot be decided: forward hooks
    change what runs."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return None
    parts: list[Hashable] = [tuple(int(d) for d in shape), opset]
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        fx = isinstance(m, torch.fx.GraphModule)
        kind: Any = ("fx", m.code) if fx else type(m)
        own = _FX_STATE if fx else _MODULE_STATE
        attrs = tuple(sorted((k, _frozen(v)) for k, v in vars(m).items() if k not in own))
        tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in (*m.named_parameters(recurse=False),
                                                                 *m.named_buffers(recurse=False)))
        parts.append((name, kind, attrs, tensors))
    return tuple(parts)


def timing_onnx(model: nn.Module, input_shape: Sequence[int], batch: int = 1, opset: int = DEFAULT_OPSET) -> bytes:
    """``model`` as ONNX bytes at ``[batch, *input_shape]`` for timing: an earlier export of the
    same architecture when this process holds one (its weights may be another model's), else a
    copy of ``model`` exported in eval mode (``model`` itself is left as it is)."""
    global _held
    key = architecture_key(model, (batch, *input_shape), opset)
    with _lock:
        blob = _cache.get(key) if key is not None else None
        if blob is not None:
            _cache.move_to_end(key)
            return blob
    blob = onnx_bytes(copy.deepcopy(model).cpu(), tuple(input_shape), batch, opset)
    if key is None:
        return blob
    with _lock:
        if key not in _cache and len(blob) <= CACHE_BYTES:
            _cache[key] = blob
            _held += len(blob)
            while _held > CACHE_BYTES:
                _held -= len(_cache.popitem(last=False)[1])
    return blob
