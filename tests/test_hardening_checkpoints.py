"""A checkpoint that is not ours: one line saying what the file is and that --trust-checkpoint
exists for a file the user trusts; such a file is never executed."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import one_line

from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError
from deploy_prune.export import export_run
from deploy_prune.models.checkpoint import FORMAT, load_model
from deploy_prune.train import train_model

# -- E. checkpoints that are not ours --------------------------------------------------------------

class _Plant:
    """Unpickling this would create ``marker``: proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(("kind", "message"), [
    ("pickle", r"is not a deploy-prune checkpoint: it is a plain Python pickle, which can run code"),
    ("torch.save", r"is not a deploy-prune checkpoint: it contains pickled Python objects \(\S*open\) that "
                   r"loading would run as code"),
])
def test_foreign_pickle_is_refused_and_never_run(tmp_path: Path, kind: str, message: str) -> None:
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    if kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": _Plant(marker)}, f)
    else:
        torch.save({"state_dict": _Plant(marker)}, path)
    loaders = [
        lambda: load_model(path),
        lambda: export_run(path, input_shape="1,32,32"),
        lambda: train_model(tmp_path / "run", None, "digits", DataOptions(train_limit=64), weights=str(path),
                            epochs=1, progress=False),
    ]
    for load in loaders:
        with pytest.raises(UserError, match=message) as e:
            load()
        msg = one_line(e)
        assert "--trust-checkpoint" in msg and "weights_only" not in msg and "corrupt" not in msg
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "evil.onnx").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"not a checkpoint at all", "corrupt or not a torch file"),
    (b"", r"corrupt or not a torch file \(EOFError\)"),
])
def test_damaged_files_are_called_corrupt_not_trusted(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        load_model(tmp_path / "bad.pt")
    assert "--trust-checkpoint" not in one_line(e)


@pytest.mark.parametrize(("ckpt", "message"), [
    ({"format": FORMAT, "version": 1, "state_dict": {}}, "is a damaged deploy-prune checkpoint"),
    ({"format": FORMAT, "version": 1, "model": {"spec": "tiny-cnn"}, "state_dict": {}}, "is a damaged deploy-prune"),
    ({"format": FORMAT, "version": 99, "model": {}, "state_dict": {}}, r"version 99 checkpoint from a newer deploy-prune"),
])
def test_our_format_with_missing_parts(tmp_path: Path, ckpt: dict[str, Any], message: str) -> None:
    torch.save(ckpt, tmp_path / "ck.pt")
    with pytest.raises(UserError, match=message) as e:
        load_model(tmp_path / "ck.pt")
    one_line(e)
