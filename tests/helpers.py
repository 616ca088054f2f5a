"""Small helpers the bad-input test modules share (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy_prune.data import DataOptions
from deploy_prune.errors import UserError

OPTS = DataOptions(train_limit=600)  # what the tiny_run fixture was trained with (3 epochs, batch 32)


def one_line(e: pytest.ExceptionInfo[UserError]) -> str:
    """The error's message, asserted to be one line."""
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory under ``d``: equal snapshots, untouched directory."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}
