"""Where weight streaming sets in: uniform variants swept across the cache size, end to end.

The LUT's entries are timed with the layer's weights hot; a model whose weights do not fit in the
cache streams them in on every run (``deploy_prune.latency.lut`` docstring). This benchmark prunes
the model uniformly at keep shares from --shares, so its weights sweep across the cache, measures
every variant end to end (interleaved, the target's protocol), and asks which model of the
streamed share fits: ``measured ~ a * (hot layer sum + ms_per_mb * MB * share(MB)) + b`` with
``ms_per_mb`` the profile's own fit, ``a, b`` least squares, and ``share`` either the step at the
cache or a linear ramp from lo x cache to hi x cache (a grid of lo, hi). It reports the relative
sum of squared residuals of the step, of ``lut.STREAM_RAMP`` and of the grid's best.

    python benchmarks/weight_stream_knee.py --target cpu-ort-1t --model mobilenet_v2

Writes benchmarks/results/weight_stream_knee.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from deploy_prune.export import onnx_bytes
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.latency import lut
from deploy_prune.latency.measure import measurer_for
from deploy_prune.latency.profile import ProfileSpec, describe, plan_variant, pruned_copy, run_profile
from deploy_prune.models import build_model
from deploy_prune.target import load_target

RESULTS = Path(__file__).resolve().parent / "results"


def fit_share(hot: np.ndarray, mb: np.ndarray, y: np.ndarray, slope: float, share: np.ndarray) -> tuple[float, float, float]:
    """Least squares of y on (hot + slope * mb * share); returns a, b and the relative SSE."""
    x = hot + slope * mb * share
    a_mat = np.vstack([x, np.ones_like(x)]).T
    (a, b), *_ = np.linalg.lstsq(a_mat, y, rcond=None)
    return float(a), float(b), float(np.sum(((y - a_mat @ np.array([a, b])) / y) ** 2))


def shares(mb: np.ndarray, cache_bytes: float, ramp: tuple[float, float] | None) -> np.ndarray:
    """``lut.streamed_share`` of each variant's weights: with the ramp (lo, hi), or the step at the cache (None)."""
    ws = {"cache_bytes": cache_bytes, "ramp": list(ramp) if ramp else None}
    return np.array([lut.streamed_share(b * 1e6, ws) for b in mb])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--input-shape", default="3,32,32")
    ap.add_argument("--shares", default="0.25:0.80:0.025", help="start:stop:step of the uniform keep shares")
    ap.add_argument("--profiles", type=Path, default=Path("runs/bench-knee/profiles"))
    ap.add_argument("--out", type=Path, default=RESULTS / "weight_stream_knee")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # pruning and export stay off the core being measured as far as possible
    shape = tuple(int(v) for v in args.input_shape.split(","))
    target = load_target(args.target)
    torch.manual_seed(0)
    base = build_model(args.model, 10, shape[0]).eval()
    spec = ProfileSpec(base, args.model, shape, target)
    _, prof = run_profile(spec, args.profiles, reuse=True)
    ws = prof["weight_stream"]
    if not ws.get("ms_per_mb"):
        print(f"error: the profile has no weight-streaming slope ({ws.get('why_none')}): pick a model whose weights exceed the cache",
              file=sys.stderr)
        return 2
    graph, _, _ = describe(spec)
    start, stop, step = (float(v) for v in args.shares.split(":"))
    variants, seen = {}, set()
    for r in np.arange(start, stop + 1e-9, step):
        plan = plan_variant(graph, {g.name: float(r) for g in graph.groups()})
        if tuple(sorted(plan.items())) not in seen:
            seen.add(tuple(sorted(plan.items())))
            variants[f"uniform-{r:.3f}"] = pruned_copy(base, shape, plan, multiple=target.channel_multiple).eval()
    print(f"{len(variants)} variants, measuring end to end", flush=True)
    stats = measurer_for(target).time({k: onnx_bytes(m, shape, target.batch) for k, m in variants.items()})
    rows = []
    for k, m in variants.items():
        hot = lut.predict(m, {**prof, "weight_stream": None, "calibration": None})["layer_sum_ms"]
        rows.append({"variant": k, "weight_mb": sum(lut.weight_bytes(m, int(ws["bytes_per_weight"])).values()) / 1e6,
                     "hot_layer_sum_ms": hot, "measured_ms": stats[k].quiet, "round_cv": stats[k].round_cv})
    hot = np.array([r["hot_layer_sum_ms"] for r in rows])
    mb = np.array([r["weight_mb"] for r in rows])
    y = np.array([r["measured_ms"] for r in rows])
    cache, cache_mb, slope = float(ws["cache_bytes"]), ws["cache_bytes"] / 1e6, float(ws["ms_per_mb"])
    grid = [(round(lo, 2), round(hi, 2)) for lo in np.arange(0.3, 1.21, 0.05) for hi in np.arange(0.5, 2.51, 0.05) if hi > lo + 1e-9]
    fits = {f"ramp {lo:.2f}-{hi:.2f}": fit_share(hot, mb, y, slope, shares(mb, cache, (lo, hi))) for lo, hi in grid}
    best = min(fits, key=lambda k: fits[k][2])
    chosen = f"ramp {lut.STREAM_RAMP[0]:.2f}-{lut.STREAM_RAMP[1]:.2f}"
    models = {"none": fit_share(hot, mb, y, slope, np.zeros_like(mb)),
              "step at the cache": fit_share(hot, mb, y, slope, shares(mb, cache, None)),
              f"{chosen} (lut.STREAM_RAMP)": fits.get(chosen) or fit_share(hot, mb, y, slope, shares(mb, cache, lut.STREAM_RAMP)),
              f"{best} (best on the grid)": fits[best]}
    result = {"benchmark": "weight_stream_knee", "target": target.name, "model": args.model, "input_shape": list(shape),
              "cache_bytes": ws["cache_bytes"], "cache_from": ws.get("cache_from"), "ms_per_mb": slope,
              "models": {k: {"a": a, "b": b, "relative_sse": sse} for k, (a, b, sse) in models.items()},
              "rows": rows, "protocol": target.protocol.__dict__, "provenance": provenance()}
    write_json(args.out.with_suffix(".json"), result)
    lines = [f"# Weight streaming across the cache: {args.model} {'x'.join(map(str, shape))} on {target.name}", "",
             f"Uniform variants end to end (quiet figure of the target's protocol, interleaved) against the profile's hot layer "
             f"sum plus the streaming term with the profile's {slope:.4f} ms/MB; cache {cache_mb:.2f} MB ({ws.get('cache_from')}). "
             "Each share model gets its own least-squares a, b; relative SSE = sum of ((measured - fit) / measured)^2.", "",
             "| share model | a | b (ms) | relative SSE |", "|---|---|---|---|"]
    lines += [f"| {k} | {a:.3f} | {b:.4f} | {sse:.4f} |" for k, (a, b, sse) in models.items()]
    lines += ["", "| variant | weights MB | hot layer sum ms | measured ms | round CV |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['weight_mb']:.2f} | {r['hot_layer_sum_ms']:.4f} | {r['measured_ms']:.4f} | "
              f"{100 * r['round_cv']:.0f} % |" for r in rows]
    lines += ["", provenance_line(result["provenance"]), ""]
    write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
