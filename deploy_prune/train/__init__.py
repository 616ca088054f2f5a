"""Fine-tuning / training loop with per-epoch checkpoints, resume, and DDP under torchrun.

The loop knows nothing about pruning: methods hook in through ``after_step`` callbacks
(e.g. to re-apply masks) and an optional ``loss_fn`` (e.g. knowledge distillation).
Under ``torchrun --nproc-per-node N`` it uses DistributedDataParallel with the gloo backend
(CPU) or nccl (CUDA); rank 0 writes checkpoints and metrics.

A run directory holds ``model.pt``, ``metrics.json``, ``checkpoints/last.pt`` and, once
exported, ``model.onnx`` (+ ``.json``). ``train_model`` refuses a directory that already holds
a run unless told to ``resume`` it or ``overwrite`` it, a compress run's directory, and an ``out``
that holds its own ``weights``; it locks ``out`` while it writes (``io.RunLock``). ``overwrite``
sets the old run's files aside once the inputs are good (``io.SetAside``: so no stale
``model.onnx`` survives beside a new ``model.pt``), deletes them when the new run finishes and
puts them back when it fails with an exception. ``fit``
deletes the exports beside ``model.pt`` whenever it writes a changed one. A failed run leaves no empty ``out`` or
``checkpoints/`` directory, and temp files of a killed write are removed by the next run.

This is one module, at about the usual length, because it is one training loop: the run
directory's checkpoints, the resume checks and the DDP set-up all serve ``fit`` and
``train_model``, and the two helpers beside them (``recalibrate_bn``, ``distillation_loss``) are small.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from deploy_prune.checks import check_number
from deploy_prune.data import DataBundle, make_loader
from deploy_prune.distributed import world as distributed_world
from deploy_prune.errors import UserError
from deploy_prune.io import (
    ASIDE,
    RunLock,
    SetAside,
    ensure_dir,
    provenance,
    refuse_input_as_output,
    remove_if_empty,
    write_json,
)
from deploy_prune.models.checkpoint import _unwrap, load_checkpoint, remove_stale_temps, save_checkpoint

OPTIMIZERS = ("sgd", "adamw")
RUN_FILES = ("model.pt", "metrics.json", "model.onnx", "model.onnx.json", "checkpoints/last.pt")  # one run's results
EXPORTS = ("model.onnx", "model.onnx.json")  # derived from model.pt: stale once it changes
# What --overwrite sets aside (``io.SetAside``): RUN_FILES by their names in the run directory.
REPLACED = tuple(dict.fromkeys(n.split("/")[0] for n in RUN_FILES))


@dataclass
class TrainConfig:
    """Training settings, checked on construction: a zero batch size or a NaN learning rate is
    one line naming the flag, not a ZeroDivisionError or a diverged run. ``epochs=0`` is valid:
    it evaluates and saves the starting model (e.g. ``--weights`` made into a run directory)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    seed: int = 0
    eval_batch_size: int = 512
    # Training batches BatchNorm statistics are re-estimated on after every epoch (``precise_bn``); 0: never.
    bn_batches: int = 16

    def __post_init__(self) -> None:
        check_number("--epochs", self.epochs, lo=0, integer=True)
        check_number("--batch-size", self.batch_size, lo=1, integer=True)
        check_number("--lr", self.lr, lo=0, lo_open=True)
        check_number("momentum", self.momentum, lo=0, hi=1, hi_open=True)
        check_number("--weight-decay", self.weight_decay, lo=0)
        check_number("label_smoothing", self.label_smoothing, lo=0, hi=1, hi_open=True)
        check_number("--seed", self.seed, integer=True)
        check_number("eval_batch_size", self.eval_batch_size, lo=1, integer=True)
        check_number("bn_batches", self.bn_batches, lo=0, integer=True)
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def default_device() -> str:
    """Where training runs: CUDA only when asked for (``DEPLOY_PRUNE_DEVICE=cuda``) and present;
    under torchrun, the GPU of this process's ``LOCAL_RANK``."""
    if not (torch.cuda.is_available() and os.environ.get("DEPLOY_PRUNE_DEVICE", "cpu") == "cuda"):
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 512, device: str = "cpu") -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy on ``ds``."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in make_loader(ds, batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "n": total}


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; valid: sgd, adamw")


@contextlib.contextmanager
def _no_empty_dirs(out: Path) -> Iterator[None]:
    """On failure, remove an empty ``checkpoints/``, and ``out`` when this call made it and left
    it empty (a directory that was there before is left as it was)."""
    fresh = not out.exists()
    try:
        yield
    except BaseException:
        remove_if_empty(out / "checkpoints")
        if fresh:
            remove_if_empty(out)
        raise


def _remove(out: Path, names: Sequence[str]) -> None:
    for name in names:
        (out / name).unlink(missing_ok=True)


def _resume_point(last: Path, meta: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """``last.pt`` checked against this run: the same architecture and data shape (else
    ``load_state_dict`` fails with a traceback), the same optimizer (else its state does not
    load), and no more epochs done than asked (we refuse rather than report ``epochs: 1`` for a
    model trained 3)."""
    if not last.is_file():
        raise UserError(f"nothing to resume: {str(last)!r} does not exist; run without --resume")
    ck = load_checkpoint(last)
    if not isinstance(ck, dict) or not all(k in ck for k in ("state_dict", "optimizer", "scheduler", "epoch", "history")):
        raise UserError(f"{str(last)!r} is not a training checkpoint (no optimizer state or epoch); "
                        "run without --resume, with --overwrite to replace the run")
    old, new = ck.get("model") or {}, meta.get("model") or {}
    run = last.parent.parent
    if old.get("spec") != new.get("spec"):
        raise UserError(f"{str(run)!r} holds a {old.get('spec')!r} run, not {new.get('spec')!r}; resume it with "
                        f"--model {old.get('spec')} (or no --model), or train {new.get('spec')} into a new --out")
    was = (old.get("num_classes"), ck.get("input_shape"))
    now = (new.get("num_classes"), meta.get("input_shape"))
    if was != now:
        raise UserError(f"{str(run)!r} was trained on {was[0]} classes of shape {was[1]}, but this data has {now[0]} "
                        f"classes of shape {now[1]}; resume with the run's --data/--image-size, or use a new --out")
    opt = (ck.get("config") or {}).get("optimizer", cfg.optimizer)
    if opt != cfg.optimizer:
        raise UserError(f"{str(run)!r} was trained with --optimizer {opt}, not {cfg.optimizer}; resume with "
                        f"--optimizer {opt}, or use a new --out")
    if ck["epoch"] > cfg.epochs:
        raise UserError(f"{str(run)!r} already has {ck['epoch']} epochs, more than the {cfg.epochs} asked; give "
                        f"--epochs {ck['epoch']} or more to continue it, or a new --out")
    return ck


def _val_figures(model: nn.Module, data: DataBundle, ds: Dataset, cfg: TrainConfig, device: str) -> dict[str, Any]:
    """Top-1 accuracy and cross-entropy on ``ds`` for a classifier's data; for other tasks (a
    detector, a user loss over other items) None: the run's own metric scores those."""
    if data.task != "classify" or data.num_classes < 1:
        return {"accuracy": None, "loss": None, "n": len(ds)}  # type: ignore[arg-type]
    return evaluate(model, ds, cfg.eval_batch_size, device)


def fit(
    model: nn.Module,
    data: DataBundle,
    cfg: TrainConfig,
    out_dir: str | Path,
    meta: dict[str, Any],
    *,
    resume: bool = False,
    loss_fn: LossFn | None = None,
    after_step: Sequence[Callable[[nn.Module], None]] = (),
    progress: bool = True,
    stop: Callable[[nn.Module, int], bool] | None = None,
    distributed: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data.train``; write ``checkpoints/last.pt`` every epoch, then
    ``model.pt`` and ``metrics.json`` in ``out_dir``. Returns the metrics dict.
    ``on_step(done, total)`` follows the optimizer steps (a caller's own progress display).

    ``stop(model, epochs_done)``, called after each epoch, ends training early when it returns
    True (InCoP's flow criterion); ``epochs_run`` in the metrics says how many epochs ran.
    A resumed run must match ``last.pt`` (see ``_resume_point``). Under torchrun every rank
    trains its shard with DDP; ``distributed=False`` trains on this process alone.
    """
    out = Path(out_dir)
    with _no_empty_dirs(out):
        return _fit(model, data, cfg, out, meta, resume=resume, loss_fn=loss_fn, after_step=after_step,
                    progress=progress, stop=stop, distributed=distributed, on_step=on_step)


def _fit(
    model: nn.Module, data: DataBundle, cfg: TrainConfig, out: Path, meta: dict[str, Any], *, resume: bool,
    loss_fn: LossFn | None, after_step: Sequence[Callable[[nn.Module], None]], progress: bool,
    stop: Callable[[nn.Module, int], bool] | None, distributed: bool, on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    rank, world = distributed_world() if distributed else (0, 1)
    if rank == 0:
        ensure_dir(out / "checkpoints")
        remove_stale_temps(out, ("model.pt", "metrics.json", *EXPORTS))
        remove_stale_temps(out / "checkpoints", ("last.pt",))
    last = out / "checkpoints" / "last.pt"
    device = default_device()
    model.to(device)
    torch.manual_seed(cfg.seed)
    opt = _make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    start_epoch, history, train_seconds = 0, [], 0.0
    if resume:
        ck = _resume_point(last, meta, cfg)
        try:
            _unwrap(model).load_state_dict(ck["state_dict"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"cannot resume from {str(last)!r}: it does not fit this model ({str(e).splitlines()[0]}); "
                            "use a new --out") from None
        start_epoch, history, train_seconds = ck["epoch"], list(ck["history"]), float(ck.get("train_seconds", 0.0))
    resumed_epochs = len(history)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    sampler: DistributedSampler | None = DistributedSampler(data.train, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    criterion = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y, label_smoothing=cfg.label_smoothing))

    bar = _progress(progress and rank == 0)
    with bar:
        steps = math.ceil(len(data.train) / (cfg.batch_size * world))  # type: ignore[arg-type]
        total, done = (cfg.epochs - start_epoch) * steps, 0
        task = bar.add_task("train", total=total)
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, sampler=sampler)
            model.train()
            loss_sum, n = 0.0, 0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                loss = criterion(model, x, y)
                if not torch.isfinite(loss):
                    raise UserError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for cb in after_step:
                    cb(_unwrap(model))
                loss_sum += loss.item() * len(x)
                n += len(x)
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / n:.3f}")
                done += 1
                if on_step is not None and rank == 0:
                    on_step(min(done, total), total)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            precise_bn(_unwrap(model), data, cfg, epoch)
            train_seconds += time.perf_counter() - t0
            ev = _val_figures(_unwrap(model), data, data.val, cfg, device)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1), "val_accuracy": ev["accuracy"],
                            "val_loss": ev["loss"], "lr": lr, "seconds": time.perf_counter() - t0})
            if rank == 0:
                save_checkpoint(last, model, meta, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                epoch=epoch + 1, history=history, train_seconds=train_seconds, config=asdict(cfg))
            if stop is not None and stop(_unwrap(model), epoch + 1):
                break
    final = _val_figures(_unwrap(model), data, data.val, cfg, device)
    metrics: dict[str, Any] = {
        "val_accuracy": final["accuracy"], "val_loss": final["loss"], "val_size": final["n"],
        "epochs": cfg.epochs, "epochs_run": len(history), "train_seconds": round(train_seconds, 3), "world_size": world, "steps_per_epoch": steps,
        "config": asdict(cfg), "history": history,
    }
    if data.test is not None:
        metrics["test_accuracy"] = _val_figures(_unwrap(model), data, data.test, cfg, device)["accuracy"]
    if rank == 0:
        if not resume or len(history) > resumed_epochs:  # a changed model.pt: its old exports are stale
            _remove(out, EXPORTS)
        save_checkpoint(out / "model.pt", model, {**meta, "metrics": {k: metrics[k] for k in ("val_accuracy", "epochs")}})
        metrics["provenance"] = provenance(threads=torch.get_num_threads())
        write_json(out / "metrics.json", metrics)
    if world > 1:
        dist.barrier()
    return metrics


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )


def train_model(
    out: str | Path,
    model_spec: str | None,
    data_spec: str,
    data_options: Any,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.05,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    weights: str | None = None,
    trust: bool = False,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``deploy-prune train``: build or load a model, check it fits the data, and ``fit`` it.

    ``out`` must not hold a run (any of ``RUN_FILES``) unless ``resume`` (continue it: same
    model, data and optimizer, ``epochs`` at least those done) or ``overwrite`` (train afresh:
    the old run waits in ``out/.replaced-run/`` once the inputs are checked, goes when the new
    run finishes and comes back if it fails with an exception; a killed run leaves it there,
    and ``resume`` then finishes the replacement). Settings are checked before any data is read.
    """
    from deploy_prune.data import load_data
    from deploy_prune.models import check_runs_on
    from deploy_prune.models.checkpoint import load_model

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      weight_decay=weight_decay, seed=seed)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a run directory")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # share the cores between the processes instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 alone writes, and locks, the run
    # exits in reverse: the lock (and its file) goes before an empty directory is removed
    with _no_empty_dirs(out), (RunLock(out) if writer else contextlib.nullcontext()):
        old = _check_out(out, resume, overwrite, weights)
        data = load_data(data_spec, data_options)
        if resume and model_spec is None and weights is None:
            last = out / "checkpoints" / "last.pt"
            if not last.is_file():
                raise UserError(f"nothing to resume: {str(last)!r} does not exist; run without --resume")
            ck = load_checkpoint(last)
            model_spec = (ck.get("model") or {}).get("spec") if isinstance(ck, dict) else None
        if weights is not None:
            model, _ = load_model(weights, model_spec, num_classes=data.num_classes, in_channels=data.in_channels, trust=trust)
            spec = model_spec or _ckpt_spec(weights, trust) or "unknown"
        else:
            spec = model_spec or "tiny-cnn"
            torch.manual_seed(seed)
            model, _ = load_model(None, spec, num_classes=data.num_classes, in_channels=data.in_channels)
        check_runs_on(model, data.input_shape, data.num_classes)
        meta = {
            "model": {"spec": spec, "num_classes": data.num_classes, "in_channels": data.in_channels},
            "input_shape": list(data.input_shape),
            "data": data.describe(),
        }
        if writer and old.replacing:  # the inputs are good: now the old run goes aside
            old.set_aside()
        try:
            metrics = fit(model, data, cfg, out, meta, resume=resume, progress=progress)
        except Exception as e:
            if not (writer and old.fail()):
                raise
            if isinstance(e, UserError):
                raise type(e)(SetAside.restored(str(e), out)) from None
            raise
        if writer:
            old.finish()
    metrics["rank"] = dist.get_rank() if dist.is_initialized() else 0
    return metrics


def _check_out(run: Path, resume: bool, overwrite: bool, weights: str | None = None) -> SetAside:
    """Refuse to train over a run without being told what to do with it, into a compress run, or
    over the ``weights`` it starts from. Returns the old run that ``overwrite`` replaces."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass only one")
    refuse_input_as_output("--out", run, [*(run / n for n in REPLACED), run / ASIDE], [("--weights", weights)])
    compress = [n for n in ("report.json", "checkpoints/state.pt") if (run / n).is_file()]
    if compress:
        raise UserError(f"{str(run)!r} holds a compress run ({compress[0]}); train into another --out")
    old = SetAside(run, "train", REPLACED)
    if old.interrupted(resume, overwrite, resumable=(run / "checkpoints" / "last.pt").is_file()):
        return old
    found = [n for n in RUN_FILES if (run / n).exists()]
    if found and not (resume or overwrite):
        raise UserError(f"{str(run)!r} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out")
    old.replacing = bool(found) and overwrite
    return old


def _ckpt_spec(weights: str, trust: bool) -> str | None:
    ck = load_checkpoint(weights, trust=trust)
    return ck.get("model", {}).get("spec") if isinstance(ck, dict) else None


def precise_bn(model: nn.Module, data: DataBundle, cfg: TrainConfig, epoch: int) -> None:
    """Re-estimate BatchNorm statistics on ``cfg.bn_batches`` training batches with the epoch's
    final weights ("precise BN", as pycls does before every evaluation). The running averages
    that training leaves lag behind weights still moving: a ResNet-20 cut to 4-channel layers and
    fine-tuned one epoch scored 51.41 % on them and 85.13 % with them re-estimated
    (benchmarks/results/precise_bn_resnet20_40.md). The batches come from one seeded loader, the
    same on every DDP rank, so the ranks agree."""
    if cfg.bn_batches <= 0:
        return
    loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed + 7919 * (epoch + 1))
    recalibrate_bn(model, [b for _, b in zip(range(cfg.bn_batches), loader, strict=False)])


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Re-estimate BatchNorm running statistics on a few training batches, no weight update.

    Pruning changes the distribution every downstream BN sees, so its stored statistics are
    stale and a pruned model can score near chance before fine-tuning. Re-estimating them
    ("adaptive BN", EagleEye, Li et al. 2020) makes one-shot accuracy a meaningful signal.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [m.momentum for m in bns]
    device = next(model.parameters()).device
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for x, _ in batches:
        model(x.to(device))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    return model.eval()


def distillation_loss(teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.5) -> LossFn:
    """Knowledge distillation (Hinton et al. 2015): ``(1 - alpha) * CE(student, y) + alpha * T^2 *
    KL(teacher_T || student_T)``, with both soft distributions at temperature ``T``.

    T = 4 and alpha = 0.5 are common defaults for CIFAR-scale classifiers; the teacher (the
    unpruned model) runs in eval mode without gradients.
    """
    teacher.eval()

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        with torch.no_grad():
            t = teacher.to(x.device)(x)
        kd = F.kl_div(F.log_softmax(out / temperature, 1), F.log_softmax(t / temperature, 1),
                      reduction="batchmean", log_target=True)
        return (1 - alpha) * F.cross_entropy(out, y) + alpha * temperature**2 * kd

    return loss
