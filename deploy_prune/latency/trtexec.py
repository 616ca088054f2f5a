"""Import measurements that ``trtexec`` wrote, as an alternative to timing through the backend.

``trtexec --exportTimes=FILE`` writes a JSON list with one record per timed inference::

    [ { "startEnqMs": .., "endEnqMs": .., "startH2dMs": .., "endH2dMs": .., "startComputeMs": ..,
        "endComputeMs": .., "startD2hMs": .., "endD2hMs": .., "h2dMs": .., "computeMs": ..,
        "d2hMs": .., "latencyMs": .. }, ... ]

(older versions add ``"endToEndMs"`` and also wrote the warm-up queries; newer ones skip them).
``load_times`` summarizes ``computeMs``, trtexec's "GPU Compute Time" (``endComputeMs -
startComputeMs``, from CUDA events around the enqueue): the same quantity as the tensorrt
backend's ``time_once``, which records CUDA events around ``execute_async_v3``. ``latencyMs`` would
add the host/device copies, which our timing keeps outside the measured region.

``trtexec --exportProfile=FILE`` (with ``--profilingVerbosity=detailed`` for readable names)
writes ``[{"count": N}, {"name": .., "timeMs": .., "averageMs": .., "medianMs": .., "percentage":
..}, ...]``: the iteration count, then one record per engine layer with its total, mean and
median time over the N profiled runs (``medianMs`` only in newer versions). ``load_profile``
returns layer name -> median ms, or mean ms where the file has no median.

Formats as written by ``exportJSONTrace`` and ``Profiler::exportJSONProfile`` in TensorRT's
``samples/common/sampleReporting.cpp``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from deploy_prune.errors import UserError
from deploy_prune.latency.timing import Stats, summarize


def _read(path: str | Path, what: str) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"trtexec {what} file {str(p)!r} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"trtexec {what} file {str(p)!r} is not JSON ({e}); regenerate it with trtexec") from None
    except (ValueError, RecursionError) as e:  # an integer of 5000 digits; deep nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        raise UserError(f"trtexec {what} file {str(p)!r} is not readable ({why}); regenerate it with trtexec") from None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def load_times(path: str | Path, rounds: int = 1, warmup_ms: float = 0.0) -> Stats:
    """Latency statistics of the per-inference GPU compute times (``computeMs``) in an
    ``--exportTimes`` file.

    ``rounds`` splits the time-ordered trace into that many consecutive chunks, so that the
    per-round medians and their CV show drift over the run as they do for our own rounds.
    ``warmup_ms`` drops inferences whose compute started earlier (older trtexec versions exported
    their warm-up queries too; pass trtexec's ``--warmUp``, 200 by default, for those).
    """
    p = str(path)
    data = _read(path, "times")
    if not isinstance(data, list):
        raise UserError(f"trtexec times file {p!r} must hold a JSON list of per-inference records "
                        f"(trtexec --exportTimes=FILE), not a {type(data).__name__}")
    times = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or _number(rec.get("computeMs")) is None:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"trtexec times file {p!r}: record {i} has no numeric 'computeMs' (has {keys}); "
                            "is it an --exportTimes file?")
        start = _number(rec.get("startComputeMs"))
        if warmup_ms > 0 and start is not None and start < warmup_ms:
            continue
        times.append(float(rec["computeMs"]))
    if not times:
        raise UserError(f"trtexec times file {p!r} holds no inference records"
                        + (f" after the first {warmup_ms} ms" if warmup_ms > 0 else "")
                        + "; run trtexec with --exportTimes again")
    if not 1 <= rounds <= len(times):
        raise UserError(f"rounds must be between 1 and the {len(times)} records of {p!r}, got {rounds}")
    return summarize([chunk.tolist() for chunk in np.array_split(np.asarray(times), rounds)])


def load_profile(path: str | Path) -> dict[str, float]:
    """Layer name -> median ms (mean ms where the file has no median) from an ``--exportProfile`` file.

    A name that occurs more than once (two layers of one name) gets the sum of their times.
    """
    p = str(path)
    data = _read(path, "profile")
    head = data[0] if isinstance(data, list) and data else None
    if not (isinstance(head, dict) and _number(head.get("count")) is not None):
        raise UserError(f"trtexec profile file {p!r} must be a JSON list starting with {{\"count\": N}} "
                        "(trtexec --exportProfile=FILE)")
    out: dict[str, float] = {}
    for i, rec in enumerate(data[1:], start=1):
        ms = _number(rec.get("medianMs")) if isinstance(rec, dict) else None
        if ms is None and isinstance(rec, dict):
            ms = _number(rec.get("averageMs"))
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or ms is None:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"trtexec profile file {p!r}: record {i} needs a 'name' and a numeric 'medianMs' or "
                            f"'averageMs' (has {keys})")
        out[rec["name"]] = out.get(rec["name"], 0.0) + ms
    if not out:
        raise UserError(f"trtexec profile file {p!r} holds no layer records; run trtexec with --exportProfile again")
    return out
