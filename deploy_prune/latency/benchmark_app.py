"""Import the statistics OpenVINO's ``benchmark_app`` wrote, as an alternative to timing through the backend.

``benchmark_app -m MODEL -report_type no_counters|average_counters|detailed_counters -report_folder DIR``
writes ``DIR/benchmark_report.csv``: ``;``-separated ``key;value`` lines in three sections, each
opened by a title line and closed by an empty line::

    Command line parameters
    ...
    Configuration setup
    topology;main_graph
    target device;CPU
    API;sync
    batch size;1
    number of parallel infer requests;1
    number of CPU streams;1
    ...
    Execution results
    total execution time (ms);123.45
    total number of iterations;100
    latency (ms);1.20
    avg latency;1.23
    min latency;1.10
    max latency;2.00
    throughput;812.30

The result names differ between the two benchmark_apps: the Python one (``pip install openvino``,
``openvino/tools/benchmark/main.py`` and ``utils/statistics_report.py``) writes ``latency (ms)``,
``avg latency``, ``min latency``, ``max latency``; the C++ one (``samples/cpp/benchmark_app/main.cpp``
and ``statistics_report.cpp``, through ``CsvDumper``, which ends every field with ``;``) writes
``Median latency (ms)``, ``Average latency (ms)``, ``Min latency (ms)``, ``Max latency (ms)``. With
``-latency_percentile N`` (N != 50) both write ``latency (N percentile) (ms)`` in place of the
median. ``throughput`` is frames per second: batch x iterations / total time. Both are read here.
The Python tool writes the figures with two decimals, so latencies resolve 0.01 ms.

With ``-pc`` and ``-report_type average_counters`` (or ``detailed_counters``) it also writes
``benchmark_average_counters_report.csv`` (``benchmark_detailed_counters_report.csv``): per layer
``layerName;execStatus;layerType;execType;realTime (ms);cpuTime (ms)``, closed by a ``Total`` row and
an empty line; the average file holds one such block (the requests' mean), the detailed file one
block per infer request. ``execStatus`` is ``EXECUTED``, ``NOT_RUN`` or ``OPTIMIZED_OUT`` (the Python
tool prefixes ``Status.``). ``load_counters`` returns layer name -> real time in ms of the executed
layers, the median over the blocks; ``kernel_precisions`` counts them by the precision their
``execType`` ends in (``brgconv_avx512_amx_bf16``: OpenVINO ran this fp32 layer in bf16).

benchmark_app's latency is the time of one request from start to completion. With several
parallel infer requests (its default ``-hint throughput`` on CPU) a request also waits behind the
others, so the figure is comparable with ``deploy-prune benchmark`` only for one request at a
time (``-hint latency``, or ``-api sync``); ``BenchmarkAppReport.parallel_requests`` says which it was.
"""

from __future__ import annotations

import csv
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy_prune.errors import UserError

REPORT_FILE = "benchmark_report.csv"
COUNTER_FILES = ("benchmark_average_counters_report.csv", "benchmark_detailed_counters_report.csv")
SECTIONS = {"command line parameters": "command_line", "configuration setup": "configuration",
            "execution results": "results"}
# result name (lower case) -> latency_ms key; both benchmark_apps' spellings
LATENCY_NAMES = {
    "latency (ms)": "median", "median latency (ms)": "median",
    "avg latency": "mean", "average latency (ms)": "mean",
    "min latency": "min", "min latency (ms)": "min",
    "max latency": "max", "max latency (ms)": "max",
}
PERCENTILE = re.compile(r"latency \((\d+) percentile\) \(ms\)")
STREAMS = re.compile(r"number of (.+) streams", re.IGNORECASE)
KERNEL_PRECISION = re.compile(r"_(f64|f32|bf16|f16|f8e4m3|f8e5m2|i64|i32|i8|u8|i4|u4|u1)$", re.IGNORECASE)


@dataclass
class BenchmarkAppReport:
    """What a ``benchmark_report.csv`` says, as deploy-prune figures (ms, inferences per second)."""

    latency_ms: dict[str, float]  # median (or pNN with -latency_percentile), mean, min, max
    throughput_per_s: float | None  # benchmark_app's "throughput": frames per second
    iterations: int | None
    duration_ms: float | None
    batch: int | None
    device: str | None
    api: str | None  # sync | async
    parallel_requests: int | None
    streams: dict[str, int] = field(default_factory=dict)  # device -> streams
    sections: dict[str, dict[str, str]] = field(default_factory=dict)  # every key;value line, as written

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rows(path: Path, what: str) -> list[list[str]]:
    """The file's ``;``-separated rows, trailing empty fields (the C++ tool's) removed."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter=";", quoting=csv.QUOTE_NONE))  # both tools write fields unquoted
    except FileNotFoundError:
        raise UserError(f"benchmark_app {what} file {str(path)!r} not found") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"benchmark_app {what} file {str(path)!r} is not a benchmark_app CSV ({e}); "
                        "regenerate it with benchmark_app -report_folder DIR") from None
    out = []
    for row in rows:
        while row and not row[-1].strip():
            row.pop()
        out.append([c.strip() for c in row])
    return out


def report_files(path: str | Path) -> tuple[Path, Path | None]:
    """The statistics file and the counters file (if any) of a ``-report_folder`` directory, or
    ``path`` itself when it names the statistics file."""
    p = Path(path)
    if not p.is_dir():
        return p, None
    report = p / REPORT_FILE
    if not report.is_file():
        raise UserError(f"{str(p)!r} holds no {REPORT_FILE}; give the folder benchmark_app wrote with "
                        f"-report_folder, or the file itself")
    counters = next((p / n for n in COUNTER_FILES if (p / n).is_file()), None)
    return report, counters


def _number(text: str, where: str, integer: bool = False) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number; is it a benchmark_app report?") from None
    if v != v or v in (float("inf"), float("-inf")) or (integer and v != int(v)):
        raise UserError(f"{where}: {text!r} is not a {'whole' if integer else 'finite'} number")
    return v


def load_report(path: str | Path) -> BenchmarkAppReport:
    """Latency, throughput and run configuration from a ``benchmark_report.csv`` (module doc)."""
    p = Path(path)
    if p.suffix == ".json":
        raise UserError(f"{str(p)!r} is benchmark_app's JSON report (-json_stats); run benchmark_app without "
                        f"-json_stats and give its {REPORT_FILE}")
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for row in _rows(p, "report"):
        if not row:
            current = None
        elif len(row) == 1 and row[0].lower() in SECTIONS:
            current = sections.setdefault(SECTIONS[row[0].lower()], {})
        elif current is not None and len(row) >= 2:
            # The first of a name counts: with -pcseq the Python tool repeats avg/min/max per shape group
            # after the overall figures. A value holding ';' stays whole.
            current.setdefault(row[0], ";".join(row[1:]))
    results = {k.lower(): v for k, v in sections.get("results", {}).items()}
    if "error" in results:
        raise UserError(f"{str(p)!r}: benchmark_app stopped with an error: {results['error']}; fix it and run again")
    latency: dict[str, float] = {}
    for name, value in results.items():
        where = f"{str(p)!r}, {name!r}"
        if name in LATENCY_NAMES:
            latency[LATENCY_NAMES[name]] = _number(value, where)
        elif (m := PERCENTILE.fullmatch(name)) is not None:
            latency[f"p{int(m.group(1))}"] = _number(value, where)
    if not latency:
        raise UserError(f"{str(p)!r} has no latency results (an 'Execution results' section with 'latency (ms)'); "
                        "is it the benchmark_report.csv of a finished benchmark_app run (not a MULTI device)?")
    conf = {k.lower(): v for k, v in sections.get("configuration", {}).items()}

    def num(d: dict[str, str], key: str, integer: bool = False) -> float | None:
        return _number(d[key], f"{str(p)!r}, {key!r}", integer) if d.get(key, "") != "" else None

    iterations, batch, nireq = num(results, "total number of iterations", True), num(conf, "batch size", True), \
        num(conf, "number of parallel infer requests", True)
    streams = {m.group(1): int(_number(v, f"{str(p)!r}, {k!r}", True))  # the device as written ("CPU")
               for k, v in sections.get("configuration", {}).items() if (m := STREAMS.fullmatch(k)) is not None}
    return BenchmarkAppReport(
        latency_ms=latency, throughput_per_s=num(results, "throughput"),
        iterations=None if iterations is None else int(iterations), duration_ms=num(results, "total execution time (ms)"),
        batch=None if batch is None else int(batch), device=conf.get("target device"), api=conf.get("api"),
        parallel_requests=None if nireq is None else int(nireq), streams=streams, sections=sections,
    )


def _executed(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, {column: cell}) of every executed layer row of a counters file."""
    out: list[tuple[int, dict[str, str]]] = []
    header: list[str] | None = None
    for i, row in enumerate(_rows(path, "counters"), start=1):
        if not row:  # a block ends
            header = None
            continue
        if row[0] == "Total":
            continue
        if row[0] == "layerName":
            header = row
            continue
        if header is None or len(row) < len(header):
            raise UserError(f"benchmark_app counters file {str(path)!r}, line {i}: not a layer row under a "
                            "'layerName;execStatus;...' header; is it a benchmark_*_counters_report.csv?")
        rec = dict(zip(header, row, strict=False))
        if rec.get("execStatus", "").removeprefix("Status.") != "EXECUTED":
            continue
        if "realTime (ms)" not in rec:
            raise UserError(f"benchmark_app counters file {str(path)!r} has no 'realTime (ms)' column (has {header})")
        out.append((i, rec))
    if not out:
        raise UserError(f"benchmark_app counters file {str(path)!r} holds no executed layers; run benchmark_app with "
                        "-pc -report_type average_counters (or detailed_counters) again")
    return out


def load_counters(path: str | Path) -> dict[str, float]:
    """Layer name -> real time (ms) of each executed layer in an average or detailed counters file;
    the median over its blocks (one per infer request in a detailed file)."""
    p = Path(path)
    times: dict[str, list[float]] = {}
    for i, rec in _executed(p):
        times.setdefault(rec["layerName"], []).append(_number(rec["realTime (ms)"], f"{str(p)!r}, line {i}"))
    return {name: float(statistics.median(v)) for name, v in times.items()}


def kernel_precisions(path: str | Path) -> dict[str, int]:
    """Executed layers per kernel precision, read from ``execType``'s suffix (``brgconv_avx512_amx_bf16``
    -> ``bf16``; ``other`` where it names none): OpenVINO runs an fp32 model in bf16 on CPUs with bf16 units unless benchmark_app is
    given ``-infer_precision f32``, and this shows which it did."""
    seen: dict[str, set[str]] = {}
    for _, rec in _executed(Path(path)):
        m = KERNEL_PRECISION.search(rec.get("execType", ""))
        seen.setdefault(m.group(1).lower() if m else "other", set()).add(rec["layerName"])
    return {k: len(v) for k, v in sorted(seen.items())}
