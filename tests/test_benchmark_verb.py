"""``deploy-prune benchmark``'s figures (p95, p99, min, throughput at the batch, rows named by path)
on real ONNX Runtime, and ``deploy-prune benchmark-app``: OpenVINO benchmark_app's statistics report
and per-layer counters read as deploy-prune figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from deploy_prune.cli import app, benchmark_table
from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.latency.benchmark import benchmark
from deploy_prune.latency.benchmark_app import kernel_precisions, load_counters, load_report, report_files
from deploy_prune.latency.timing import Stats, summarize

runner = CliRunner()
QUICK = ["--warmup", "2", "--repeats", "20", "--rounds", "2", "--min-time", "0"]


def _mlp(path: Path, width: int, batch: int | str = 1, seed: int = 0) -> Path:
    """A MatMul + Relu graph, input [batch, width]; ``batch`` a name makes the axis symbolic."""
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((width, width)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _quick(name: str, batch: int = 1) -> Target:
    return Target(name=name, backend="onnxruntime", threads=1, batch=batch,
                  protocol=Protocol(warmup=2, repeats=20, rounds=2, min_time_s=0.0))


# --- Stats ---------------------------------------------------------------------------------------


def test_summarize_gives_tail_percentiles_and_min() -> None:
    s = summarize([[float(v) for v in range(1, 51)], [float(v) for v in range(51, 101)]])
    assert s.min == 1.0 and s.max == 100.0
    assert s.p95 == pytest.approx(np.percentile(np.arange(1, 101), 95))
    assert s.p99 == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert s.p95 is not None and s.p99 is not None and s.median < s.p90 < s.p95 < s.p99 < s.max
    d = s.as_dict()
    # added beside the keys readers already use, none renamed
    assert {"median", "p90", "mean", "min", "max", "iqr", "mad", "n", "rounds", "round_medians", "round_cv",
            "quiet", "quiet_rounds", "p95", "p99"} <= set(d)


def test_stats_without_tails_still_load_and_print() -> None:
    """Stats from an agent that sends no p95/p99 (positional, as such code builds them) print '-'."""
    old = Stats(1.0, 1.2, 1.05, 0.9, 1.5, 0.1, 0.05, 20, 2, [1.0, 1.0], 0.0)
    assert old.p95 is None and old.as_dict()["p95"] is None
    res = {"results": [{"model": "m.onnx", "target": "t", "backend": "onnxruntime", "threads": 1,
                        "input_shape": [1, 8], "latency_ms": old.as_dict()}]}
    cells = _cells(_render(benchmark_table(res)))
    row = cells["m.onnx"]
    assert row["median"] == "1.000" and row["min"] == "0.900"
    assert row["p95"] == row["p99"] == row["inf/s"] == "-"


def test_agent_answers_with_and_without_tails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client reads the tail percentiles an agent sends, and an answer without them (an agent of
    the version before) still gives Stats, with the tails None."""
    from deploy_prune.latency.remote import AgentMeasurer

    monkeypatch.setenv("DP_TEST_TOKEN", "t")
    target = Target(name="far", backend="onnxruntime", threads=1, agent={"url": "http://127.0.0.1:9", "token_env": "DP_TEST_TOKEN"})
    new = summarize([[1.0, 2.0, 3.0, 4.0]]).as_dict()
    old = {k: v for k, v in new.items() if k not in ("p95", "p99")}
    info = {"backend": "onnxruntime", "backend_versions": {}, "device": "cpu", "cpu_count": 1}
    for sent, p95 in ((new, new["p95"]), (old, None)):
        m = AgentMeasurer(target)
        monkeypatch.setattr(m, "_call", lambda method, path, body=None, read_timeout=0, s=sent: info if method == "GET"
                            else {"stats": {"m": s}, "shapes": {"m": [1, 8]}})
        stats = m.time({"m": _mlp(tmp_path / "m.onnx", 8)})
        assert stats["m"].median == new["median"] and stats["m"].p95 == p95


def _render(table: object) -> str:
    from rich.console import Console

    c = Console(width=220, record=True)
    c.print(table)
    return c.export_text()


def _cells_all(text: str) -> list[dict[str, str]]:
    """The rows of a rendered rich table as {column: cell}."""
    lines = [[c.strip() for c in line.strip().strip("┃│").split("┃" if "┃" in line else "│")]
             for line in text.splitlines() if "┃" in line or "│" in line]
    return [dict(zip(lines[0], r, strict=True)) for r in lines[1:]]


def _cells(text: str) -> dict[str, dict[str, str]]:
    """A rendered rich table as {model cell: {column: cell}}."""
    return {r["model"]: r for r in _cells_all(text)}


# --- benchmark on ONNX Runtime --------------------------------------------------------------------


def test_benchmark_rows_carry_tails_and_throughput_at_the_batch(tmp_path: Path) -> None:
    model = _mlp(tmp_path / "dyn.onnx", 16, batch="N")
    res = benchmark({"dyn": model}, [_quick("b1", 1), _quick("b4", 4)])
    rows = {r["target"]: r for r in res["results"]}
    for target, batch in (("b1", 1), ("b4", 4)):
        r, s = rows[target], rows[target]["latency_ms"]
        assert r["input_shape"] == [batch, 16] and r["batch"] == batch
        assert s["min"] <= s["median"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
        assert r["throughput_per_s"] == pytest.approx(batch * 1000.0 / s["median"], rel=1e-4)
    text = _render(benchmark_table(res))
    assert "latency (ms)" in text  # two batches: a batch column instead of the batch in the title
    shown = {r["batch"]: r for r in _cells_all(text)}
    assert set(shown) == {"1", "4"}
    for target in ("b1", "b4"):
        r = rows[target]
        assert shown[str(r["batch"])]["inf/s"] == f"{r['throughput_per_s']:.1f}"
        assert shown[str(r["batch"])]["p99"] == f"{r['latency_ms']['p99']:.3f}"


def test_two_files_of_one_name_are_told_apart(tmp_path: Path) -> None:
    a = _mlp(tmp_path / "runs" / "a" / "model.onnx", 8, seed=1)
    b = _mlp(tmp_path / "runs" / "b" / "model.onnx", 32, seed=2)
    r = runner.invoke(app, ["benchmark", str(a), str(b), "--target", "cpu-ort-1t", *QUICK, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["results"]
    assert [row["model"] for row in rows] == [str(a), str(b)]
    assert all(row["throughput_per_s"] > 0 and row["latency_ms"]["p99"] >= row["latency_ms"]["median"] for row in rows)
    r = runner.invoke(app, ["benchmark", str(a), str(b), "--target", "cpu-ort-1t", *QUICK])
    assert r.exit_code == 0, r.output
    shown = _cells(r.stdout)  # named by their path below the common directory
    assert set(shown) == {"a/model.onnx", "b/model.onnx"}
    assert all(row["p95"] != "-" and row["p99"] != "-" and float(row["inf/s"]) > 0 for row in shown.values())
    assert "latency, batch 1 (ms)" in r.stdout
    # files of different names keep their short names
    c = _mlp(tmp_path / "runs" / "c" / "other.onnx", 8)
    r = runner.invoke(app, ["benchmark", str(a), str(c), "--target", "cpu-ort-1t", *QUICK])
    assert r.exit_code == 0, r.output
    assert set(_cells(r.stdout)) == {"model.onnx", "other.onnx"}


# --- benchmark_app import -------------------------------------------------------------------------

# benchmark_report.csv as the Python benchmark_app writes it: CsvStatisticsReport.dump in
# openvino/tools/benchmark/utils/statistics_report.py (f'{k};{v}\n' per parameter, a title line per
# section, an empty line after each), with the names main.py adds; -pcseq repeats avg/min/max per group.
PY_REPORT = """Command line parameters
path_to_model;/models/m.onnx
target_device;CPU
report_type;average_counters
report_folder;out

Configuration setup
topology;main_graph
target device;CPU
API;sync
inference_only;True
precision;UNSPECIFIED
batch size;2
number of iterations;100
number of parallel infer requests;1
duration (ms);0
number of CPU streams;1

Execution results
read model time (ms);3.21
compile model time (ms);15.40
first inference time (ms);0.80
total execution time (ms);61.50
total number of iterations;100
latency (ms);0.60
avg latency;0.61
min latency;0.55
max latency;1.20
group;shape group 1
avg latency;9.99
min latency;9.99
max latency;9.99
throughput;3252.03

"""

# The C++ benchmark_app (samples/cpp/benchmark_app/main.cpp, statistics_report.cpp): CsvDumper ends
# every field with ';', and the result names are spelled differently; -latency_percentile 90 here.
CPP_REPORT = """Command line parameters;
-m;/models/m.onnx;
-d;CPU;

Configuration setup;
benchmark mode;inference only;
topology;torch_jit;
target device;CPU;
API;async;
precision;f32;
batch size;1;
number of iterations;0;
number of parallel infer requests;4;
duration (ms);60000;
number of CPU streams;4;

Execution results;
first inference time (ms);1.234000;
total execution time (ms);60012.345000;
total number of iterations;48000;
latency (90 percentile) (ms);5.100000;
Percentile boundary;90;
Average latency (ms);4.900000;
Min latency (ms);2.000000;
Max latency (ms);9.000000;
throughput;799.835000;

"""

# Counters as dump_performance_counters_request writes them (statistics_report.py): a header, one
# row per layer with str(status) ('Status.EXECUTED'), a Total row and an empty line per block; the
# detailed file has one block per infer request, the average file one block.
HEADER = "layerName;execStatus;layerType;execType;realTime (ms);cpuTime (ms)\n"


def _block(conv: float, relu: float) -> str:
    return (HEADER + f"x;Status.NOT_RUN;Parameter;unknown_f32;0.000;0.000\nconv;Status.EXECUTED;Convolution;jit_avx2_f32;"
            f"{conv:.3f};{conv:.3f}\nrelu;Status.OPTIMIZED_OUT;Relu;undef;0.000;0.000\nfc;Status.EXECUTED;FullyConnected;"
            f"jit_gemm_f32;{relu:.3f};{relu:.3f}\nTotal;;;;{conv + relu:.3f};{conv + relu:.3f}\n\n")


def test_python_report_and_counters(tmp_path: Path) -> None:
    (tmp_path / "benchmark_report.csv").write_text(PY_REPORT)
    (tmp_path / "benchmark_detailed_counters_report.csv").write_text(_block(0.4, 0.1) + _block(0.6, 0.3) + _block(0.5, 0.2))
    report, counters = report_files(tmp_path)
    assert report.name == "benchmark_report.csv" and counters is not None
    rep = load_report(report)
    assert rep.latency_ms == {"median": 0.60, "mean": 0.61, "min": 0.55, "max": 1.20}  # the overall figures, not a group's
    assert rep.throughput_per_s == 3252.03 and rep.batch == 2 and rep.iterations == 100 and rep.duration_ms == 61.5
    assert (rep.device, rep.api, rep.parallel_requests, rep.streams) == ("CPU", "sync", 1, {"CPU": 1})
    assert rep.sections["command_line"]["path_to_model"] == "/models/m.onnx"
    # executed layers only, median over the requests' blocks
    assert load_counters(counters) == {"conv": 0.5, "fc": 0.2}


def test_cpp_report_with_a_percentile(tmp_path: Path) -> None:
    p = tmp_path / "benchmark_report.csv"
    p.write_text(CPP_REPORT)
    rep = load_report(p)
    assert rep.latency_ms == {"p90": 5.1, "mean": 4.9, "min": 2.0, "max": 9.0}
    assert (rep.throughput_per_s, rep.iterations, rep.batch, rep.parallel_requests) == (799.835, 48000, 1, 4)
    avg = tmp_path / "benchmark_average_counters_report.csv"
    avg.write_text(HEADER.replace("\n", ";\n") + "conv;EXECUTED;Convolution;brgconv_avx512_amx_bf16;0.700000;0.700000;\n"
                   "fc;EXECUTED;FullyConnected;jit_avx2;0.100000;0.100000;\nTotal;;;;0.800000;0.800000;\n\n")
    assert load_counters(avg) == {"conv": 0.7, "fc": 0.1}
    assert kernel_precisions(avg) == {"bf16": 1, "other": 1}  # from execType's suffix


@pytest.mark.parametrize(("text", "message"), [
    ("Execution results\nerror;Cannot read model\n\n", "benchmark_app stopped with an error: Cannot read model"),
    ("Configuration setup\nbatch size;1\n\n", "has no latency results"),
    ("Execution results\nlatency (ms);fast\n\n", "'fast' is not a number"),
])
def test_bad_reports_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "benchmark_report.csv"
    p.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_report(p)
    assert "\n" not in str(e.value)


def test_benchmark_app_command(tmp_path: Path) -> None:
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "benchmark_report.csv").write_text(CPP_REPORT)
    (folder / "benchmark_average_counters_report.csv").write_text(_block(0.4, 0.1))
    out = tmp_path / "figures.json"
    r = runner.invoke(app, ["benchmark-app", str(folder), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "latency p90 5.100 ms, mean 4.900 ms, min 2.000 ms, max 9.000 ms" in r.output
    assert "throughput 799.8 inferences/s at batch 1" in r.output and "4 infer request(s)" in r.output
    assert "note: 4 parallel infer requests" in r.output  # the latency is not a one-at-a-time figure
    assert "2 executed layers, sum 0.500 ms; kernels f32 2" in r.output and "reduced precision" not in r.output
    rec = json.loads(out.read_text())
    assert rec["source"] == "benchmark_app" and rec["latency_ms"]["p90"] == 5.1 and rec["layers_ms"] == {"conv": 0.4, "fc": 0.1}
    assert rec["throughput_per_s"] == 799.835 and rec["provenance"]["tool"] == "deploy-prune"
    assert rec["kernel_precisions"] == {"f32": 2}
    (folder / "benchmark_average_counters_report.csv").write_text(_block(0.4, 0.1).replace("jit_avx2_f32", "brgconv_amx_bf16"))
    r = runner.invoke(app, ["benchmark-app", str(folder)])
    assert r.exit_code == 0 and "kernels bf16 1, f32 1" in r.output and "-infer_precision f32" in r.output
    r = runner.invoke(app, ["benchmark-app", str(tmp_path / "nope.csv")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["benchmark-app", str(tmp_path)])  # a folder without the report
    assert r.exit_code == 2 and "holds no benchmark_report.csv" in r.output
    (tmp_path / "bad.csv").write_text("layerName,execStatus\n")
    r = runner.invoke(app, ["benchmark-app", str(folder / "benchmark_report.csv"), "--counters", str(tmp_path / "bad.csv"),
                            "--out", str(tmp_path / "never.json")])
    assert r.exit_code == 2 and "not a layer row" in r.output and not (tmp_path / "never.json").exists()


def _benchmark_app() -> str | None:
    found = Path(sys.executable).with_name("benchmark_app")
    return str(found) if found.is_file() else shutil.which("benchmark_app")


@pytest.mark.skipif(_benchmark_app() is None, reason="OpenVINO's benchmark_app is not installed")
@pytest.mark.parametrize("counters", ["average_counters", "detailed_counters"])
def test_a_real_benchmark_app_report(tmp_path: Path, counters: str) -> None:
    model = _mlp(tmp_path / "m.onnx", 256)
    folder = tmp_path / "report"
    cmd = [str(_benchmark_app()), "-m", str(model), "-d", "CPU", "-niter", "200", "-hint", "none", "-nstreams", "1",
           "-nthreads", "1", "-nireq", "1", "-api", "sync", "-infer_precision", "f32", "-pc", "-report_type", counters,
           "-report_folder", str(folder)]
    folder.mkdir()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report, found = report_files(folder)
    assert found is not None and counters in found.name
    rep = load_report(report)
    lat = rep.latency_ms
    # two decimals of a ms: a fast run may read 0.00 at the low end
    assert set(lat) == {"median", "mean", "min", "max"} and 0 <= lat["min"] <= lat["median"] <= lat["max"] and lat["max"] > 0
    assert (rep.iterations, rep.batch, rep.parallel_requests, rep.api, rep.device) == (200, 1, 1, "sync", "CPU")
    assert rep.streams == {"CPU": 1}
    # throughput is batch x iterations over the total time (both written to two decimals)
    assert rep.duration_ms is not None and rep.throughput_per_s is not None
    assert rep.throughput_per_s == pytest.approx(200 * 1000.0 / rep.duration_ms, rel=0.05)
    layers = load_counters(found)
    assert "matmul" in layers and all(v >= 0 for v in layers.values()), layers
    assert set(kernel_precisions(found)) == {"f32"}  # -infer_precision f32 keeps bf16 kernels out
