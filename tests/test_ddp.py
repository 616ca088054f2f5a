"""DDP under torchrun with 2 processes (gloo on CPU), on tiny data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "deploy_prune.cli", "train", "--data", "digits", "--train-limit", "256", "--epochs", "1",
           "--batch-size", "32", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # each process saw half of the 256 samples: 4 steps of 32, not 8
    assert metrics["steps_per_epoch"] == 4
    assert (out / "model.pt").is_file()
