"""Do two profiles of the same model, made one after the other, predict the same?

Profiles the model twice on the target (default grid, no validation) and predicts the same N
random pruned variants (half one keep share for every group, half a share per group, in
[0.2, 1.0], as ``profile --validate``) with each. Nothing is measured end to end: the spread of
the ratio of the two calibrated predictions is the table's own noise, the floor under any
fidelity figure. The median ratio is the drift of the machine between the two calibrations.

    python benchmarks/profile_repeatability.py --target cpu-ort-1t --model mobilenet_v2 --input-size 32

Writes benchmarks/results/profile_repeatability_<target>_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.latency import lut
from deploy_prune.latency.profile import ProfileSpec, describe, plan_variant, pruned_copy, random_shares, run_profile
from deploy_prune.models import build_model
from deploy_prune.target import load_target

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--variants", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    target = load_target(args.target)
    shape = (3, args.input_size, args.input_size)
    model = build_model(args.model, 10, 3)
    spec = ProfileSpec(model, args.model, shape, target)
    profiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            _, prof = run_profile(spec, Path(tmp) / f"p{i}")
            print(f"profile {i + 1}: {prof['profile_seconds']} s", flush=True)
            profiles.append(prof)
    graph = describe(spec)[0]
    rng = np.random.default_rng(1)
    rows = []
    for i in range(args.variants):
        plan = plan_variant(graph, random_shares(graph, rng, i % 2 == 0))
        variant = pruned_copy(model, shape, plan, (), target.channel_multiple)
        a, b = (lut.predict(variant, p) for p in profiles)
        rows.append({"variant": i, "calibrated_ms": [a["calibrated_ms"], b["calibrated_ms"]],
                     "layer_sum_ms": [a["layer_sum_ms"], b["layer_sum_ms"]], "keep": plan})
    ratio = np.array([r["calibrated_ms"][1] / r["calibrated_ms"][0] for r in rows])
    med = float(np.median(ratio))
    summary = {"median_ratio": med, "p10": float(np.percentile(ratio, 10)), "p90": float(np.percentile(ratio, 90)),
               "median_abs_dev_from_median_pct": float(100 * np.median(np.abs(ratio / med - 1))),
               "within_5pct_of_median": float(np.mean(np.abs(ratio / med - 1) <= 0.05))}
    out = args.out or RESULTS / f"profile_repeatability_{args.target}_{args.model}"
    prov = provenance()
    write_json(out.with_suffix(".json"), {
        "benchmark": "profile_repeatability", "target": args.target, "model": args.model, "input_shape": list(shape),
        "summary": summary, "rows": rows,  # the profiles themselves are large and not kept
        "profiles": [{"profile_seconds": p["profile_seconds"], "calibration": p["calibration"], "remainder_ms": p["remainder_ms"],
                      "full_model_quiet_ms": p["full_model"]["latency_ms"]["quiet"], "protocol": p["protocol"]} for p in profiles],
        "provenance": prov})
    write_text(out.with_suffix(".md"), "\n".join([
        f"# Profile repeatability: {args.model} at {'x'.join(map(str, shape))} on {args.target}", "",
        f"Two profiles made one after the other; the calibrated predictions of the same {args.variants} random pruned "
        "variants compared (second / first). The median is the machine's drift between the two calibrations; the "
        "spread around it is the table's own noise.", "",
        "| median ratio | p10 - p90 | median abs. deviation from the median | within 5 % of the median |",
        "|---|---|---|---|",
        f"| {med:.3f} | {summary['p10']:.3f} - {summary['p90']:.3f} | {summary['median_abs_dev_from_median_pct']:.1f} % | "
        f"{summary['within_5pct_of_median']:.0%} |", "",
        f"Profile seconds: {profiles[0]['profile_seconds']} and {profiles[1]['profile_seconds']}.", "",
        provenance_line(prov), ""]))
    print(f"median ratio {med:.3f}, p10-p90 {summary['p10']:.3f}-{summary['p90']:.3f}, "
          f"median |dev| {summary['median_abs_dev_from_median_pct']:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
