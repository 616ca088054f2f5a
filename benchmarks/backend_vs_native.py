"""Does each backend's figure match the runtime's own benchmarking tool?

deploy-prune's latency is what pruning can change: the runtime's execution of the model, not the
Python around it. This benchmark times the same ONNX models through deploy-prune's measurer and
through the runtime's own tool at the same settings, alternating the two in rounds:

- OpenVINO: ``benchmark_app -hint none -nstreams 1 -nthreads T -nireq 1 -api sync
  -infer_precision f32`` (the tool ships in the ``openvino`` wheel);
- TensorRT: ``trtexec`` (GPU Compute Time), where it is on PATH.

For OpenVINO the table also times ``infer(feed)`` with its input copy and output dict
(``--copying``), the call a Python user writes first, in the same rounds.

A backend whose tool is missing is recorded as such, not skipped silently. The figure compared
is each side's median per round; the table gives the quiet rounds' median (``latency.timing``) of
both and their ratio.

    python benchmarks/backend_vs_native.py --targets cpu-openvino-1t --cases resnet20@32,mobilenet_v2@32

Writes benchmarks/results/backend_vs_native.json and .md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from deploy_prune.config import Protocol
from deploy_prune.export import onnx_bytes
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.latency.measure import LocalMeasurer
from deploy_prune.latency.timing import measure, quiet_estimate
from deploy_prune.models import build_model
from deploy_prune.target import load_target

RESULTS = Path(__file__).resolve().parent / "results"


def benchmark_app(onnx: Path, threads: int, seconds: float) -> float:
    """``benchmark_app``'s median latency in ms at deploy-prune's OpenVINO settings (sync, one request)."""
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    cmd = [exe, "-m", str(onnx), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nthreads", str(threads),
           "-nireq", "1", "-api", "sync", "-infer_precision", "f32", "-t", str(max(1, round(seconds)))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"Latency:\s*\n.*?Median:\s*([\d.]+)\s*(ms|us)", out, re.S)
    if not m:
        raise RuntimeError(f"no median latency in benchmark_app's output:\n{out[-2000:]}")
    return float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0)


def trtexec(onnx: Path, seconds: float) -> float:
    """``trtexec``'s median GPU compute time in ms (fp32)."""
    out = subprocess.run(["trtexec", f"--onnx={onnx}", f"--duration={seconds}", "--useSpinWait"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"GPU Compute Time:.*?median = ([\d.]+) ms", out)
    if not m:
        raise RuntimeError(f"no GPU compute time in trtexec's output:\n{out[-2000:]}")
    return float(m.group(1))


def _copying_timer(measurer: LocalMeasurer, onnx: Path) -> Any:
    """One run through OpenVINO's plain ``infer(feed)``: input copied, output dict built per call."""
    import time

    from deploy_prune.latency.measure import feed_for

    sess = measurer.load(onnx)
    feed = feed_for(sess, measurer.target)
    req = sess.request  # type: ignore[attr-defined]

    def once() -> float:
        t0 = time.perf_counter_ns()
        req.infer(feed)
        return (time.perf_counter_ns() - t0) / 1e6

    return once


NATIVE = {"openvino": ("benchmark_app", lambda p, t, s: benchmark_app(p, t.resolved_threads(), s)),
          "tensorrt": ("trtexec", lambda p, t, s: trtexec(p, s))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="cpu-openvino-1t")
    ap.add_argument("--cases", default="resnet20@32,mobilenet_v2@32", help="model@side, one input channel, 10 classes")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the two timers")
    ap.add_argument("--seconds", type=int, default=3, help="native tool's duration per round")
    ap.add_argument("--out", type=Path, default=RESULTS / "backend_vs_native")
    args = ap.parse_args(argv)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for tname in args.targets.split(","):
            target = load_target(tname)
            tool, native = NATIVE.get(target.backend, (None, None))
            if native is None or (shutil.which(tool) is None and tool != "benchmark_app"):
                rows.append({"target": tname, "backend": target.backend, "tool": tool, "skipped": f"{tool or 'no native tool'} not here"})
                continue
            measurer = LocalMeasurer(target)
            # One round of the target's protocol per alternation.
            proto = Protocol(warmup=target.protocol.warmup, repeats=max(1, target.protocol.repeats // target.protocol.rounds),
                             rounds=1, min_time_s=target.protocol.min_time_s)
            for case in args.cases.split(","):
                name, side = case.split("@")
                onnx = Path(tmp) / f"{name}.onnx"
                onnx.write_bytes(onnx_bytes(build_model(name, 10, 1), (1, int(side), int(side)), target.batch))
                ours, theirs, copying = [], [], []
                copy_timer = _copying_timer(measurer, onnx) if target.backend == "openvino" else None
                for r in range(args.rounds):
                    ours.append(float(measurer.time({"m": onnx}, proto)["m"].median))
                    if copy_timer is not None:
                        copying.append(float(measure({"c": copy_timer}, proto)["c"].median))
                    theirs.append(native(onnx, target, args.seconds))
                    print(f"{tname} {case} round {r + 1}: deploy-prune {ours[-1]:.4f} ms, {tool} {theirs[-1]:.4f} ms", flush=True)
                q_ours, q_theirs = quiet_estimate(ours), quiet_estimate(theirs)
                rows.append({"target": tname, "backend": target.backend, "tool": tool, "case": case,
                             "deploy_prune_ms": round(q_ours, 5), "native_ms": round(q_theirs, 5),
                             "ratio": round(q_ours / q_theirs, 4), "rounds_ours": ours, "rounds_native": theirs,
                             "copying_ms": round(quiet_estimate(copying), 5) if copying else None, "rounds_copying": copying})
    prov = provenance()
    write_json(args.out.with_suffix(".json"), {"rows": rows, "provenance": prov, "argv": sys.argv[1:]})
    lines = ["# Backend figures against the runtime's own tool", "",
             f"`python benchmarks/backend_vs_native.py {' '.join(sys.argv[1:])}`", "", provenance_line(prov), "",
             "| target | model | deploy-prune ms (quiet) | native tool | native ms (quiet) | ratio | `infer(feed)` ms, ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['target']} | – | – | {r['tool']} | {r['skipped']} | – | – |")
        else:
            cp = f"{r['copying_ms']:.4f}, {r['copying_ms'] / r['native_ms']:.3f}" if r["copying_ms"] else "–"
            lines.append(f"| {r['target']} | {r['case']} | {r['deploy_prune_ms']:.4f} | {r['tool']} | {r['native_ms']:.4f} "
                         f"| {r['ratio']:.3f} | {cp} |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
