"""Unstructured methods that shape the weights by training before they cut: GReg, ADMM, learnable thresholds.

Each trains ``reg_epochs`` with a penalty added to the (distillation) loss through
``MethodContext.finetune(penalty=...)``, then cuts to the sparsity target by the engine's layer-wise
magnitude rule (``methods.imp``) and retrains ``retrain_epochs`` with the masks held. The seed
(Pruning Pathways) names them without equations; our readings, each a published method:

- ``greg`` (growing regularization, Wang et al. 2021): the weights to go are fixed at the start
  (smallest magnitude per layer, at the target); an L2 penalty on them only grows linearly per
  step from 0 to ``reg_max`` over the regularisation phase, pushing them to zero before the cut.
- ``admm`` (Zhang et al. 2018): loss + rho/2 sum ||W - Z + U||^2; after every epoch Z becomes the
  projection of W + U onto the sparsity set (layer-wise top magnitude at the target) and
  U += W - Z. The progressive schedule is the target itself growing in ``stages`` equal steps.
- ``learnable-threshold``: per layer a learnable threshold t = softplus(theta) * std(w) and a
  soft mask sigmoid((|w| - t) / (T * std(w))) applied to the weights during training (a
  parametrization); the loss adds lambda (density - (1 - target))^2 so the thresholds rise until
  the soft density meets the target. The cut then keeps |w| > t, and the engine's magnitude rule
  makes the count exact (the seed notes such sparsity is otherwise inexact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from deploy_prune.errors import UserError
from deploy_prune.methods.imp import IterativePruning, _register
from deploy_prune.transforms import Masks, weight_layers

if TYPE_CHECKING:
    from deploy_prune.methods.context import MethodContext


def _keep_largest(v: torch.Tensor, share: float) -> torch.Tensor:
    """A 0/1 tensor keeping the ``share`` of ``v``'s entries largest in magnitude (at least one)."""
    flat = v.abs().flatten()
    keep = torch.zeros_like(flat)
    keep[flat.topk(max(1, round(share * flat.numel()))).indices] = 1.0
    return keep.view_as(v)


def topk_masks(model: nn.Module, target: float, skip: list[str]) -> Masks:
    """Per layer, keep the largest-magnitude ``1 - target`` share (the projection onto the sparsity set)."""
    return {n: _keep_largest(m.weight.detach(), 1 - target).bool() for n, m in weight_layers(model, skip).items()}  # type: ignore[arg-type,operator]


class _Regularized(IterativePruning):
    """A penalty phase, then one layer-wise magnitude cut to the target, then retraining."""

    def __init__(self, reg_epochs: float = 1.0, retrain_epochs: float = 1.0) -> None:
        super().__init__(1, retrain_epochs)
        if reg_epochs <= 0:
            raise UserError(f"--method {self.name}: reg_epochs must be > 0, got {reg_epochs}")
        self.reg_epochs = reg_epochs

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "reg_epochs": self.reg_epochs}

    def penalty(self, run: MethodContext, target: float) -> tuple[Callable[[nn.Module], torch.Tensor], Callable[[nn.Module, int], bool] | None]:
        raise NotImplementedError

    def before_cut(self, run: MethodContext) -> None:
        """Undo whatever the penalty phase added to the model (parametrizations)."""

    def prune(self, run: MethodContext, target: float) -> None:

        if "regularize" not in run.done:
            penalty, after_epoch = self.penalty(run, target)
            acc = run.finetune(self.reg_epochs, "regularize", penalty=penalty, stop=after_epoch)
            self.before_cut(run)
            run.record_step("regularize", accuracy=acc, train_seconds=(run.last_fit or {}).get("train_seconds", 0.0))
            run.say(f"{self.name}: regularised for {self.reg_epochs} epoch(s), accuracy {100 * acc:.2f} %")
            run.checkpoint("regularize")
        super().prune(run, target)  # the cut (one iteration: the whole target) and the retraining


@_register("greg", "growing regularization: an L2 penalty growing on the weights to go, then the cut and retraining")
class GrowingRegularization(_Regularized):
    def __init__(self, reg_epochs: float = 1.0, retrain_epochs: float = 1.0, reg_max: float = 1.0) -> None:
        super().__init__(reg_epochs, retrain_epochs)
        self.reg_max = reg_max

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "reg_max": self.reg_max, "selection": "layer-wise smallest magnitude at the start"}

    def penalty(self, run: MethodContext, target: float) -> tuple[Callable[[nn.Module], torch.Tensor], None]:
        skip = list(run.ignore)
        going = {n: ~m for n, m in topk_masks(run.model, target, skip).items()}
        steps = max(1, math.ceil(self.reg_epochs * len(run.train_data) / run.batch_size))  # type: ignore[arg-type]
        state = {"step": 0}

        def pen(model: nn.Module) -> torch.Tensor:
            state["step"] += 1
            lam = self.reg_max * min(1.0, state["step"] / steps)
            layers: dict[str, Any] = weight_layers(model, skip)
            total: Any = 0.0
            for n, g in going.items():
                w = layers[n].weight
                total = total + (w[g.to(w.device)] ** 2).sum()
            return lam * total  # type: ignore[no-any-return]

        return pen, None


@_register("admm", "ADMM: loss + rho/2 ||W - Z + U||^2 with Z projected on the sparsity set each epoch, then cut and retrain")
class ADMM(_Regularized):
    def __init__(self, reg_epochs: float = 2.0, retrain_epochs: float = 1.0, rho: float = 1e-3, stages: int = 2) -> None:
        super().__init__(reg_epochs, retrain_epochs)
        if rho <= 0 or stages < 1:
            raise UserError(f"--method admm: rho must be > 0 and stages >= 1 (got {rho}, {stages})")
        self.rho, self.stages = rho, stages

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "rho": self.rho, "stages": self.stages}

    def penalty(self, run: MethodContext, target: float) -> tuple[Callable[[nn.Module], torch.Tensor], Callable[[nn.Module, int], bool]]:
        skip = list(run.ignore)
        epochs = max(1, math.floor(self.reg_epochs))
        u: dict[str, torch.Tensor] = {}
        z: dict[str, torch.Tensor] = {}

        def project(model: nn.Module, done: int) -> None:
            """Z = the projection of W + U on the sparsity set of this stage (done epochs of the phase)."""
            share = target * min(1.0, (1 + done * self.stages // epochs) / self.stages)
            for n, m in weight_layers(model, skip).items():
                v = m.weight.detach() + u.get(n, 0.0)  # type: ignore[operator]
                z[n] = v * _keep_largest(v, 1 - share)

        project(run.model, 0)
        u.update({n: torch.zeros_like(v) for n, v in z.items()})

        def pen(model: nn.Module) -> torch.Tensor:
            layers: dict[str, Any] = weight_layers(model, skip)
            total: Any = 0.0
            for n in z:
                total = total + ((layers[n].weight - z[n] + u[n]) ** 2).sum()
            return self.rho / 2 * total  # type: ignore[no-any-return]

        def after_epoch(model: nn.Module, done: int) -> bool:
            project(model, done)
            for n, m in weight_layers(model, skip).items():
                u[n] = u[n] + m.weight.detach() - z[n]  # type: ignore[operator]
            return False

        return pen, after_epoch


class SoftThreshold(nn.Module):
    """w -> w * sigmoid((|w| - t) / (T std)), t = softplus(theta) * std(w): a differentiable cut."""

    def __init__(self, weight: torch.Tensor, temperature: float) -> None:
        super().__init__()
        self.std = float(weight.detach().std()) or 1.0
        self.temperature = temperature
        self.theta = nn.Parameter(torch.tensor(-2.0, device=weight.device))  # t starts near 0.13 std

    def threshold(self) -> torch.Tensor:
        return F.softplus(self.theta) * self.std

    def soft_mask(self, w: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((w.abs() - self.threshold()) / (self.temperature * self.std))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.soft_mask(w)


@_register("learnable-threshold", "learnable soft thresholds per layer driven to the sparsity target, then the exact cut")
class LearnableThreshold(_Regularized):
    def __init__(self, reg_epochs: float = 1.0, retrain_epochs: float = 1.0, lam: float = 10.0, temperature: float = 0.05) -> None:
        super().__init__(reg_epochs, retrain_epochs)
        self.lam, self.temperature = lam, temperature
        self.thresholds: dict[str, float] = {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "lam": self.lam, "temperature": self.temperature,
                "learned_thresholds": {k: round(v, 6) for k, v in self.thresholds.items()} or None}

    def penalty(self, run: MethodContext, target: float) -> tuple[Callable[[nn.Module], torch.Tensor], None]:
        skip = list(run.ignore)
        for m in weight_layers(run.model, skip).values():
            parametrize.register_parametrization(m, "weight", SoftThreshold(m.weight, self.temperature))  # type: ignore[arg-type]

        def pen(model: nn.Module) -> torch.Tensor:
            kept: Any = 0.0
            total = 0
            for m in weight_layers(model, skip).values():
                p: Any = m.parametrizations.weight  # type: ignore[union-attr]
                kept = kept + p[0].soft_mask(p.original).sum()
                total += p.original.numel()
            return self.lam * (kept / total - (1 - target)) ** 2  # type: ignore[no-any-return]

        return pen, None

    def before_cut(self, run: MethodContext) -> None:
        """Bake the hard cut |w| > t into the weights and drop the parametrizations."""
        for name, m in weight_layers(run.model, list(run.ignore)).items():
            if not parametrize.is_parametrized(m, "weight"):
                continue
            p: Any = m.parametrizations.weight  # type: ignore[union-attr]
            t = p[0].threshold().detach()
            self.thresholds[name] = float(t)
            w = p.original.detach().clone()
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            mod: Any = m
            with torch.no_grad():
                mod.weight.copy_(w * (w.abs() > t))
