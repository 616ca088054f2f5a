"""Compress under ``torchrun``: rank 0 runs the pipeline; every other rank only fine-tunes.

Rank 0 profiles, measures, plans, prunes and writes everything, exactly as a single process
does. Each time it fine-tunes, it sends the job to the other ranks (``send_job``): the pruned
architecture (as the checkpoint records it) and weights, the masks and the job's settings.
Every rank rebuilds that model and runs the same ``run_job`` on its shard of the training data;
DDP keeps the weights equal, so rank 0 continues with the model all of them trained. At the
end rank 0 sends the report and the final weights, and every rank returns them.

Latency is measured by rank 0 alone while the others wait in a blocking receive, so the
measurement shares the machine only with idle processes.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from deploy_prune.data import load_data
from deploy_prune.distributed import broadcast
from deploy_prune.pipeline.config import CompressConfig
from deploy_prune.pipeline.run import FitJob, UserParts, run_job, unpruned_model
from deploy_prune.transforms import rebuild_pruned


def _state(model: nn.Module) -> dict[str, Any]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def send_job(job: FitJob, model: nn.Module, teacher: nn.Module | None) -> None:
    """From rank 0: one fine-tuning for every rank (``teacher``: the unpruned model, sent once)."""
    broadcast({"kind": "fit", "job": job, "state": _state(model),
               "teacher": _state(teacher) if teacher is not None else None})


def send_done(report: dict[str, Any], model: nn.Module, pruned: dict[str, Any]) -> None:
    """From rank 0: the run is over; its report and final model for every rank to return."""
    broadcast({"kind": "done", "report": report, "state": _state(model), "pruned": pruned})


def serve(cfg: CompressConfig, parts: UserParts) -> tuple[dict[str, Any], nn.Module]:
    """On ranks other than 0: run the fine-tunings rank 0 sends until it sends the end; returns
    the run's report and pruned model."""
    data = parts.data or load_data(cfg.data, cfg.data_options)
    base = unpruned_model(cfg, parts, data)[0]
    teacher = copy.deepcopy(base).eval()
    shape = tuple(data.input_shape)
    built: tuple[Any, nn.Module] | None = None  # the last architecture rebuilt: steps often repeat it
    while True:
        msg = broadcast()
        pruned = msg["pruned"] if msg["kind"] == "done" else msg["job"].meta["pruned"]
        if built is None or built[0] != pruned:
            built = pruned, rebuild_pruned(copy.deepcopy(base), pruned, shape)
        model = built[1]
        model.load_state_dict(msg["state"])
        if msg["kind"] == "done":
            return msg["report"], model
        if msg["teacher"] is not None:
            teacher.load_state_dict(msg["teacher"])
        run_job(msg["job"], model, teacher, data, cfg, parts, cfg.out, distributed=True)
