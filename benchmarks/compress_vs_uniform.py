"""DeepLSP vs uniform L1 channel pruning at the same *measured* latency budgets.

Both methods go through the same ``compress`` pipeline (LUT, measured closed loop, the same
step and final fine-tuning, KD), so the only difference is how channels are allocated and
the unstructured masks DeepLSP adds. Budgets are shares of the baseline latency measured on
the target in the same session.

    python benchmarks/compress_vs_uniform.py --weights runs/r20-fmnist --data fashion-mnist \
        --target cpu-ort-1t --budgets 0.7,0.5,0.35 --epochs 1 --out benchmarks/results/compress_vs_uniform
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deploy_prune.data import DataOptions
from deploy_prune.errors import BudgetUnreachable
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.latency.timing import quiet_of
from deploy_prune.pipeline import CompressConfig, compress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="runs/r20-fmnist")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--budgets", default="0.7,0.5,0.35", help="shares of the measured baseline latency")
    ap.add_argument("--methods", default="deeplsp,uniform")
    ap.add_argument("--epochs", type=int, default=1, help="final fine-tuning epochs (the same for every method)")
    ap.add_argument("--step-fraction", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--runs", default="runs/bench-cvu", help="where the compress run directories go")
    ap.add_argument("--profiles", default="profiles")
    ap.add_argument("--out", default="benchmarks/results/compress_vs_uniform")
    args = ap.parse_args()

    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    runs = Path(args.runs)
    rows, sens = [], None
    for b in budgets:
        for m in methods:
            out = runs / f"{m}-{int(round(100 * b))}"
            t0 = time.perf_counter()
            cfg = CompressConfig(out=out, weights=args.weights, data=args.data, data_options=DataOptions(),
                                 target=args.target, latency_ratio=b, method=m, epochs=args.epochs,
                                 step_fraction=args.step_fraction, lr=args.lr, profiles=Path(args.profiles),
                                 sensitivity=sens if m == "deeplsp" else None,
                                 # an interrupted run continues; a finished one is measured afresh
                                 resume=(out / "checkpoints" / "state.pt").is_file() and not (out / "report.json").is_file(),
                                 overwrite=(out / "report.json").is_file())
            try:
                rep = compress(cfg, progress=lambda msg, m=m, b=b: print(f"[{m} {b:.0%}] {msg}", flush=True))
            except BudgetUnreachable as e:  # exit 3: recorded with the reachable floor compress measured
                rows.append({"method": m, "budget_ratio": b, "unreachable": str(e), "wall_s": round(time.perf_counter() - t0, 1)})
                print(f"[{m} {b:.0%}] unreachable: {e}", flush=True)
                _write(args, rows)
                continue
            if m == "deeplsp" and sens is None:
                sens = str(out / "sensitivity.json")  # the same analysis serves every budget
            rows.append({
                "method": m, "budget_ratio": b, "budget_ms": rep["budget"]["latency_ms"],
                "met_budget": rep["met_budget"], "budget_note": rep["budget_note"],
                "baseline_accuracy": rep["baseline"]["accuracy"], "accuracy": rep["final"]["accuracy"],
                # the quiet figure (latency.timing) is what compress decides on; the medians are kept beside it
                "baseline_ms": quiet_of(rep["baseline"]["latency_ms"]), "latency_ms": quiet_of(rep["final"]["latency_ms"]),
                "baseline_median_ms": rep["baseline"]["latency_ms"]["median"], "latency_median_ms": rep["final"]["latency_ms"]["median"],
                "baseline_same_session_ms": rep["final"]["baseline_same_session_ms"],
                "measured_ratio": quiet_of(rep["final"]["latency_ms"]) / rep["final"]["baseline_same_session_ms"],
                "flops_ratio": rep["final"]["flops"] / rep["baseline"]["flops"],
                "params_ratio": rep["final"]["params"] / rep["baseline"]["params"],
                "sparsity": rep["final"]["sparsity"], "widths": {la["group"]: la["channels_after"] for la in rep["layers"]},
                "stage_seconds": rep["stage_seconds"], "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(out),
            })
            _write(args, rows)  # after every run: a partial result survives a cut-off
            print(json.dumps(rows[-1], indent=None)[:400], flush=True)


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    res = {"config": vars(args), "rows": rows, "provenance": provenance(target=args.target)}
    write_json(Path(args.out + ".json"), res)
    write_text(Path(args.out + ".md"), markdown(res))


def markdown(res: dict) -> str:
    c = res["config"]
    lines = [
        "# DeepLSP vs uniform L1 at the same measured latency budget",
        "",
        f"`python benchmarks/compress_vs_uniform.py --weights {c['weights']} --data {c['data']} --target {c['target']} "
        f"--budgets {c['budgets']} --epochs {c['epochs']} --step-fraction {c['step_fraction']} --lr {c['lr']} "
        f"--runs {c['runs']} --profiles {c['profiles']} --out {c['out']}`",
        "",
        "| budget | method | met | accuracy % (baseline) | latency ms (budget) | ratio to baseline, same session | % of budget | FLOPs kept | params kept | zeros | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "unreachable" in r:
            lines.append(f"| {r['budget_ratio']:.0%} | {r['method']} | unreachable (exit 3) | {r['unreachable']} ||||||| {r['wall_s']:.0f} |")
            continue
        lines.append(
            f"| {r['budget_ratio']:.0%} | {r['method']} | {'yes' if r['met_budget'] else 'NO'} | "
            f"{100 * r['accuracy']:.2f} ({100 * r['baseline_accuracy']:.2f}) | {r['latency_ms']:.3f} ({r['budget_ms']:.3f}) | "
            f"{r['measured_ratio']:.3f} | {100 * r['measured_ratio'] / r['budget_ratio']:.0f} % | {r['flops_ratio']:.2f} | {r['params_ratio']:.2f} | {100 * r['sparsity']:.1f} % | {r['wall_s']:.0f} |"
        )
    lines += ["", "Latencies are the quiet figure compress decides on (median of the round medians within 10 % of the "
              "fastest round; the overall medians are in the JSON); the ratio is the final model's over the baseline's, "
              "timed interleaved in one measurement. The verdict (*met*) pools two final measurements (`budget_note`).",
              "", "Per-stage seconds:", ""]
    for r in res["rows"]:
        if "stage_seconds" in r:
            lines.append(f"- {r['method']} {r['budget_ratio']:.0%}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items()))
    p = res["provenance"]
    lines += ["", provenance_line(p)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
