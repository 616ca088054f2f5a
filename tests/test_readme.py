"""The README's quick start runs as written: its Python blocks, in order, in a fresh process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart_blocks() -> list[str]:
    """The ```python blocks that follow a ``<!-- quickstart`` marker line."""
    return re.findall(r"^<!-- quickstart[^\n]*-->\n```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_the_readme_marks_its_quick_start() -> None:
    blocks = quickstart_blocks()
    assert len(blocks) == 2
    assert "dp.compress(" in blocks[0] and "budget=dp.Latency(ms=5)" in blocks[0] and 'target="cpu-ort-1t"' in blocks[0]
    assert "planner.plan()" in blocks[1] and "planner.check(" in blocks[1]


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    code = "\n".join(quickstart_blocks())
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "runs" / "quickstart" / "report.json").read_text())
    assert rep["metric"]["name"] == "top1" and rep["metric"]["source"] == "evaluate callback"
    assert rep["budget"]["kind"] == "latency_ms" and rep["budget"]["latency_ms"] == 5.0
    assert rep["final"]["latency_ms"]["quiet"] < rep["baseline"]["latency_ms"]["quiet"]
    assert rep["final"]["flops"] < rep["baseline"]["flops"]
    assert (tmp_path / "runs" / "quickstart" / "model.onnx").is_file()
    assert re.search(r"Check\(met=(True|False), latency_ms=", r.stdout), r.stdout[-2000:]
