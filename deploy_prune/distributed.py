"""Processes started by ``torchrun``: which one this is, and messages from rank 0 to the rest.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) the process group is started on first
use, gloo on CPU and nccl when training runs on CUDA. Outside torchrun every call here is a
no-op for a single process (rank 0 of 1), so callers need no special case.
"""

from __future__ import annotations

import os
from typing import Any

# torch is imported inside the functions: the CLI asks ``is_main`` without loading it.


def world() -> tuple[int, int]:
    """(rank, world size), starting the process group when run under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and os.environ.get("DEPLOY_PRUNE_DEVICE", "cpu") == "cuda"
        if cuda:  # one GPU per process: nccl refuses two ranks on one device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), size


def is_main() -> bool:
    """Whether this process is rank 0 (the one that measures, plans and writes)."""
    return int(os.environ.get("RANK", "0")) == 0


def backend() -> str | None:
    """The process group's backend (``gloo``, ``nccl``), or None for a single process."""
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_initialized() else None


def broadcast(obj: Any = None) -> Any:
    """``obj`` from rank 0, on every rank (pickled; what other ranks pass is ignored)."""
    if world()[1] == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
