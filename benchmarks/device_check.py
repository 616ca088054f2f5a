"""Check deploy-prune's CUDA paths on a GPU machine in about five minutes: one JSON summary, one Markdown table.

    benchmarks/device_check.sh [SUMMARY.json] [--cpu-smoke] [--budget-s S] [--work DIR]

Runs the CLI as a user would (``python -m deploy_prune VERB``), each step in its own process
with its own timeout, and goes on past a failed step (a step whose input a failed step should
have made is skipped, naming it). The steps, in order: ``train`` tiny-cnn on digits for 2 epochs
on the GPU (``DEPLOY_PRUNE_DEVICE=cuda``); ``export``; ``benchmark`` on the gpu-torch target at
fp16 and fp32 (torch.compile, as shipped) and at fp16 eager (what torch.compile buys);
``ddp-train`` under torchrun with one process per GPU (nccl from two GPUs on: at world size 1 the
project starts no process group); ``tensorrt`` benchmarks at fp16 and fp32 where ``tensorrt``
imports; ``profile`` at fp16; ``compress`` to 0.7 of the measured latency at fp16 on that
profile; ``profile`` at fp32; ``doctor``. The targets are copies of targets/gpu-torch.yaml under
WORK/targets with a short protocol. Steps left when ``--budget-s`` runs out are recorded as skipped.

Without a CUDA GPU this exits 2 naming the fix, unless ``--cpu-smoke``: then the same entry
points run on the CPU (one target derived from cpu-torch-1t: fp32, eager, a short protocol, no
TensorRT), which is how tests/test_device_check.py keeps this script working.

The summary (SUMMARY.json and SUMMARY.md beside it) is rewritten atomically after every step,
``finished: false`` until the end; each step's output is in WORK/logs/STEP.stdout and .stderr. Exit status:
0 when no step failed or timed out (NOT MET and an unreachable budget are results, not
failures), 1 otherwise, 2 on bad arguments or no GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deploy_prune.io import git_commit, write_json, write_text  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "device_check.json"
BUDGET_S = {"gpu": 290.0, "cpu-smoke": 900.0}
SMOKE_SLOWDOWN = 3  # step timeouts on a (shared) CPU
MIN_STEP_S = 10.0  # a step is not started with less of the budget left
TAIL = 1500  # characters of a failed step's output kept in the summary
# imported by the CLI verbs this runs: a missing one is named up front (a lent machine's own python3 lacks some)
MODULES = ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "onnx2torch", "typer", "rich", "yaml",
           "pydantic", "torch_pruning", "sklearn", "matplotlib")


@dataclass
class Mode:
    """What the machine offers: CUDA GPUs (0 in the CPU smoke mode) and TensorRT's version where it imports."""

    smoke: bool
    gpus: int
    tensorrt: str | None


@dataclass
class Step:
    """One CLI command; ``parse(stdout)`` reads its key figures (mostly from the files it wrote), and it
    runs only when the steps in ``needs`` finished ``ok``."""

    name: str
    argv: list[str]
    timeout_s: float
    parse: Callable[[str], dict[str, Any]] = lambda stdout: {}
    needs: tuple[str, ...] = ()
    skip: str | None = None  # why it does not run in this mode


@dataclass
class Outcome:
    """What one step did, as the summary records it."""

    name: str
    command: str
    status: str  # ok | MET | NOT MET | unreachable | failed | timeout | skipped: WHY
    exit_code: int | None = None
    seconds: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    output_tail: str | None = None


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def parse_train(run: Path) -> dict[str, Any]:
    m = _read(run / "metrics.json")
    return {"world_size": m["world_size"], "steps_per_epoch": m["steps_per_epoch"], "train_seconds": m["train_seconds"],
            "val_accuracy": round(m["val_accuracy"], 4)}


def parse_export(run: Path) -> dict[str, Any]:
    rec = _read(run / "model.onnx.json")
    return {"parity_ok": rec["parity_ok"], "max_abs_diff": rec["max_abs_diff"], "input_shape": rec["input_shape"]}


def parse_benchmark(path: Path) -> dict[str, Any]:
    r = _read(path)["results"][0]
    s = r["latency_ms"]
    return {"target": r["target"], "precision": r["precision"], "device": r["device"], "median_ms": s["median"],
            "p90_ms": s["p90"], "quiet_ms": s["quiet"], "round_cv": round(s["round_cv"], 4), "runs": s["n"]}


def parse_profile(directory: Path) -> dict[str, Any]:
    made = sorted(p for p in directory.glob("*.json") if not p.name.endswith(".partial.json"))
    p = _read(made[-1])
    return {"configs": p["configs_total"], "profile_seconds": p["profile_seconds"],
            "full_model_median_ms": p["full_model"]["latency_ms"]["median"],
            "calibration_a": round(p["calibration"]["a"], 4), "calibration_b_ms": round(p["calibration"]["b"], 4)}


def parse_compress(run: Path) -> dict[str, Any]:
    r = _read(run / "report.json")
    base, final = r["baseline"]["latency_ms"]["quiet"], r["final"]["latency_ms"]["quiet"]
    return {"met_budget": r["met_budget"], "latency_ratio": r["budget"]["value"], "baseline_quiet_ms": base,
            "final_quiet_ms": final, "measured_ratio": round(final / base, 4), "world_size": r["distributed"]["world_size"],
            "seconds_by_stage": r["stage_seconds"]}


def parse_doctor(stdout: str) -> dict[str, Any]:
    d = json.loads(stdout)
    return {"cuda": d["cuda"], "torch_backend": d["backends"]["torch"]["detail"],
            "tensorrt_backend": d["backends"]["tensorrt"]["detail"]}


PROTOCOL = {"gpu": {"warmup": 20, "repeats": 100, "rounds": 3, "min_time_s": 0.5},
            "cpu-smoke": {"warmup": 3, "repeats": 20, "rounds": 2, "min_time_s": 0.05}}


def write_target(work: Path, base: str, name: str, precision: str, compile_: bool, backend: str = "torch",
                 protocol: str = "gpu") -> Path:
    """A copy of targets/BASE.yaml named ``name`` at ``precision``, torch.compile on or off (or on TensorRT), with
    a short protocol and no narrow widths (19 layer configurations of tiny-cnn to profile, not 37)."""
    raw = yaml.safe_load((REPO / "targets" / f"{base}.yaml").read_text())
    raw.update(name=name, description=f"device check: {base} as {name}", precision=precision, backend=backend,
               narrow_widths=[], **PROTOCOL[protocol])
    raw["options"] = {"torch": {**raw.get("options", {}).get("torch", {}), "compile": compile_}} if backend == "torch" else {}
    path = work / "targets" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def plan(mode: Mode, work: Path, python: str = sys.executable) -> list[Step]:
    """The steps for this machine, in order; writes their target files under ``work/targets``."""
    dp = [python, "-m", "deploy_prune"]
    run, onnx, prof = work / "base", work / "base" / "model.onnx", work / "profiles"
    base, proto, k = ("cpu-torch-1t", "cpu-smoke", SMOKE_SLOWDOWN) if mode.smoke else ("gpu-torch", "gpu", 1)
    # label -> (precision, torch.compile); compress runs on the first
    targets = {"fp32": ("fp32", False)} if mode.smoke else {"fp16": ("fp16", True), "fp32": ("fp32", True), "fp16-eager": ("fp16", False)}
    paths = {label: write_target(work, base, f"{base}-{label}", *spec, protocol=proto) for label, spec in targets.items()}
    trt = {p: write_target(work, "gpu-torch", f"gpu-tensorrt-{p}", p, False, "tensorrt", proto) for p in ("fp16", "fp32")}
    no_trt = "skipped: needs CUDA (--cpu-smoke)" if mode.smoke else None if mode.tensorrt else "skipped: not installed"
    small = ["--train-limit", "256", "--epochs", "1"] if mode.smoke else ["--epochs", "2"]
    nproc = max(1, mode.gpus)

    def bench(name: str, target: Path, skip: str | None = None, timeout_s: float = 60) -> Step:
        out = work / f"{name}.json"
        return Step(name, [*dp, "benchmark", str(onnx), "--target", str(target), "--out", str(out)], timeout_s * k,
                    lambda _: parse_benchmark(out), ("export",), skip)

    def profile(label: str, timeout_s: float) -> Step:
        directory = prof / f"{base}-{label}"
        return Step(f"profile-{label}", [*dp, "profile", "--weights", str(run), "--target", str(paths[label]), "--grid", "32",
                                         "--out", str(prof)], timeout_s * k, lambda _: parse_profile(directory), ("train",))

    first, *others = [t for t in targets if not t.endswith("eager")]
    return [
        Step("train", [*dp, "train", "--model", "tiny-cnn", "--data", "digits", *small, "--batch-size", "64",
                       "--out", str(run), "--no-progress"], 75 * k, lambda _: parse_train(run)),
        Step("export", [*dp, "export", str(run)], 60 * k, lambda _: parse_export(run), ("train",)),
        *[bench(f"benchmark-{label}", path) for label, path in paths.items()],
        Step("ddp-train", [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                           "-m", "deploy_prune", "train", "--model", "tiny-cnn", "--data", "digits", *small,
                           "--batch-size", "64", "--out", str(work / "ddp"), "--no-progress"], 90 * k,
             lambda _: {"nproc_per_node": nproc, **parse_train(work / "ddp")}),
        *[bench(f"tensorrt-{p}", trt[p], no_trt, 90) for p in ("fp16", "fp32")],  # 90 s: the engine build
        profile(first, 120),
        # on the profile just made: without it compress would profile at its own, finer grid
        Step("compress", [*dp, "compress", "--weights", str(run), "--data", "digits", "--train-limit", "256",
                          "--target", str(paths[first]), "--latency-ratio", "0.7", "--method", "uniform", "--steps", "1",
                          "--epochs", "1", "--batch-size", "64", "--profiles", str(prof), "--out", str(work / "compressed")],
             120 * k, lambda _: parse_compress(work / "compressed"), (f"profile-{first}",)),
        *[profile(label, 90) for label in others],
        Step("doctor", [*dp, "doctor", "--json"], 45 * k, parse_doctor),
    ]


def run_step(step: Step, env: dict[str, str], logs: Path, timeout_s: float) -> Outcome:
    """Run one step in a process group of its own, output to ``logs/STEP.stdout`` and ``.stderr``; at
    ``timeout_s``, and after it exits, what is left of the group (torchrun's workers, compile workers) is killed."""
    t0 = time.perf_counter()
    stdout, stderr = logs / f"{step.name}.stdout", logs / f"{step.name}.stderr"
    with stdout.open("w") as fo, stderr.open("w") as fe:
        proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=fo, stderr=fe, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group has already gone
            pass
        proc.wait()
    seconds = round(time.perf_counter() - t0, 1)
    out, err = stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
    figures: dict[str, Any] = {}
    try:
        figures = step.parse(out)
    except Exception as e:  # the output the step should have written is missing or not as expected
        if rc == 0:
            figures = {"parse_error": f"{type(e).__name__}: {e}"[:300]}
    status = "timeout" if rc is None else "ok" if rc == 0 else "failed"
    if step.name == "compress":  # a finished run met its budget, missed it, or found it out of reach (exit 3)
        met = figures.get("met_budget")
        if (rc, met) in ((0, True), (1, False)):
            status = "MET" if met else "NOT MET"
        elif rc == 3:
            status = "unreachable"
    if rc is None or status == "failed" or "parse_error" in figures:
        tail = (out + err)[-TAIL:]
    else:
        tail = None
    if rc is None:
        figures["timeout_s"] = round(timeout_s, 1)
    return Outcome(step.name, shlex.join(step.argv), status, rc, seconds, figures, tail)


def tensorrt_version() -> str | None:
    """TensorRT's version where ``import tensorrt`` works, else None."""
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:
        return None


def environment(mode: Mode) -> dict[str, Any]:
    """GPU, driver, torch/CUDA/cuDNN/NCCL/Triton/TensorRT versions, the commit, missing modules."""
    import torch

    from deploy_prune import __version__

    cuda = torch.cuda.is_available()
    nccl = torch.cuda.nccl.version() if cuda else None
    smi = shutil.which("nvidia-smi")
    try:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.strip().splitlines() if smi else []
    except subprocess.TimeoutExpired:
        query = []
    try:
        triton: str | None = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "cpu-smoke" if mode.smoke else "gpu",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "nvidia_smi": query or None,
        "driver": query[0].split(", ")[1] if query else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
        "nccl_available": torch.distributed.is_nccl_available(),
        "triton": triton, "tensorrt": mode.tensorrt,
        "deploy_prune": __version__, "git_commit": git_commit(),
        "python": sys.executable, "cpu_count": os.cpu_count(),
        "missing_modules": [m for m in MODULES if importlib.util.find_spec(m) is None],
    }


def markdown(summary: dict[str, Any]) -> str:
    e = summary["environment"]
    gpus = ", ".join(e["gpus"]) or "no GPU"
    lines = [
        "# deploy-prune device check", "",
        f"{e['date']}, {e['mode']} mode: {gpus}, driver {e['driver']}; torch {e['torch']} (CUDA {e['cuda']}, cuDNN {e['cudnn']}, "
        f"NCCL {e['nccl']}), Triton {e['triton']}, TensorRT {e['tensorrt'] or 'not installed'}; deploy-prune {e['deploy_prune']} "
        f"at {e['git_commit']}." + (f" Missing modules: {', '.join(e['missing_modules'])}." if e["missing_modules"] else ""),
        "", "| step | status | exit | s | key figures |", "|---|---|---|---|---|",
    ]
    for o in summary["steps"]:
        figs = ", ".join(f"{k} {v}" for k, v in o["figures"].items() if not isinstance(v, dict))
        lines.append(f"| {o['name']} | {o['status']} | {'-' if o['exit_code'] is None else o['exit_code']} | "
                     f"{'-' if o['seconds'] is None else o['seconds']} | {figs} |")
    lines += ["", f"{summary['seconds']} s in all{'' if summary['finished'] else ' (unfinished)'}; work directory "
              f"`{summary['work']}`. Commands:", ""]
    lines += [f"- `{o['name']}`: `{o['command']}`" for o in summary["steps"]]
    return "\n".join(lines) + "\n"


def run_all(steps: list[Step], out: Path, env: dict[str, str], work: Path, budget_s: float,
            environment_: dict[str, Any]) -> int:
    """Run ``steps`` in order within ``budget_s``, rewriting the summary after each; 1 if any failed or timed out."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"finished": False, "seconds": 0.0, "budget_s": budget_s, "work": str(work),
                               "environment": environment_, "steps": []}
    done: dict[str, str] = {}
    for step in steps:
        left = budget_s - (time.perf_counter() - t0)
        broken = [n for n in step.needs if done.get(n) != "ok"]
        if step.skip or broken or left < MIN_STEP_S:
            why = step.skip or (f"skipped: needs {', '.join(broken)}" if broken else "skipped: out of time (--budget-s)")
            outcome = Outcome(step.name, shlex.join(step.argv), why)
        else:
            print(f"[device-check] {step.name} (timeout {min(step.timeout_s, left):.0f} s)", flush=True)
            outcome = run_step(step, env, logs, min(step.timeout_s, left))
            print(f"[device-check] {step.name}: {outcome.status} in {outcome.seconds} s", flush=True)
        done[step.name] = outcome.status
        summary["steps"].append(asdict(outcome))
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(out, summary)
        write_text(out.with_suffix(".md"), markdown(summary))
    summary["finished"] = True
    write_json(out, summary)
    write_text(out.with_suffix(".md"), markdown(summary))
    print(f"[device-check] wrote {out} and {out.with_suffix('.md')}")
    return 1 if any(s in ("failed", "timeout") for s in done.values()) else 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message}; see benchmarks/device_check.sh --help")


def fail(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="benchmarks/device_check.sh", description="Check deploy-prune's CUDA paths on this GPU machine.")
    ap.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help=f"summary JSON (default {DEFAULT_OUT.relative_to(REPO)}); Markdown beside it")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the same entry points on the CPU, quickly (tests)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for all steps (default 290; 900 with --cpu-smoke)")
    ap.add_argument("--work", type=Path, default=None, help="new or empty directory for the runs and logs (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.out.suffix != ".json":
        fail(f"the summary path must end in .json (the Markdown goes beside it as .md), got {str(args.out)!r}")
    if args.budget_s is not None and not args.budget_s > 0:
        fail(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.work is not None and args.work.exists() and (not args.work.is_dir() or any(args.work.iterdir())):
        fail(f"--work {str(args.work)!r} is not an empty directory; give a new or empty one")
    try:
        import torch
    except ImportError as e:
        fail(f"torch does not import with {sys.executable} ({e}); set DEVICE_CHECK_PYTHON to a Python with the project's dependencies")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not args.cpu_smoke:
        fail(f"no CUDA GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees none here; "
             "run this on a GPU machine, or pass --cpu-smoke to check the script on the CPU")
    mode = Mode(smoke=args.cpu_smoke, gpus=0 if args.cpu_smoke else gpus, tensorrt=tensorrt_version())
    work = (args.work or Path(tempfile.mkdtemp(prefix="device-check-"))).resolve()
    env_ = environment(mode)
    if env_["missing_modules"]:
        print(f"[device-check] missing Python modules: {', '.join(env_['missing_modules'])}: the steps that import them will fail")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PYTHONUNBUFFERED": "1", "DEPLOY_PRUNE_DEVICE": "cpu" if mode.smoke else "cuda",
           "DEPLOY_PRUNE_CACHE": str(work / "cache")}
    budget = args.budget_s or BUDGET_S["cpu-smoke" if mode.smoke else "gpu"]
    return run_all(plan(mode, work), args.out.resolve(), env, work, budget, env_)


if __name__ == "__main__":
    raise SystemExit(main())
