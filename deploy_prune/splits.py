"""Channel splits made prunable: a layer whose output a block splits along channels (``chunk`` or
``split`` on dim 1, as in C2f, C3k2 and CSP blocks) becomes one layer per part, and the block runs
the parts instead of the split. Each part is then its own prunable group.

The block's code is what breaks a pruned split (an even ``chunk`` of a pruned output cuts in the
wrong place; hard-coded sizes no longer add up), and torch-pruning's graph cannot change code, so
the split must leave what runs. A forward pass records every channel split of a child's output
and the block that made it; the block's own forward is traced with torch.fx (its children are
leaves), each part is the layer with the other parts' output channels removed, and the rewritten
block's outputs must equal the original's (``PARITY_RTOL``) or nothing is changed and the run
stops naming the block. The rewrite is deterministic, so a fresh instance of the model is
rebuilt to a run's architecture by running it again (``transforms.rebuild_pruned``).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from deploy_prune.errors import UserError

PARITY_RTOL = 1e-4  # relative to the largest output magnitude; float32 sums in another order differ by ~1e-6
_SPLITS = {torch.Tensor.chunk: "chunk", torch.chunk: "chunk", torch.Tensor.split: "split", torch.split: "split"}


@dataclass
class Split:
    """One channel split seen in a forward pass: ``block`` split the output of its child ``child``."""

    block: str
    child: str
    sizes: list[int]


@dataclass
class Rewrite:
    """What ``separate_splits`` did: blocks rewritten (``block -> [part layers]``) and splits it left,
    with why (their producers' channels are then not prunable: ``frozen``)."""

    parts: dict[str, list[str]] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)  # block -> reason
    frozen: list[str] = field(default_factory=list)  # producer modules kept whole

    def notes(self) -> list[str]:
        """One line per kind of change, for the report."""
        out = []
        if self.parts:
            out.append(f"channel splits run as one layer per part (outputs checked equal): {', '.join(self.parts)}")
        out += [f"{b}: its channel split is kept and the layer before it not pruned ({why})" for b, why in self.left.items()]
        return out


def _dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    d = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    return int(d) % args[0].ndim if args[0].ndim else 0


class _Recorder(TorchFunctionMode):
    """Records channel splits of tensors a module produced, with the module running at the time."""

    def __init__(self, produced: dict[int, tuple[torch.Tensor, str]], stack: list[str], found: list[Split]) -> None:
        super().__init__()
        self.produced, self.stack, self.found = produced, stack, found

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        x = args[0] if args else None
        if func in _SPLITS and isinstance(x, torch.Tensor) and x.ndim in (2, 4) and _dim(args, kwargs) == 1:
            seen = self.produced.get(id(x))
            if seen is not None and seen[0] is x and self.stack:
                self.found.append(Split(self.stack[-1], seen[1], [int(t.shape[1]) for t in out]))
        return out


def forward_with(model: nn.Module, example: torch.Tensor, handles: list[Any]) -> Any:
    """One eval-mode forward without gradients; the hook ``handles`` are removed after it, whatever happens."""
    try:
        with torch.no_grad():
            return model.eval()(example)
    finally:
        for h in handles:
            h.remove()


def find_splits(model: nn.Module, example: torch.Tensor) -> list[Split]:
    """Channel splits whose input is the output of a direct child of the block that splits it."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[torch.Tensor, str]] = {}
    stack: list[str] = []
    found: list[Split] = []

    def post(m: nn.Module, i: Any, o: Any) -> None:
        if stack:
            stack.pop()
        if isinstance(o, torch.Tensor):
            produced[id(o)] = (o, names[m])  # the outermost module producing a tensor is recorded last

    hooks = [h for m in model.modules() for h in (
        m.register_forward_pre_hook(lambda m, i: stack.append(names[m])), m.register_forward_hook(post))]
    with _Recorder(produced, stack, found):
        forward_with(model, example, hooks)
    return [s for s in found if s.child.rpartition(".")[0] == s.block and s.block != s.child]


class _BlockTracer(fx.Tracer):
    """Traces one block's own forward: every child is a leaf; a split's parts can be iterated
    (``list(x.chunk(2, 1))``), their count taken from the forward pass that found the split."""

    def __init__(self, counts: list[int]) -> None:
        super().__init__()
        self.counts = list(counts)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if _split_call(node) and self.counts:
            return _Parts(node, self, self.counts.pop(0))
        return super().proxy(node)


class _Parts(fx.Proxy):
    """A traced split whose number of parts is known."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, n: int) -> None:
        super().__init__(node, tracer)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return iter([self[i] for i in range(self.n)])  # type: ignore[index]


def _split_call(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("chunk", "split")) or \
        (node.op == "call_function" and node.target in (torch.chunk, torch.split))


def _part(layer: nn.Module, x: tuple[Any, ...], keep: range) -> nn.Module:
    """A copy of ``layer`` computing only output channels ``keep``; torch-pruning removes the rest."""
    part = copy.deepcopy(layer).eval()
    out = part(*x)
    convs = [m for m in part.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not convs:
        raise ValueError("it has no conv or linear layer")
    dg = tp.DependencyGraph().build_dependency(part, example_inputs=x)
    last = convs[-1]  # the layer whose output channels the part's output has
    drop = [i for i in range(int(out.shape[1])) if i not in keep]
    fn = tp.prune_conv_out_channels if isinstance(last, nn.Conv2d) else tp.prune_linear_out_channels
    dg.get_pruning_group(last, fn, idxs=drop).prune()
    return part


def _capture(model: nn.Module, example: torch.Tensor, names: set[str]) -> dict[str, tuple[tuple[Any, ...], Any]]:
    """Inputs and output of the named modules in one forward pass."""
    seen: dict[str, tuple[tuple[Any, ...], Any]] = {}
    mods = dict(model.named_modules())

    def keep(n: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(m: nn.Module, i: tuple[Any, ...], o: Any) -> None:  # returns None: a value would replace the output
            seen.setdefault(n, (i, o))
        return hook

    forward_with(model, example, [mods[n].register_forward_hook(keep(n)) for n in names])
    return seen


def _close(a: Any, b: Any) -> bool:
    fa, _ = torch.utils._pytree.tree_flatten(a)
    fb, _ = torch.utils._pytree.tree_flatten(b)
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb, strict=True):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return False
            if x.numel() and float((x - y).abs().max()) > PARITY_RTOL * max(float(x.abs().max()), 1.0):
                return False
    return True


def _rewrite_block(block: nn.Module, splits: list[Split], prefix: str, io: dict[str, tuple[tuple[Any, ...], Any]]) -> tuple[nn.Module, dict[str, list[str]]]:
    """The block traced with its splits replaced by part layers, and the part layers by producer."""
    graph = _BlockTracer([len(s.sizes) for s in splits]).trace(block)
    by_child = {s.child[len(prefix) + 1:]: s for s in splits}
    parts: dict[str, list[str]] = {}
    lists: dict[str, nn.ModuleList] = {}
    for node in list(graph.nodes):
        if not _split_call(node):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and src.target in by_child):
            continue
        s = by_child[str(src.target)]
        users = list(node.users)
        if len(src.users) != 1 or not all(u.op == "call_function" and u.target is operator.getitem
                                          and isinstance(u.args[1], int) for u in users):
            raise ValueError(f"the output of {s.child!r} is used other than through its parts")
        layer = block.get_submodule(str(src.target))
        x = io[s.child][0]
        offsets = [sum(s.sizes[:i]) for i in range(len(s.sizes))]
        made = nn.ModuleList(_part(layer, x, range(o, o + n)) for o, n in zip(offsets, s.sizes, strict=True))
        parent, _, attr = str(src.target).rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, made)
        lists[str(src.target)] = made
        with graph.inserting_before(node):
            new = [graph.call_module(f"{src.target}.{i}", src.args, src.kwargs) for i in range(len(s.sizes))]
        for u in users:
            u.replace_all_uses_with(new[int(u.args[1])])
            graph.erase_node(u)
        graph.erase_node(node)
        graph.erase_node(src)
        parts[s.child] = [f"{s.child}.{i}" for i in range(len(s.sizes))]
    if not parts:
        raise ValueError("no split in its traced forward reads a layer's output directly")
    graph.lint()
    gm = fx.GraphModule(block, graph, class_name=type(block).__name__)
    for target, made in lists.items():  # the parts as a ModuleList (fx would hold them in a bare Module)
        parent, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, made)
    # plain attributes the model reads (ultralytics' f, i, type, np), kept through deepcopy too
    kept = {k: v for k, v in vars(block).items() if not k.startswith("_") and k != "training" and k not in vars(gm)}
    gm.meta["_user_preserved_attributes"] = kept
    for k, v in kept.items():
        setattr(gm, k, v)
    gm.train(block.training)
    return gm, parts


def separate_splits(model: nn.Module, example: torch.Tensor, keep: Iterable[str] = ()) -> Rewrite:
    """Rewrite, in place, every block that splits a child's output along channels (module doc).
    A block that cannot be traced, or that ``keep`` names (``--ignore``: the block or the layer
    it splits), keeps its split, and the child is reported ``frozen``; a rewrite whose outputs
    differ from the block's raises ``UserError`` naming the block."""
    result = Rewrite()
    kept = set(keep)
    splits = find_splits(model, example)
    for s in [s for s in splits if s.block in kept or s.child in kept]:
        splits.remove(s)
        result.left[s.block] = "listed in --ignore"
        result.frozen.append(s.child)
    if not splits:
        return result
    blocks: dict[str, list[Split]] = {}
    for s in splits:
        blocks.setdefault(s.block, []).append(s)
    io = _capture(model, example, set(blocks) | {s.child for s in splits})
    for name, found in blocks.items():
        if not name:  # the model's own forward splits: it cannot be replaced in place
            result.left["(the model)"] = "the model's own forward splits a layer's output; move the split into a submodule"
            result.frozen += [s.child for s in found]
            continue
        block = model.get_submodule(name)
        saved = {n: m for n, m in block.named_children()}
        try:
            new, parts = _rewrite_block(block, found, name, io)
        except Exception as e:  # fx cannot trace it, or a part cannot be cut: keep the block as it is
            for n, m in saved.items():
                setattr(block, n, m)
            result.left[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            result.frozen += [s.child for s in found]
            continue
        args, want = io[name]
        with torch.no_grad():
            got = new.eval()(*args)
        if not _close(want, got):
            for n, m in saved.items():
                setattr(block, n, m)
            raise UserError(f"splitting the channel split in {name!r} into one layer per part changes its output; "
                            f"add {found[0].child!r} to --ignore")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        result.parts.update(parts)
    return result
