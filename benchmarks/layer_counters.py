"""Backends' own per-layer counters vs our LUT entries vs end-to-end timing.

For each target: profile the model (or reuse the profile under --profiles), then for the full
model and a pruned variant (every group at --keep of its channels), read the backend's own
per-node counters (ORT profiler, OpenVINO PERF_COUNT, torch hooks), attribute them to layers
(``deploy_prune.latency.counters``) and set them beside the LUT's per-layer entries and the
end-to-end median, all measured in this run.

    python benchmarks/layer_counters.py --targets cpu-ort-1t,cpu-openvino-1t,cpu-torch-1t

Writes benchmarks/results/layer_counters.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from deploy_prune.backends import get_backend, layer_times
from deploy_prune.export import onnx_bytes
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.latency import lut
from deploy_prune.latency.counters import OTHER, attribute, compare, node_to_layer
from deploy_prune.latency.lut import predict
from deploy_prune.latency.measure import LocalMeasurer, feed_for
from deploy_prune.latency.profile import ProfileSpec, describe, plan_variant, pruned_copy, run_profile
from deploy_prune.models import build_model
from deploy_prune.target import load_target

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="cpu-ort-1t,cpu-openvino-1t,cpu-torch-1t")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--input-shape", default="3,32,32")
    ap.add_argument("--keep", type=float, default=0.5, help="keep share of every group in the pruned variant")
    ap.add_argument("--runs", type=int, default=50, help="profiled runs per model for the counters (median)")
    ap.add_argument("--profiles", type=Path, default=Path("runs/bench-counters/profiles"))
    ap.add_argument("--out", type=Path, default=RESULTS / "layer_counters")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.input_shape.split(","))
    torch.manual_seed(0)
    base = build_model(args.model, 10, shape[0]).eval()
    example = torch.zeros(1, *shape)

    rows, per_layer = [], {}
    for tname in args.targets.split(","):
        target = load_target(tname)
        spec = ProfileSpec(base, args.model, shape, target)
        _, prof = run_profile(spec, args.profiles)
        graph, _, _ = describe(spec)
        variants = {"full": base, f"keep{args.keep:g}": pruned_copy(base, shape, plan_variant(graph, {g.name: args.keep for g in graph.groups()}),
                                                                   multiple=target.channel_multiple).eval()}
        blobs = {k: onnx_bytes(m, shape) for k, m in variants.items()}
        e2e = LocalMeasurer(target).time(blobs)  # end to end, the variants interleaved
        backend = get_backend(target.backend)
        for key, model in variants.items():
            # with the probe, less what the profiler adds to each node: as the LUT's counter entries
            sess = backend.load(lut.with_probe(blobs[key]), target, per_layer=True)
            counters = lut.net_of_probe(layer_times(sess, feed_for(sess, target), runs=args.runs))
            by_layer = {k: max(v, 0.0) for k, v in  # clipped per layer, as the entries
                        attribute(counters, node_to_layer(onnx.load_from_string(blobs[key]), model, example)).items()}
            pred = predict(model, prof)
            cmp = compare(pred["per_layer"], by_layer)
            row = {
                "target": tname, "variant": key, "backend": target.backend, "threads": target.resolved_threads(),
                "lut_timing": prof.get("layer_timing", "wall"),
                "end_to_end_ms": e2e[key].median, "end_to_end_round_cv": e2e[key].round_cv,
                "counter_total_ms": sum(counters.values()), "counter_layers_ms": sum(v for k, v in by_layer.items() if k != OTHER),
                "counter_other_ms": by_layer.get(OTHER, 0.0), "lut_layer_sum_ms": pred["layer_sum_ms"],
                "lut_remainder_ms": pred["raw_ms"] - pred["layer_sum_ms"], "lut_raw_ms": pred["raw_ms"],
                "lut_calibrated_ms": pred["calibrated_ms"], **cmp,
            }
            rows.append(row)
            per_layer[f"{tname}/{key}"] = {n: {"lut_ms": pred["per_layer"][n], "counter_ms": by_layer.get(n)} for n in pred["per_layer"]}
            print(f"{tname} {key}: e2e {row['end_to_end_ms']:.3f} ms, counters {row['counter_total_ms']:.3f} "
                  f"(layers {row['counter_layers_ms']:.3f}), LUT layers {row['lut_layer_sum_ms']:.3f} raw {row['lut_raw_ms']:.3f}; "
                  f"per-layer LUT/counter median {cmp['median_ratio']:.2f}, rho {cmp['spearman']:.3f}", flush=True)
        write_json(args.out.with_suffix(".json"), {"benchmark": "layer_counters", "model": args.model, "input_shape": list(shape),
                                                   "rows": rows, "per_layer": per_layer, "provenance": provenance()})

    lines = [f"# Backend per-layer counters vs LUT entries vs end to end ({args.model}, {'x'.join(map(str, shape))}, batch 1)", "",
             "*Counters*: the backend's own per-node times (median of "
             f"{args.runs} profiled runs), attributed to layers; *(other)* is what no layer owns (reorders, pooling, reshape). "
             "*LUT*: the profile's per-layer entries (each a standalone conv + its fused BN/activation/residual add: its wall "
             "time with the target's protocol, or its nodes' counters, per the target's `layer_timing`) and the raw prediction (+ remainder). *End to end*: the target's protocol, "
             "variants interleaved. Ratio and ρ compare LUT and counter per layer.", "",
             "| target (LUT entries) | variant | end to end ms | counters: total / layers / other ms | LUT: layers / raw / calibrated ms | "
             "counter total / e2e | LUT raw / e2e | per-layer LUT/counter (median) | median |dev| | ρ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} ({r['lut_timing']}) | {r['variant']} | {r['end_to_end_ms']:.3f} | {r['counter_total_ms']:.3f} / "
                     f"{r['counter_layers_ms']:.3f} / {r['counter_other_ms']:.3f} | {r['lut_layer_sum_ms']:.3f} / {r['lut_raw_ms']:.3f} / "
                     f"{r['lut_calibrated_ms']:.3f} | {r['counter_total_ms'] / r['end_to_end_ms']:.2f} | "
                     f"{r['lut_raw_ms'] / r['end_to_end_ms']:.2f} | {r['median_ratio']:.2f} | {r['median_abs_dev_pct']:.0f} % | "
                     f"{r['spearman']:.3f} |")
    lines += ["", f"Layers compared per row: {rows[0]['layers_compared']} of {rows[0]['layers_in_lut']}." if rows else "", "",
              provenance_line(provenance()), ""]
    write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0 if rows and all(np.isfinite(r["median_ratio"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
