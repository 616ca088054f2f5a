"""Which channels hang together: prunable groups on torch-pruning's ``DependencyGraph``.

A *group* is a set of coupled channels that must be removed together: a conv's output
channels with its BatchNorm and every layer that consumes them, including all convs tied
by residual additions (one group per ResNet stage), concatenations and depthwise convs.
Each group is named after its root layer (the first conv/linear of the group in module
order), which stays the same after pruning, so plans and reports can refer to it.

The model's output layer and user-listed layers (``ignore``) are never pruned.

FLOPs here are multiply-accumulates (MACs) of conv and linear layers, the convention of the
pruning literature (ResNet-56 = 125 M "FLOPs"); torch-pruning's counter computes the totals.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.splits import forward_with, separate_splits
from deploy_prune.widths import WidthSpace

PRUNABLE = (nn.Conv2d, nn.Linear)


@dataclass
class LayerInfo:
    """Shape and cost of one conv or linear layer, as seen in a forward pass."""

    name: str
    kind: str  # conv | linear
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    flops: int  # MACs
    params: int


@dataclass
class GroupInfo:
    """One prunable group: its channel count, the layers it touches and what they cost."""

    name: str
    channels: int
    out_layers: list[str] = field(default_factory=list)  # lose output channels
    in_layers: list[str] = field(default_factory=list)  # lose input channels
    in_counts: dict[str, int] = field(default_factory=dict)  # in-layer -> its inputs that are this group's channels
    norm_layers: list[str] = field(default_factory=list)
    flops: int = 0  # MACs of every conv/linear the group touches
    params: int = 0
    in_hw: tuple[int, int] = (1, 1)  # input spatial size of the root layer

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _depthwise(li: LayerInfo) -> bool:
    return li.groups > 1 and li.groups == li.in_channels == li.out_channels


def layer_table(model: nn.Module, example: torch.Tensor) -> dict[str, LayerInfo]:
    """Per conv/linear layer: channels, kernel, stride, spatial sizes, MACs and params."""
    names = {m: n for n, m in model.named_modules()}
    table: dict[str, LayerInfo] = {}

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = inp[0]
        name = names[mod]
        params = sum(p.numel() for p in mod.parameters(recurse=False))
        if isinstance(mod, nn.Conv2d):
            oh, ow = out.shape[-2:]
            kh, kw = mod.kernel_size
            macs = oh * ow * mod.out_channels * (mod.in_channels // mod.groups) * kh * kw
            table[name] = LayerInfo(name, "conv", mod.in_channels, mod.out_channels, (kh, kw),
                                    tuple(mod.stride), mod.groups, tuple(x.shape[-2:]), (oh, ow), macs, params)  # type: ignore[arg-type]
        elif isinstance(mod, nn.Linear):
            rows = x.numel() // x.shape[-1] // x.shape[0]
            table[name] = LayerInfo(name, "linear", mod.in_features, mod.out_features, (1, 1), (1, 1), 1,
                                    (1, 1), (1, 1), rows * mod.in_features * mod.out_features, params)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE)]
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(example)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return table


def execution_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, torch.Size]]:
    """Conv2d/Linear modules in the order a forward pass runs them, with their input shapes."""
    names = {m: n for n, m in model.named_modules()}
    order: list[tuple[str, nn.Module, torch.Size]] = []
    forward_with(model, example, [m.register_forward_pre_hook(lambda m, i: order.append((names[m], m, i[0].shape)))
                                  for m in model.modules() if isinstance(m, PRUNABLE)])
    return order


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The conv/linear layers whose output channels are the model's outputs: walking back from
    every output (a tensor, or each tensor of a tuple, list or dict) through everything but another
    trainable conv/linear. A layer with frozen weights is a fixed operation (a detector's DFL
    decoding) and is walked through, so the layers feeding it are outputs too. Where autograd
    cannot follow the forward (the dependency graph then names the culprit), the last layer run."""
    made: dict[Any, nn.Module] = {}

    def hook(m: nn.Module, i: Any, o: Any) -> None:
        if isinstance(o, torch.Tensor) and o.grad_fn is not None:
            made[o.grad_fn] = m

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE)]
    try:
        with torch.enable_grad():
            out = model.eval()(example.detach().clone().requires_grad_(True))
    except Exception:
        out = None
    finally:
        for h in handles:
            h.remove()
    flat, _ = torch.utils._pytree.tree_flatten(out)
    todo = [t.grad_fn for t in flat if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen, found = set(todo), list[nn.Module]()
    while todo:
        fn = todo.pop()
        m = made.get(fn)
        if m is not None and any(p.requires_grad for p in m.parameters(recurse=False)):
            if not any(m is f for f in found):
                found.append(m)
            continue
        for nxt, _ in fn.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return found or [m for _, m, _ in execution_order(model, example)[-1:]]


def _pop(stack: list[str]) -> None:
    """Forward hook body: a hook must return None, or its value replaces the module's output."""
    if stack:
        stack.pop()


def _graph_breakers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Modules whose output leaves the autograd graph although their input is in it (a NumPy
    round trip, ``.detach()``, a non-tensor output): torch-pruning traces through autograd."""
    found: list[str] = []

    def check(name: str) -> Any:
        def hook(m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            fed = any(isinstance(t, torch.Tensor) and t.requires_grad for t in inp)
            if fed and not (isinstance(out, torch.Tensor) and out.requires_grad) and not list(m.children()):
                found.append(name)
        return hook

    stack: list[str] = []
    hooks = [h for n, m in model.named_modules() if n for h in (
        m.register_forward_pre_hook(lambda m, i, n=n: stack.append(n)),
        m.register_forward_hook(lambda m, i, o: _pop(stack)),
        m.register_forward_hook(check(n)))]
    try:
        with torch.enable_grad():
            model(example.clone().requires_grad_(True))
    except Exception:  # with gradients on, the forward itself fails: the innermost open module
        return stack[-1:]
    finally:
        for h in hooks:
            h.remove()
    return found


class _Opaque(torch.autograd.Function):
    """A unit's output as one autograd node fed by its input alone, so torch-pruning's trace sees
    the unit as a single layer and never walks its inside."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:  # type: ignore[override]
        return None, None


@contextlib.contextmanager
def _opaque(units: list[nn.Module]) -> Iterator[None]:
    """While tracing, each unit (a module marked ``prune_as_unit``: an attention block whose heads
    are not yet cut) runs as one opaque node and records its channels for ``_UnitPruner``."""
    def forward(m: nn.Module, run: Any) -> Any:
        def opaque(x: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
            with torch.no_grad():
                out = run(x, *rest, **kw)
            m.__dict__["_unit_channels"] = (int(x.shape[1]), int(out.shape[1]))
            return _Opaque.apply(x, out)  # type: ignore[no-any-return]
        return opaque

    own = {id(m): vars(m).get("forward") for m in units}  # a forward set on the instance itself, if any
    for m in units:
        m.forward = forward(m, m.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in units:
            if own[id(m)] is None:
                del m.forward
            else:
                m.forward = own[id(m)]  # type: ignore[method-assign,assignment]


class _UnitPruner(tp.pruner.function.BasePruningFunc):  # type: ignore[misc,name-defined]
    """torch-pruning's view of a unit: its channel counts; groups touching it are never cut."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError("a unit keeps its channels")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.__dict__["_unit_channels"][1])

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.__dict__["_unit_channels"][0])


class ModelGraph:
    """The prunable groups of a model, and the operations that shrink them.

    Rebuilds torch-pruning's dependency graph after every pruning step, since group indices
    refer to the current shapes.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        ignore: Iterable[str] = (),
        channel_multiple: int | WidthSpace = 1,
    ) -> None:
        self.model = model
        device = next(iter(model.parameters()), torch.empty(0)).device
        self.example = torch.randn(1, *input_shape, device=device)
        # the widths a group may keep (``widths``); a bare number is a multiple with no narrow widths
        self.space = WidthSpace.of(channel_multiple)
        self.channel_multiple = self.space.multiple
        self.ignore_names = list(ignore)
        # a block that splits a layer's output along channels runs one layer per part instead
        self.splits = separate_splits(model, self.example, keep=self.ignore_names)
        modules = dict(model.named_modules())
        missing = [n for n in self.ignore_names if n not in modules]
        if missing:
            sample = ", ".join(n for n, m in list(modules.items()) if isinstance(m, PRUNABLE))[:200]
            raise UserError(f"--ignore names no layer: {', '.join(missing)}; layer names look like: {sample}")
        outputs = output_layers(model, self.example)
        # never pruned: the user-listed modules (every conv/linear inside them), the output
        # layer(s), and layers whose split could not be separated
        kept = [m for n in [*self.ignore_names, *self.splits.frozen] for m in modules[n].modules() if isinstance(m, PRUNABLE)]
        self._ignored = kept + outputs
        self.frozen_layers = set(self.ignore_names) | {n for n, m in modules.items() if any(m is o for o in self._ignored)}
        self._build()

    # -- construction -------------------------------------------------------------------------
    def _build(self) -> None:
        self.names = {m: n for n, m in self.model.named_modules()}
        order = {n: i for i, n in enumerate(self.names.values())}
        self.model.eval()
        before = {m: (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in self.model.modules()}
        units = [m for m in self.model.modules() if getattr(m, "prune_as_unit", False)]
        try:
            with _opaque(units):
                self.dg = tp.DependencyGraph().build_dependency(
                    self.model, example_inputs=self.example, verbose=False,
                    customized_pruners={type(m): _UnitPruner() for m in units})
        except Exception as e:
            for m, (post, pre) in before.items():  # a failed trace leaves torch-pruning's hooks behind
                for k in set(m._forward_hooks) - post:
                    del m._forward_hooks[k]
                for k in set(m._forward_pre_hooks) - pre:
                    del m._forward_pre_hooks[k]
            # Tracing runs a forward with gradients and walks the autograd graph it leaves; a
            # forward of our own with gradients on finds the module that breaks either.
            culprit = _graph_breakers(self.model, self.example)[:1]
            where = f" in module {culprit[0]!r}" if culprit else ""
            raise UserError(
                f"torch-pruning cannot trace this model{where} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                f"add {culprit[0] if culprit else 'the offending layers'} to --ignore or make it traceable"
            ) from None
        self.layers = layer_table(self.model, self.example)
        self._groups: dict[str, Any] = {}
        self._info: dict[str, GroupInfo] = {}
        for g in self.dg.get_all_groups(ignored_layers=self._ignored, root_module_types=PRUNABLE):
            root = g[0].dep.target.module
            name = self.names.get(root)
            if name is None:
                continue
            if any(item.dep.target.module is u for item in g for u in units):
                continue  # it reaches into or out of a unit, which keeps all its channels
            info = GroupInfo(name, len(g[0].idxs))
            seen_in: dict[str, set[int]] = {}
            for item in g:
                mod, fn = item.dep.target.module, item.dep.handler
                lname = self.names.get(mod)
                if lname is None:
                    continue
                out = getattr(fn, "__name__", "") in ("prune_out_channels",)
                if isinstance(mod, PRUNABLE):
                    (info.out_layers if out else info.in_layers).append(lname)
                    if not out:  # a concatenation may hold the channels twice, a flatten once per position
                        seen_in.setdefault(lname, set()).update(int(getattr(i, "idx", i)) for i in item.idxs)
                elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                    info.norm_layers.append(lname)
            # Name the group by its first out-layer in definition order (torch-pruning's root
            # depends on its traversal); indexing still follows torch-pruning's root.
            if info.out_layers:
                name = min(info.out_layers, key=order.__getitem__)
                info.name = self._canonical(name)
            info.in_counts = {n: len(v) for n, v in seen_in.items()}
            touched = set(info.out_layers) | set(info.in_layers)
            info.flops = sum(self.layers[n].flops for n in touched if n in self.layers)
            info.params = sum(self.layers[n].params for n in touched if n in self.layers)
            if name in self.layers:
                info.in_hw = self.layers[name].in_hw
            name = info.name
            if info.channels > 1:
                self._groups[name] = g
                self._info[name] = info

    def _canonical(self, layer: str) -> str:
        """Group name for a group whose first out-layer is ``layer``. Inside a factorised conv
        pair (``transforms.lowrank``), the pair's output channels keep the original layer's group
        name and its inner channels (the rank) are the group ``<layer>:rank``."""
        parent, _, idx = layer.rpartition(".")
        if parent and getattr(self.model.get_submodule(parent), "lowrank", False):
            return parent if idx == "1" else f"{parent}:rank"
        return layer

    # -- queries ------------------------------------------------------------------------------
    def groups(self) -> list[GroupInfo]:
        return list(self._info.values())

    def group(self, name: str) -> Any:
        """The torch-pruning ``Group`` object (for importance criteria)."""
        if name not in self._groups:
            raise UserError(f"no prunable group {name!r}; groups: {', '.join(self._groups)}")
        return self._groups[name]

    def flops_params(self) -> tuple[int, int]:
        """(MACs of conv + linear layers, all parameters) of the model as it is now."""
        return sum(li.flops for li in self.layers.values()), sum(p.numel() for p in self.model.parameters())

    def layer_widths(self, plan: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """(cin, cout) of every conv/linear layer once each group keeps ``plan[group]`` channels.

        A layer's inputs lose what every group feeding it loses, in proportion to how many of its
        inputs are that group's channels (``in_counts``: a concatenation may hold a group twice, a
        flatten once per position). A depthwise conv keeps as many inputs as outputs
        (torch-pruning lists it among its group's out-layers only).
        """
        widths = {n: (li.in_channels, li.out_channels) for n, li in self.layers.items()}
        feeds: dict[str, dict[str, GroupInfo]] = {}
        for g in self.groups():
            k = plan.get(g.name, g.channels)
            for n in g.out_layers:
                widths[n] = (k, k) if _depthwise(self.layers[n]) else (widths[n][0], k)
            for n in g.in_layers:
                if not _depthwise(self.layers[n]):
                    feeds.setdefault(n, {})[g.name] = g
        for n, gs in feeds.items():
            lost = sum(g.in_counts.get(n, g.channels) * (1 - plan.get(g.name, g.channels) / g.channels) for g in gs.values())
            widths[n] = (max(1, self.layers[n].in_channels - int(round(lost))), widths[n][1])
        return widths

    def predict_flops(self, keep: Mapping[str, int]) -> int:
        """MACs after keeping ``keep[group]`` channels per group (snapped to the width space):
        each layer's MACs scale with its kept outputs times its kept inputs (``layer_widths``)."""
        snapped = {g.name: self.space.snap(keep[g.name], g.channels) for g in self.groups() if g.name in keep}
        total = 0.0
        for n, (ci, co) in self.layer_widths(snapped).items():
            li = self.layers[n]
            total += li.flops * (co / li.out_channels) * (1.0 if _depthwise(li) else ci / li.in_channels)
        return int(round(total))

    # -- edits --------------------------------------------------------------------------------
    def prune(self, remove: Mapping[str, Sequence[int]]) -> None:
        """Remove the given channel indices from each named group, then check the model still runs."""
        for name, idxs in remove.items():
            if not idxs:
                continue
            n = self._info[name].channels if name in self._info else None
            if n is None:
                raise UserError(f"no prunable group {name!r}")
            if len(set(idxs)) >= n:
                raise UserError(f"cannot remove all {n} channels of group {name!r}")
        # Every group's indices are computed on the model as it is, then each layer is cut once by
        # the union of what the groups remove from it: cutting one group first would shift the
        # channel offsets another group's indices have in a concatenation they share (a YOLO neck).
        plans = [self.dg.get_pruning_group(self._groups[n][0].dep.target.module, self._groups[n][0].dep.handler,
                                           sorted(set(int(i) for i in idxs)))
                 for n, idxs in remove.items() if idxs]
        plans = [p for p in plans if self.dg.check_pruning_group(p)]
        if any(item.dep.target.type == tp.ops.OPTYPE.PARAMETER for p in plans for item in p):
            for p in plans:  # bare nn.Parameters: torch-pruning's own path, which replaces them
                p.prune()
        else:
            cuts: dict[tuple[int, Any], tuple[Any, set[int]]] = {}
            for p in plans:
                for item in p:
                    dep, cut = cuts.setdefault((id(item.dep.target.module), item.dep.handler), (item.dep, set()))
                    cut.update(int(getattr(i, "idx", i)) for i in item.idxs)  # torch-pruning's (index, root index) pairs
            for dep, cut in cuts.values():
                dep(sorted(cut))
        self._check_runs()
        self._build()

    def prune_by_scores(self, keep: Mapping[str, int], scores: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Keep the ``keep[name]`` highest-scoring channels of each group (snapped to the width
        space); returns the channel counts actually kept."""
        remove, kept = {}, {}
        for name, k in keep.items():
            total = self._info[name].channels
            k = self.space.snap(k, total)
            s = scores[name]
            if s.numel() != total:
                raise ValueError(f"scores for {name} have {s.numel()} entries, group has {total} channels")
            order = torch.argsort(s, descending=False, stable=True)  # lowest first
            remove[name] = order[: total - k].tolist()
            kept[name] = k
        self.prune(remove)
        return kept

    def _check_runs(self) -> None:
        """A forward pass after pruning; on failure name the module where it broke."""
        last: list[str] = []
        handles = [m.register_forward_pre_hook(lambda m, i, n=n: last.append(n)) for n, m in self.model.named_modules() if n]
        try:
            with torch.no_grad():
                self.model.eval()(self.example)
        except Exception as e:
            where = last[-1] if last else "?"
            raise UserError(f"the pruned model fails in module {where!r} ({type(e).__name__}); add it to --ignore") from None
        finally:
            for h in handles:
                h.remove()


def keep_ratio_plan(graph: ModelGraph, ratio: float) -> dict[str, int]:
    """Uniform plan: keep ``ratio`` of every group's channels (at least one)."""
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"keep ratio must be in (0, 1], got {ratio}")
    return {g.name: max(1, math.floor(g.channels * ratio + 0.5)) for g in graph.groups()}
