"""Why CPU targets prune in multiples of 8: latency of one conv against its channel count.

ONNX Runtime's CPU kernels (MLAS NCHWc) work on blocks of 8 channels with AVX2 (16 with
AVX-512); a conv whose input channels are not a multiple of the block falls back to a slower
path. This times a 3x3 conv at 16x16 (batch 1, fused ReLU) for every input and output count in
a range, all interleaved, on the given target.

    python benchmarks/channel_steps.py --target cpu-ort-1t

Writes benchmarks/results/channel_steps.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from deploy_prune.config import Protocol
from deploy_prune.io import provenance, write_json, write_text
from deploy_prune.latency import lut
from deploy_prune.latency.measure import LocalMeasurer
from deploy_prune.target import load_target

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--lo", type=int, default=17)
    ap.add_argument("--hi", type=int, default=48)
    ap.add_argument("--fixed", type=int, default=32, help="the other dimension's channel count")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "channel_steps")
    args = ap.parse_args(argv)
    target = load_target(args.target)
    fam = lut.Family("conv", (3, 3), (1, 1), (1, 1), (1, 1), 1, False, (16, 16), target.batch, False, "Relu")
    counts = list(range(args.lo, args.hi + 1))
    models = {f"in{c}": lut.layer_graph(fam, c, args.fixed) for c in counts}
    models.update({f"out{c}": lut.layer_graph(fam, args.fixed, c) for c in counts})
    m = LocalMeasurer(target)
    stats = m.time(models, Protocol(warmup=20, repeats=100, rounds=args.rounds, min_time_s=0.5))
    rows = [{"dim": k[:-len(str(c))], "channels": c, "median_ms": stats[k].median, "round_cv": stats[k].round_cv}
            for k in models for c in [int(k.lstrip("inout"))]]
    res = {"benchmark": "channel_steps", "target": target.name, "measurer": m.info(), "fixed": args.fixed, "rows": rows,
           "provenance": provenance()}
    write_json(args.out.with_suffix(".json"), res)
    lines = [f"# Conv 3x3 at 16x16 latency by channel count ({target.name})", "",
             f"The other dimension fixed at {args.fixed}; median of {args.rounds} interleaved rounds, in µs. "
             "Per-µs ratio = latency / channels of the varied dimension.", "",
             "| channels | input varied (µs) | output varied (µs) | multiple of 8 |", "|---|---|---|---|"]
    for c in counts:
        lines.append(f"| {c} | {1000 * stats[f'in{c}'].median:.1f} | {1000 * stats[f'out{c}'].median:.1f} | {'yes' if c % 8 == 0 else ''} |")
    for dim in ("in", "out"):
        m8 = [1000 * stats[f"{dim}{c}"].median for c in counts if c % 8 == 0]
        other = [1000 * stats[f"{dim}{c}"].median for c in counts if c % 8]
        lines.append(f"\n{dim}put channels: median {np.median(m8):.1f} µs at multiples of 8, {np.median(other):.1f} µs elsewhere.")
    prov = res["provenance"]
    lines += ["", f"{prov['date']}; deploy-prune {prov['tool_version']} ({prov['git_commit']}); {prov['cpu']}; "
              f"{res['measurer']['backend_versions']}.", ""]
    write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
