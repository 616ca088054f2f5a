"""Unstructured pruning to a sparsity target: one iterative engine, composed per method.

An iteration scores the remaining weights of every conv/linear layer (``--ignore`` excepted),
counts how many to prune, zeroes them through masks, optionally rewinds the survivors, then
retrains with the masks held (``MethodContext.finetune``: the same optimiser, learning rate and
distillation for every method) until the method's stop rule ends it. The run stops when the
sparsity target is reached (the last count is clamped to it) or after ``iterations``. Methods
differ only in their parts:

==============  ==================================  ====================================  ======  ========  ==================
method          score                               count per iteration                   scope   rewind    retraining stops
==============  ==================================  ====================================  ======  ========  ==================
network         magnitude                           equal-ratio schedule to the target    layer   no        after E epochs
lth             magnitude                           p = 0.2 of the remaining              layer   to start  after E epochs
sap             magnitude                           PQ index (InCoP paper, Eq. 1)         layer   no        after E epochs
incop           magnitude                           PQ index                              layer   no        IF / GF consistent
snip            |g w| on one batch, normalised      all at once (one iteration)           global  no        after E epochs
loss-based      taylor | magnitude | random         equal-ratio schedule                  global  no        after E epochs
==============  ==================================  ====================================  ======  ========  ==================

Choices the sources leave open, ours:

- *start* for LTH's rewinding is the trained model compress starts from (the only earlier
  state a user hands us); the survivors and every other tensor (BatchNorm too) go back to it.
- SAP's hyper-parameters default to its authors' published example (p = 0.5, q = 1,
  eta_r = 0.001, gamma = 1.2); beta, the largest share pruned in one iteration, is ours: 0.9.
- The schedule of ``network`` / ``loss-based`` keeps ``(1 - s) ** (t / T)`` of the weights
  after iteration t of T, so every iteration removes the same share of what remains.
- InCoP checks its flow after every retraining epoch (Algorithm 1) with at most E epochs; the
  distance is relative (``train.flows``). Defaults: IF, epsilon 0.2 on the dense-relative
  distance; GF, epsilon 0.5 of the distance right after each pruning step (``eps_scale``;
  why in ``train.flows``). IF's 0.2 is set from the scale we measured: 0.08 to 0.18 in the first
  three iterations of ResNet-20 / Fashion-MNIST, where the paper's behaviour (short retraining
  early, more epochs as the cut grows) needs epsilon above the early distances.
- No layer is emptied: a layer keeps at least one weight.

Unstructured zeros do not lower dense latency on ONNX Runtime, OpenVINO or TensorRT without
sparse kernels; the report says so. ``--nm 2:4`` (N:M masks for sparse tensor cores) applies
to the masks any method produces (``transforms.nm_masks``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deploy_prune.errors import UserError
from deploy_prune.methods import METHODS
from deploy_prune.train.flows import FlowStop
from deploy_prune.transforms import Masks, apply_masks, weight_layers

if TYPE_CHECKING:
    from deploy_prune.methods.context import MethodContext

Scores = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Scores of the weights
# ---------------------------------------------------------------------------------------------
def magnitude_scores(layers: dict[str, nn.Module], run: MethodContext) -> Scores:
    return {n: m.weight.detach().abs() for n, m in layers.items()}  # type: ignore[union-attr,operator]


def _grad_times_weight(layers: dict[str, nn.Module], run: MethodContext, batches: list[Any]) -> Scores:
    import torch.nn.functional as F

    model = run.model
    acc = {n: torch.zeros_like(m.weight) for n, m in layers.items()}  # type: ignore[arg-type]
    dev = next(model.parameters()).device
    model.eval()
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
        for n, m in layers.items():
            if m.weight.grad is not None:  # type: ignore[union-attr]
                acc[n] += (m.weight.grad * m.weight).detach().abs()  # type: ignore[union-attr,operator]
    model.zero_grad(set_to_none=True)
    return acc


def taylor_scores(layers: dict[str, nn.Module], run: MethodContext) -> Scores:
    """|g w| accumulated over the run's score batches (first-order loss change of removing w)."""
    return _grad_times_weight(layers, run, run.score_batches())


def snip_scores(layers: dict[str, nn.Module], run: MethodContext) -> Scores:
    """SNIP's connection sensitivity: |g w| on one batch, normalised to sum to 1 over the network."""
    s = _grad_times_weight(layers, run, run.score_batches()[:1])
    total = sum(float(v.sum()) for v in s.values()) or 1.0
    return {n: v / total for n, v in s.items()}


def random_scores(layers: dict[str, nn.Module], run: MethodContext) -> Scores:
    g = torch.Generator().manual_seed(run.seed + run.steps_recorded)
    return {n: torch.rand(m.weight.shape, generator=g).to(m.weight.device) for n, m in layers.items()}  # type: ignore[union-attr,arg-type]


SCORES: dict[str, Callable[[dict[str, nn.Module], MethodContext], Scores]] = {
    "magnitude": magnitude_scores, "taylor": taylor_scores, "snip": snip_scores, "random": random_scores,
}


# ---------------------------------------------------------------------------------------------
# How many to prune
# ---------------------------------------------------------------------------------------------
def pq_index(w: torch.Tensor, p: float, q: float) -> float:
    """SAP's PQ index I_{p,q}(w) = 1 - d^(1/q - 1/p) ||w||_p / ||w||_q of the remaining weights."""
    v = w[w != 0].abs().double()
    d = v.numel()
    if d == 0:
        return 0.0
    norm_p = float(v.pow(p).sum() ** (1 / p))
    norm_q = float(v.pow(q).sum() ** (1 / q))
    return 1.0 - d ** (1 / q - 1 / p) * norm_p / max(norm_q, 1e-30)


def sap_count(w: torch.Tensor, p: float, q: float, eta_r: float, gamma: float, beta: float) -> int:
    """c_t = floor(d_t min(gamma (1 - r_t / d_t), beta)), r_t = d_t (1+eta_r)^(-q/(q-p)) (1-I)^(qp/(q-p))."""
    d = int((w != 0).sum())
    if d == 0:
        return 0
    r = d * (1 + eta_r) ** (-q / (q - p)) * (1 - pq_index(w, p, q)) ** (q * p / (q - p))
    return int(math.floor(d * min(gamma * (1 - r / d), beta)))


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
class IterativePruning:
    """Prune-retrain iterations to a sparsity target; subclasses set the parts (see the module doc)."""

    name = "imp"
    kind = "unstructured"
    lowers_latency = False
    default_steps = 1
    budget_kinds: tuple[str, ...] = ("sparsity",)
    plans = False
    score = "magnitude"
    scope = "layer"
    rewind = False
    count = "schedule"

    def __init__(self, iterations: int = 5, retrain_epochs: float = 1.0) -> None:
        if iterations < 1 or retrain_epochs < 0:
            raise UserError(f"--method {self.name}: iterations must be >= 1 and retrain_epochs >= 0 "
                            f"(got {iterations}, {retrain_epochs}); set them with -O iterations=N -O retrain_epochs=E")
        self.iterations = int(iterations)
        self.retrain_epochs = retrain_epochs

    def settings(self) -> dict[str, Any]:
        return {"score": self.score, "count": self.count, "scope": self.scope, "rewind": self.rewind,
                "iterations": self.iterations, "retrain_epochs": self.retrain_epochs}

    def setup(self, run: MethodContext) -> None:
        pass

    def plan(self, run: MethodContext, budget: float) -> dict[str, int]:
        raise UserError(f"--method {self.name} prunes weights, not channels: give it a --sparsity budget")

    def masks(self, run: MethodContext) -> Masks:
        return run.masks

    def stop_rule(self, run: MethodContext) -> Callable[[nn.Module, int], bool] | None:
        return None

    # -- counting --------------------------------------------------------------------------------
    def layer_counts(self, layers: dict[str, nn.Module], t: int, target: float) -> dict[str, int]:
        """Weights to prune per layer at iteration t (before clamping to the target)."""
        keep = (1 - target) ** (t / self.iterations)
        return {n: max(0, int((m.weight != 0).sum()) - round(keep * m.weight.numel())) for n, m in layers.items()}  # type: ignore[union-attr,operator]

    def prune_once(self, run: MethodContext, layers: dict[str, nn.Module], t: int, target: float) -> Masks:
        total = sum(m.weight.numel() for m in layers.values())  # type: ignore[union-attr,misc,operator]
        remaining = {n: int((m.weight != 0).sum()) for n, m in layers.items()}  # type: ignore[union-attr,misc]
        counts = self.layer_counts(layers, t, target)
        allowed = sum(remaining.values()) - math.ceil((1 - target) * total)  # the target is never overshot
        want = sum(counts.values())
        if want > allowed:
            counts = {n: int(c * allowed / want) for n, c in counts.items()}
        counts = {n: min(c, remaining[n] - 1) for n, c in counts.items()}  # no layer is emptied
        scores = SCORES[self.score](layers, run)
        masks: Masks = {}
        if self.scope == "global":
            k = sum(counts.values())
            pool = torch.cat([scores[n][m.weight != 0].flatten().cpu() for n, m in layers.items()])  # type: ignore[union-attr]
            cut = float(pool.kthvalue(k).values) if 0 < k <= pool.numel() else -math.inf
        for n, m in layers.items():
            w = m.weight.detach()  # type: ignore[union-attr,operator]
            alive = w != 0  # pruned weights stay pruned; new cuts are chosen among the alive
            if self.scope == "global":
                keep = alive & (scores[n] > cut)
                if int(keep.sum()) == 0:  # a layer the global cut would empty keeps its best weight
                    s = scores[n].masked_fill(~alive, -math.inf)
                    keep = s == s.max()
            else:
                keep = alive.clone()
                if counts[n] > 0:
                    s = scores[n].masked_fill(~alive, math.inf)
                    keep.view(-1)[s.flatten().topk(counts[n], largest=False).indices] = False
            masks[n] = keep
        return masks

    # -- the loop ---------------------------------------------------------------------------------
    def prune(self, run: MethodContext, target: float) -> None:
        from deploy_prune.transforms import sparsity

        if not 0 < target < 1:
            raise UserError(f"--sparsity must be in (0, 1), got {target}")
        skip = list(run.ignore)
        stop = self.stop_rule(run)
        for t in range(1, self.iterations + 1):
            stage = f"imp-{t}"
            if stage in run.done:
                continue
            layers = weight_layers(run.model, skip)
            if sparsity(run.model, skip) >= target - 1e-6:
                break
            masks = self.prune_once(run, layers, t, target)
            if self.rewind:
                run.model.load_state_dict(run.teacher.state_dict())
            run.masks = masks
            apply_masks(run.model, masks)
            if isinstance(stop, FlowStop):
                stop.begin(run.model, masks)
            acc = run.finetune(self.retrain_epochs, stage, stop=stop)
            fit = run.last_fit or {}
            rec: dict[str, Any] = {"iteration": t, "sparsity": round(sparsity(run.model, skip), 6), "accuracy": acc,
                                   "epochs_run": fit.get("epochs_run", 0), "train_seconds": fit.get("train_seconds", 0.0)}
            if isinstance(stop, FlowStop):
                rec["flow_after_prune"] = round(stop.after_prune, 5)
                rec["flow_distances"] = [round(d, 5) for d in stop.distances]
            run.record_step("imp", **rec)
            run.say(f"iteration {t}/{self.iterations}: sparsity {100 * rec['sparsity']:.1f} %, accuracy {100 * acc:.2f} %, "
                    f"{rec['epochs_run']} epoch(s)")
            run.checkpoint(stage)


def _register(name: str, help: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name  # type: ignore[attr-defined]
        return METHODS.register(name, help)(cls)
    return deco


@_register("network", "unstructured magnitude pruning with retraining, in equal-ratio steps to the sparsity target")
class NetworkPruner(IterativePruning):
    pass


@_register("lth", "lottery ticket: iterative magnitude pruning (20 % of the remaining per iteration), rewinding the survivors")
class LotteryTicket(IterativePruning):
    count = "fraction"
    rewind = True

    def __init__(self, iterations: int = 5, retrain_epochs: float = 1.0, fraction: float = 0.2) -> None:
        super().__init__(iterations, retrain_epochs)
        if not 0 < fraction < 1:
            raise UserError(f"--method lth: fraction must be in (0, 1), got {fraction}")
        self.fraction = fraction

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "fraction": self.fraction}

    def layer_counts(self, layers: dict[str, nn.Module], t: int, target: float) -> dict[str, int]:
        return {n: int(self.fraction * int((m.weight != 0).sum())) for n, m in layers.items()}  # type: ignore[union-attr,operator]


@_register("sap", "sparsity-informed adaptive pruning: the PQ index of each layer sets how much to prune")
class SparsityAdaptive(IterativePruning):
    count = "pq-index"

    def __init__(self, iterations: int = 5, retrain_epochs: float = 1.0, p: float = 0.5, q: float = 1.0,
                 eta_r: float = 0.001, gamma: float = 1.2, beta: float = 0.9) -> None:
        super().__init__(iterations, retrain_epochs)
        if not 0 < p < q:
            raise UserError(f"--method {self.name}: need 0 < p < q, got p={p}, q={q} (the paper uses (0.5, 1) and (1, 2))")
        self.p, self.q, self.eta_r, self.gamma, self.beta = p, q, eta_r, gamma, beta

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "p": self.p, "q": self.q, "eta_r": self.eta_r, "gamma": self.gamma, "beta": self.beta}

    def layer_counts(self, layers: dict[str, nn.Module], t: int, target: float) -> dict[str, int]:
        return {n: sap_count(m.weight.detach(), self.p, self.q, self.eta_r, self.gamma, self.beta)  # type: ignore[union-attr,operator]
                for n, m in layers.items()}


@_register("incop", "information-consistent pruning: SAP whose retraining stops once IF or GF matches the dense network's")
class InformationConsistent(SparsityAdaptive):
    def __init__(self, iterations: int = 5, retrain_epochs: float = 1.0, flow: str = "if", eps: float | None = None,
                 eps_scale: str | None = None, p: float = 0.5, q: float = 1.0, eta_r: float = 0.001, gamma: float = 1.2,
                 beta: float = 0.9) -> None:
        super().__init__(iterations, retrain_epochs, p, q, eta_r, gamma, beta)
        if flow not in ("if", "gf"):
            raise UserError(f"--method incop: flow must be 'if' or 'gf', got {flow!r} (-O flow=if)")
        self.flow = flow
        self.eps_scale = eps_scale or ("dense" if flow == "if" else "pruned")
        if self.eps_scale not in ("dense", "pruned"):
            raise UserError(f"--method incop: eps_scale must be 'dense' or 'pruned', got {eps_scale!r} (-O eps_scale=pruned)")
        self.eps = eps if eps is not None else (0.2 if flow == "if" else 0.5)
        self._stop: FlowStop | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "flow": self.flow, "eps": self.eps, "eps_scale": self.eps_scale,
                "retraining": "stops at flow consistency"}

    def stop_rule(self, run: MethodContext) -> FlowStop:
        if self._stop is None:
            self._stop = FlowStop(self.flow, self.eps, run.score_batches(), list(run.ignore), self.eps_scale)
            self._stop.reference(run.teacher)
        return self._stop


@_register("snip", "SNIP: one-shot connection sensitivity |g w| on a batch, global, then retraining")
class Snip(IterativePruning):
    score = "snip"
    scope = "global"

    def __init__(self, iterations: int = 1, retrain_epochs: float = 1.0) -> None:
        super().__init__(iterations, retrain_epochs)


WEIGHT_CRITERIA = ("taylor", "magnitude", "random")


@_register("loss-based", "loss-model pruning: taylor, magnitude or random weight importance, global, with retraining")
class LossModel(IterativePruning):
    scope = "global"

    def __init__(self, iterations: int = 3, retrain_epochs: float = 1.0, criterion: str = "taylor") -> None:
        super().__init__(iterations, retrain_epochs)
        if criterion not in WEIGHT_CRITERIA:  # --criterion names channel criteria too; these three score single weights
            raise UserError(f"--method loss-based scores single weights by {', '.join(WEIGHT_CRITERIA)}, not {criterion!r}; "
                            "give --criterion taylor, magnitude or random")
        self.score = criterion


def layer_sparsity_table(model: nn.Module, skip: list[str] | None = None) -> list[dict[str, Any]]:
    """Per layer: weights and the share that is zero (for reports)."""
    out = []
    for n, m in weight_layers(model, skip or []).items():
        w = m.weight  # type: ignore[union-attr]
        out.append({"layer": n, "weights": int(w.numel()), "sparsity": round(float((w == 0).float().mean()), 6)})  # type: ignore[union-attr,operator]
    return out

