"""How repeatable is one latency measurement?

Exports a ResNet-20 (random weights: latency does not depend on their values) at batch 1,
then measures it N times in one run with each target's own protocol, and reports the
coefficient of variation (std / mean) of the N medians. Goal: <= 3 %.

    python benchmarks/measure_stability.py [--targets cpu-ort-1t,cpu-ort] [--times 5]

Writes benchmarks/results/measure_stability.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from deploy_prune.export import export_onnx
from deploy_prune.io import provenance, write_json, write_text
from deploy_prune.latency.benchmark import benchmark
from deploy_prune.models import build_model
from deploy_prune.target import load_target

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="cpu-ort-1t,cpu-ort")
    ap.add_argument("--times", type=int, default=5)
    ap.add_argument("--input", default="3,32,32", help="C,H,W of the ResNet-20 input")
    ap.add_argument("--goal", type=float, default=0.03)
    ap.add_argument("--out", type=Path, default=RESULTS / "measure_stability")
    args = ap.parse_args(argv)

    shape = tuple(int(v) for v in args.input.split(","))
    torch.manual_seed(0)
    model = build_model("resnet20", 10, shape[0])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "resnet20.onnx"
        export_onnx(model, shape, onnx_path)
        for name in args.targets.split(","):
            target = load_target(name)
            medians, p90s, runs = [], [], []
            for i in range(args.times):
                res = benchmark({"resnet20": onnx_path}, [target])["results"][0]
                medians.append(res["latency_ms"]["median"])
                p90s.append(res["latency_ms"]["p90"])
                runs.append(res["latency_ms"])
                print(f"{name} #{i + 1}: median {medians[-1]:.4f} ms  p90 {p90s[-1]:.4f} ms  n={res['latency_ms']['n']}",
                      flush=True)
            cv = statistics.pstdev(medians) / statistics.fmean(medians)
            rows.append({
                "target": name, "threads": res["threads"], "device": res["device"],
                "backend_versions": res["backend_versions"], "protocol": target.protocol.__dict__,
                "medians_ms": medians, "p90s_ms": p90s, "cv_of_median": cv, "meets_goal": cv <= args.goal,
                "measurements": runs,
            })
    result = {"benchmark": "measure_stability", "model": "resnet20", "input_shape": [1, *shape],
              "times": args.times, "goal_cv": args.goal, "results": rows, "provenance": provenance()}
    write_json(args.out.with_suffix(".json"), result)
    lines = [
        "# Latency measurement stability", "",
        f"ResNet-20, input {[1, *shape]}, measured {args.times} times in one run with each target's protocol.",
        f"Goal: coefficient of variation of the median <= {100 * args.goal:.0f} %.", "",
        "| target | threads | medians (ms) | CV of median | goal met |", "|---|---|---|---|---|",
    ]
    for r in rows:
        meds = ", ".join(f"{m:.4f}" for m in r["medians_ms"])
        lines.append(f"| {r['target']} | {r['threads']} | {meds} | {100 * r['cv_of_median']:.2f} % | "
                     f"{'yes' if r['meets_goal'] else 'no'} |")
    prov = result["provenance"]
    lines += ["", f"Device: {rows[0]['device']}; {prov['date']}; deploy-prune {prov['tool_version']} "
              f"({prov['git_commit']}); {', '.join(f'{k} {v}' for k, v in rows[0]['backend_versions'].items())}.", ""]
    write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r["meets_goal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
