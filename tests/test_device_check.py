"""benchmarks/device_check.sh: its arguments, its plan for a GPU machine, its step runner and
parsers, here on the CPU (the GPU run itself happens on a lent machine; docs/backends.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from deploy_prune.config import Target
from deploy_prune.io import write_json
from deploy_prune.latency.benchmark import benchmark
from deploy_prune.target import load_target

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
GPU_STEPS = ["train", "export", "benchmark-fp16", "benchmark-fp32", "benchmark-fp16-eager", "ddp-train",
             "tensorrt-fp16", "tensorrt-fp32", "profile-fp16", "compress", "profile-fp32", "doctor"]


@pytest.fixture(scope="module")
def dc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _script(*args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEVICE_CHECK_PYTHON": sys.executable}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_is_one_line_and_writes_nothing(dc: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        dc.main([str(tmp_path / "s.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: no CUDA GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees none "
                   "here; run this on a GPU machine, or pass --cpu-smoke to check the script on the CPU\n")
    assert list(tmp_path.iterdir()) == []


def test_the_shell_script_runs_the_helper(tmp_path: Path) -> None:
    r = _script(str(tmp_path / "s.json"), "--bogus")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "error: unrecognized arguments: --bogus; see benchmarks/device_check.sh --help\n"


@pytest.mark.parametrize(("args", "message"), [
    (["s.txt"], "error: the summary path must end in .json (the Markdown goes beside it as .md), got 's.txt'"),
    (["--bogus"], "error: unrecognized arguments: --bogus; see benchmarks/device_check.sh --help"),
    (["--budget-s", "0"], "error: --budget-s must be a positive number of seconds, got 0.0"),
    (["--budget-s", "soon"], "error: argument --budget-s: invalid float value: 'soon'; see benchmarks/device_check.sh --help"),
])
def test_bad_arguments(dc: ModuleType, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        dc.main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def test_work_directory_must_be_new_or_empty(dc: ModuleType, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        dc.main([str(tmp_path / "s.json"), "--work", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: --work {str(tmp_path)!r} is not an empty directory; give a new or empty one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]


def _target(step: object) -> Target:
    argv = step.argv  # type: ignore[attr-defined]
    return load_target(argv[argv.index("--target") + 1])


def test_gpu_plan(dc: ModuleType, tmp_path: Path) -> None:
    """Two GPUs, no TensorRT: the commands a GPU machine runs, with targets that load."""
    steps = {s.name: s for s in dc.plan(dc.Mode(smoke=False, gpus=2, tensorrt=None), tmp_path, "python3")}
    assert list(steps) == GPU_STEPS
    for label, precision, compiled in (("fp16", "fp16", True), ("fp32", "fp32", True), ("fp16-eager", "fp16", False)):
        t = _target(steps[f"benchmark-{label}"])
        assert (t.backend, t.device, t.precision, t.options["torch"]["compile"]) == ("torch", "cuda", precision, compiled)
    ddp = steps["ddp-train"].argv
    assert ddp[:6] == ["python3", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert [steps[f"tensorrt-{p}"].skip for p in ("fp16", "fp32")] == ["skipped: not installed"] * 2
    compress = steps["compress"]
    assert compress.argv[compress.argv.index("--latency-ratio") + 1] == "0.7"
    assert _target(compress).name == "gpu-torch-fp16" and compress.needs == ("profile-fp16",)
    assert all(s.skip is None for n, s in steps.items() if not n.startswith("tensorrt"))

    trt = {s.name: s for s in dc.plan(dc.Mode(smoke=False, gpus=1, tensorrt="10.3"), tmp_path / "t", "python3")}
    assert trt["tensorrt-fp16"].skip is None
    t = _target(trt["tensorrt-fp16"])
    assert (t.backend, t.device, t.precision) == ("tensorrt", "cuda", "fp16")
    assert trt["ddp-train"].argv[5] == "1"


def test_cpu_smoke_plan(dc: ModuleType, tmp_path: Path) -> None:
    steps = {s.name: s for s in dc.plan(dc.Mode(smoke=True, gpus=0, tensorrt=None), tmp_path)}
    assert list(steps) == ["train", "export", "benchmark-fp32", "ddp-train", "tensorrt-fp16", "tensorrt-fp32",
                           "profile-fp32", "compress", "doctor"]
    t = _target(steps["compress"])
    assert (t.backend, t.device, t.precision, t.options["torch"]["compile"]) == ("torch", "cpu", "fp32", False)
    assert steps["tensorrt-fp16"].skip == "skipped: needs CUDA (--cpu-smoke)"


def test_runner_records_each_outcome(dc: ModuleType, tmp_path: Path) -> None:
    """ok, failed (with its output), timed out (its child killed too), skipped for a failed input, unparsed."""
    py, pid_file = sys.executable, tmp_path / "child.pid"
    spawn = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")

    def bad_parse(stdout: str) -> dict[str, object]:
        raise KeyError("median")

    steps = [
        dc.Step("fine", [py, "-c", "print('{\"x\": 1}')"], 30, lambda out: json.loads(out)),
        dc.Step("broken", [py, "-c", "import sys; sys.stderr.write('boom'); sys.exit(4)"], 30),
        dc.Step("hangs", [py, "-c", spawn], 2),
        dc.Step("after-broken", [py, "-c", "pass"], 30, needs=("broken",)),
        dc.Step("unparsed", [py, "-c", "pass"], 30, bad_parse),
    ]
    out = tmp_path / "s.json"
    env = dc.environment(dc.Mode(smoke=True, gpus=0, tensorrt=None))
    assert dc.run_all(steps, out, dict(os.environ), tmp_path / "work", 120, env) == 1
    summary = json.loads(out.read_text())
    got = {s["name"]: s for s in summary["steps"]}
    assert [(n, s["status"], s["exit_code"]) for n, s in got.items()] == [
        ("fine", "ok", 0), ("broken", "failed", 4), ("hangs", "timeout", None),
        ("after-broken", "skipped: needs broken", None), ("unparsed", "ok", 0)]
    assert got["fine"]["figures"] == {"x": 1} and got["fine"]["output_tail"] is None
    assert got["broken"]["output_tail"] == "boom"
    assert got["hangs"]["figures"] == {"timeout_s": 2}
    assert got["unparsed"]["figures"] == {"parse_error": "KeyError: 'median'"}
    assert summary["finished"] is True and summary["environment"]["mode"] == "cpu-smoke"
    assert (tmp_path / "work" / "logs" / "broken.stderr").read_text() == "boom"
    child = int(pid_file.read_text())
    state = Path(f"/proc/{child}/status")
    assert not state.exists() or "State:\tZ" in state.read_text()  # killed with its parent's group
    md = out.with_suffix(".md").read_text()
    assert "| broken | failed | 4 |" in md and "| after-broken | skipped: needs broken | - | - |  |" in md


def test_out_of_budget_skips_the_rest(dc: ModuleType, tmp_path: Path) -> None:
    steps = [dc.Step("late", [sys.executable, "-c", "pass"], 30)]
    env = dc.environment(dc.Mode(smoke=True, gpus=0, tensorrt=None))
    assert dc.run_all(steps, tmp_path / "s.json", dict(os.environ), tmp_path / "w", dc.MIN_STEP_S - 1, env) == 0
    assert json.loads((tmp_path / "s.json").read_text())["steps"][0]["status"] == "skipped: out of time (--budget-s)"


def test_parsers_read_what_the_verbs_write(dc: ModuleType, run: Path, quick_target: Target, tmp_path: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    assert dc.parse_train(run)["world_size"] == 1
    assert dc.parse_train(run)["steps_per_epoch"] == metrics["steps_per_epoch"]
    assert dc.parse_export(run)["parity_ok"] is True
    res = benchmark({"model": run / "model.onnx"}, [quick_target], quick_target.protocol)
    write_json(tmp_path / "b.json", res)
    figs = dc.parse_benchmark(tmp_path / "b.json")
    assert (figs["target"], figs["precision"]) == ("quick", "fp32")
    assert figs["median_ms"] == res["results"][0]["latency_ms"]["median"]


@pytest.mark.slow  # about 2-4 minutes of training, profiling and compressing on the CPU
def test_cpu_smoke_end_to_end(tmp_path: Path) -> None:
    """The shell script in --cpu-smoke mode: every CLI entry point the GPU run uses, on the CPU."""
    out = tmp_path / "summary.json"
    r = _script(str(out), "--cpu-smoke", "--work", str(tmp_path / "work"), timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(out.read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert summary["finished"] is True and summary["environment"]["mode"] == "cpu-smoke"
    assert {n: s["status"] for n, s in steps.items() if n != "compress"} == {
        "train": "ok", "export": "ok", "benchmark-fp32": "ok", "ddp-train": "ok", "tensorrt-fp16": "skipped: needs CUDA (--cpu-smoke)",
        "tensorrt-fp32": "skipped: needs CUDA (--cpu-smoke)", "profile-fp32": "ok", "doctor": "ok"}
    c = steps["compress"]
    assert c["status"] == {0: "MET", 1: "NOT MET", 3: "unreachable"}[c["exit_code"]]
    assert steps["train"]["figures"]["world_size"] == 1 and steps["export"]["figures"]["parity_ok"] is True
    assert steps["benchmark-fp32"]["figures"]["target"] == "cpu-torch-1t-fp32"
    assert steps["ddp-train"]["figures"]["nproc_per_node"] == 1 and steps["ddp-train"]["figures"]["world_size"] == 1
    assert steps["profile-fp32"]["figures"]["configs"] > 0
    assert steps["doctor"]["figures"]["cuda"] == "no"
    assert "parse_error" not in json.dumps(summary)
    assert "| benchmark-fp32 | ok | 0 |" in out.with_suffix(".md").read_text()
