"""How does a shared machine's noise look, and which estimator survives it?

Two parts, on one target (default ``cpu-ort-1t``), with ResNet-20 and a copy of it pruned to
half its channels in every group (the size of model a 50 % latency budget produces):

1. **Trace**: the two models alternate run by run for ``--trace-s`` seconds; per second, the
   median of each and of their per-pair ratio. Contention episodes show as seconds where both
   slow down, and whether the ratio survives them.
2. **Estimators**: the target's protocol (interleaved rounds) is run ``--repeats`` times; for
   each, three figures of the narrow model's latency as a share of the baseline's: the overall
   medians' ratio, the median of paired per-round ratios, and the quiet estimate's ratio
   (``latency.timing.quiet_estimate``, what deploy-prune decides on). The spread of each over
   the repeats says how far a budget decision could move between two measurements.

    python benchmarks/measure_noise.py --target cpu-ort-1t

Writes benchmarks/results/measure_noise.json and .md. Run it alone: it measures the machine.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from deploy_prune.export import onnx_bytes
from deploy_prune.graph import ModelGraph
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.latency.measure import LocalMeasurer
from deploy_prune.latency.timing import measure, quiet_estimate
from deploy_prune.models import build_model
from deploy_prune.target import load_target
from deploy_prune.transforms import group_widths, prune_to_widths

RESULTS = Path(__file__).resolve().parent / "results"


def _spread(v: list[float]) -> dict[str, float]:
    a = np.asarray(v, float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "cv": float(a.std() / a.mean()), "range_pct": float(100 * (a.max() - a.min()) / np.median(a))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--trace-s", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--out", type=Path, default=RESULTS / "measure_noise")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    target = load_target(args.target)
    shape = (3, 32, 32)
    full = build_model("resnet20", 10, 3)
    narrow = copy.deepcopy(full)
    mult = target.channel_multiple
    plan = {g: max(mult, (c // 2) // mult * mult) for g, c in group_widths(ModelGraph(full, shape, [], mult)).items()}
    prune_to_widths(narrow, shape, plan, [])
    m = LocalMeasurer(target)
    timers = {"full": m.timer("full", onnx_bytes(full, shape, target.batch)),
              "narrow": m.timer("narrow", onnx_bytes(narrow, shape, target.batch))}

    # 1. Trace, run by run.
    for _ in range(200):
        timers["full"](), timers["narrow"]()
    rows = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.trace_s:
        rows.append((time.perf_counter() - t0, timers["full"](), timers["narrow"]()))
    tr = np.asarray(rows)
    seconds = []
    for s in range(int(np.ceil(args.trace_s))):
        sel = tr[(tr[:, 0] >= s) & (tr[:, 0] < s + 1)]
        if len(sel):
            seconds.append({"second": s, "full_ms": float(np.median(sel[:, 1])), "narrow_ms": float(np.median(sel[:, 2])),
                            "ratio": float(np.median(sel[:, 2] / sel[:, 1])), "pairs": len(sel)})
    quick = min(x["full_ms"] for x in seconds)
    for x in seconds:
        x["contended"] = x["full_ms"] > 1.1 * quick

    # 2. Estimators over repeated protocol measurements.
    est: dict[str, list[float]] = {"overall_median": [], "paired_rounds": [], "quiet": []}
    reps = []
    for i in range(args.repeats):
        st = measure(timers, target.protocol)
        f, n = st["full"], st["narrow"]
        est["overall_median"].append(n.median / f.median)
        est["paired_rounds"].append(float(np.median(np.divide(n.round_medians, f.round_medians))))
        est["quiet"].append(quiet_estimate(n.round_medians) / quiet_estimate(f.round_medians))
        reps.append({"full": f.as_dict(), "narrow": n.as_dict()})
        print(f"repeat {i + 1}/{args.repeats}: overall {est['overall_median'][-1]:.3f}, paired {est['paired_rounds'][-1]:.3f}, "
              f"quiet {est['quiet'][-1]:.3f}", flush=True)

    summary = {k: _spread(v) for k, v in est.items()}
    cont = [x for x in seconds if x["contended"]]
    calm = [x for x in seconds if not x["contended"]]
    states = {name: {"seconds": len(xs), "full_ms": float(np.median([x["full_ms"] for x in xs])),
                     "narrow_ms": float(np.median([x["narrow_ms"] for x in xs])),
                     "ratio": float(np.median([x["ratio"] for x in xs]))} for name, xs in (("quiet", calm), ("contended", cont)) if xs}
    prov = provenance(threads=target.resolved_threads(), target=target.name)
    write_json(args.out.with_suffix(".json"), {"benchmark": "measure_noise", "target": target.name, "plan": plan,
                                               "protocol": asdict(target.protocol), "trace": seconds, "states": states,
                                               "estimators": est, "summary": summary, "repeats": reps, "provenance": prov})
    lines = [f"# Measurement noise on a shared machine ({target.name})", "",
             "ResNet-20 at 3x32x32, batch 1, against a copy with half the channels of every group "
             f"({args.trace_s:g} s alternating run by run, then the target's protocol {args.repeats} times).", "",
             "## Trace: quiet and contended seconds", "",
             "A second is *contended* when the full model's median is over 1.1x the fastest second's.", "",
             "| state | seconds | full ms | narrow ms | narrow / full |", "|---|---|---|---|---|"]
    for name, s in states.items():
        lines.append(f"| {name} | {s['seconds']} | {s['full_ms']:.3f} | {s['narrow_ms']:.3f} | {s['ratio']:.3f} |")
    lines += ["", "## Estimators of narrow / full over repeated measurements", "",
              f"Protocol {asdict(target.protocol)}; each repeat is one measurement as compress makes it.", "",
              "| estimator | median | min | max | range (% of median) | CV |", "|---|---|---|---|---|---|"]
    for k, s in summary.items():
        lines.append(f"| {k.replace('_', ' ')} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | "
                     f"{s['range_pct']:.1f} | {100 * s['cv']:.1f} % |")
    lines += ["", "*overall median*: the narrow model's median over all its runs / the full model's; *paired rounds*: "
              "median of the per-round ratios; *quiet*: the ratio of the two quiet estimates (median of the round "
              "medians within 10 % of the fastest round), which deploy-prune decides on.", "",
              provenance_line(prov), ""]
    write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
