"""Resume on a run it does not fit (another architecture, other data, another optimizer, fewer
epochs than done): one line naming both sides, the run as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import OPTS, one_line, snapshot

from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError
from deploy_prune.train import train_model

# -- F. resume on a run it does not fit ------------------------------------------------------------

@pytest.mark.parametrize(("kw", "message"), [
    ({"model_spec": "resnet20", "epochs": 4},
     r"holds a 'tiny-cnn' run, not 'resnet20'; resume it with --model tiny-cnn \(or no --model\), or train resnet20"),
    ({"epochs": 1}, r"already has 3 epochs, more than the 1 asked; give --epochs 3 or more to continue it, or a new --out"),
    ({"epochs": 0}, r"already has 3 epochs, more than the 0 asked"),
    ({"epochs": 4, "optimizer": "adamw"}, r"was trained with --optimizer sgd, not adamw"),
    ({"epochs": 4, "options": DataOptions(train_limit=600, image_size=16)},
     r"was trained on 10 classes of shape \[1, 32, 32\], but this data has 10 classes of shape \[1, 16, 16\]"),
])
def test_resume_that_does_not_fit_the_run(run: Path, kw: dict[str, Any], message: str) -> None:
    before = snapshot(run)
    spec, opts = kw.pop("model_spec", None), kw.pop("options", OPTS)
    with pytest.raises(UserError, match=message) as e:
        train_model(run, spec, "digits", opts, batch_size=32, resume=True, progress=False, **kw)
    assert str(run) in one_line(e)
    assert snapshot(run) == before  # metrics.json still says 3 epochs; nothing rewritten
