"""What pruning off ONNX Runtime's channel block costs outside the layers.

ORT's CPU kernels keep activations in blocks of channels (MLAS NCHWc: 8 with AVX2, 16 with
AVX-512). A conv pads a width up to the block, but a pool or a residual Add at a width that is not
a multiple of the block runs in the plain layout, with reorders around it. None of that is in a
one-layer LUT entry. For random pruned variants (the LUT validation's recipe) at channel
multiples of 8 and of 16, this reads ORT's optimized graph and its profiler: the nodes outside
the blocked layout (reorders, and ops left in the plain layout other than the classifier head)
and their share of the variant's node time.

    python benchmarks/layout_transitions.py --cases resnet18@224,mobilenet_v2@32,resnet20@32

Writes benchmarks/results/layout_transitions.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploy_prune.backends import get_backend, layer_times
from deploy_prune.backends.onnxruntime import nchwc_block, optimized_graph
from deploy_prune.config import Target
from deploy_prune.export import onnx_bytes
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.latency.measure import feed_for
from deploy_prune.latency.profile import ProfileSpec, describe, plan_variant, pruned_copy, random_shares
from deploy_prune.models import build_model
from deploy_prune.target import load_target

RESULTS = Path(__file__).resolve().parent / "results"
HEAD = {"ReduceMean", "GlobalAveragePool", "Reshape", "Flatten", "Gemm", "MatMul"}  # plain at any width


def outside_block(model_bytes: bytes, target: Target, runs: int) -> dict[str, Any]:
    """Nodes outside the blocked layout in ORT's optimized graph, and their share of node time
    (the backend's per-node counters, as the LUT reads them)."""
    opt = optimized_graph(model_bytes)
    outside = {n.name for n in opt.graph.node
               if n.op_type.startswith("Reorder") or (n.domain == "" and n.op_type not in HEAD and n.op_type != "Conv")}
    sess = get_backend("onnxruntime").load(model_bytes, target, per_layer=True)
    node_ms = layer_times(sess, feed_for(sess, target), runs)
    total = sum(node_ms.values())
    out_ms = sum(ms for n, ms in node_ms.items() if n in outside)
    reorders = sum(1 for n in opt.graph.node if n.op_type.startswith("Reorder"))
    return {"outside_nodes": len(outside), "reorders": reorders, "outside_ms": out_ms, "node_ms": total,
            "outside_share": out_ms / total if total else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="resnet18@224,mobilenet_v2@32,resnet20@32")
    ap.add_argument("--multiples", default="8,16")
    ap.add_argument("--variants", type=int, default=10)
    ap.add_argument("--runs", type=int, default=10, help="profiled runs per variant (after as many untimed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "layout_transitions")
    args = ap.parse_args(argv)
    base_target = load_target("cpu-ort-1t")
    rows = []
    for case in args.cases.split(","):
        name, size = case.split("@")
        shape = (3, int(size), int(size))
        torch.manual_seed(0)
        base = build_model(name, 10, 3).eval()
        full = outside_block(onnx_bytes(base, shape), base_target, args.runs)
        for mult in (int(v) for v in args.multiples.split(",")):
            target = dataclasses.replace(base_target, channel_multiple=mult)
            graph, _, _ = describe(ProfileSpec(base, name, shape, target))
            rng = np.random.default_rng(0)  # the same shares at every multiple
            found = []
            for i in range(args.variants):
                plan = plan_variant(graph, random_shares(graph, rng, uniform=(i % 3 == 0)))
                found.append(outside_block(onnx_bytes(pruned_copy(base, shape, plan, multiple=mult).eval(), shape), target, args.runs))
            shares = [f["outside_share"] for f in found]
            rows.append({"case": case, "multiple": mult, "variants": found, "full": full,
                         "median_share": float(np.median(shares)), "max_share": float(max(shares)),
                         "median_reorders": float(np.median([f["reorders"] for f in found])),
                         "with_extra_nodes": sum(f["outside_nodes"] > full["outside_nodes"] for f in found)})
            print(f"{case} multiple {mult}: outside the block {100 * rows[-1]['median_share']:.1f} % of node time (median), "
                  f"max {100 * rows[-1]['max_share']:.1f} %; {rows[-1]['with_extra_nodes']}/{len(found)} variants gain nodes")
    prov = provenance()
    write_json(args.out.with_suffix(".json"), {"rows": rows, "nchwc_block": nchwc_block(), "provenance": prov})
    lines = [f"# Nodes outside ONNX Runtime's blocked layout (cpu-ort-1t, NCHWc block {nchwc_block()} here)", "",
             f"{args.variants} random variants per row (LUT validation's recipe, same shares in every row of a case); "
             f"ORT's optimized graph and its per-node counters (interquartile mean of {args.runs} runs).", "",
             "| case | channel multiple | share of node time outside the block (median / max) | reorders (median) "
             "| variants with more such nodes than the full model |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['multiple']} | {100 * r['median_share']:.1f} % / {100 * r['max_share']:.1f} % "
                     f"| {r['median_reorders']:.0f} (full model {r['full']['reorders']}) | {r['with_extra_nodes']}/{len(r['variants'])} |")
    lines += ["", provenance_line(prov)]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
