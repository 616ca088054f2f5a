"""InCoP vs SAP ("Information Consistent Pruning"): the same PQ-index pruning, retraining stopped by information or gradient flow.

SAP retrains a fixed E epochs after every pruning iteration; InCoP-IF / InCoP-GF stop as soon
as the network's information flow (or gradient flow) is within epsilon of the dense network's,
at most E epochs. The paper reports the same final accuracy with about 13 % of SAP's time
(ResNet-18, Fashion-MNIST, T = 15, E = 20). Every variant runs ``compress --method sap|incop``
with the same sparsity target, (p, q), learning rate and data; plain cross-entropy retraining
(``--no-kd``, as the paper) and no extra final fine-tuning, so the iterations are all the training.

    python benchmarks/incop_vs_sap.py --weights runs/r20-fmnist --data fashion-mnist \
        --iterations 15 --max-epochs 3 --train-limit 5000 --sparsity 0.95

Writes benchmarks/results/incop_vs_sap.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from deploy_prune.data import DataOptions
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.pipeline import CompressConfig, compress

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"sap": ("sap", {}), "incop-if": ("incop", {"flow": "if"}), "incop-gf": ("incop", {"flow": "gf"})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="runs/r20-fmnist")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--target", default="cpu-ort-1t", help="only the final latency columns use it")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--iterations", type=int, default=15, help="T, pruning iterations")
    ap.add_argument("--max-epochs", type=float, default=3, help="E, retraining epochs per iteration (InCoP: at most)")
    ap.add_argument("--sparsity", type=float, default=0.95, help="target; the iterations stop once it is reached")
    ap.add_argument("--pq", default="0.5,1", help="SAP's (p, q)")
    ap.add_argument("--eps-if", type=float, default=None, help="IF epsilon (default: the method's, 0.2 of the dense flow)")
    ap.add_argument("--eps-gf", type=float, default=None,
                    help="GF epsilon (default: the method's, 0.5 of the distance right after each prune)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-incop"))
    ap.add_argument("--out", type=Path, default=RESULTS / "incop_vs_sap")
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown from OUT.json, run nothing")
    args = ap.parse_args(argv)
    p, q = (float(v) for v in args.pq.split(","))
    if args.report_only:
        from deploy_prune.io import read_json

        saved = read_json(args.out.with_suffix(".json"))
        args = argparse.Namespace(**{**vars(args), **saved["config"], "out": args.out})
        write_text(args.out.with_suffix(".md"), markdown(saved["rows"], args, saved["provenance"]))
        return 0

    rows = []
    for name in args.variants.split(","):
        method, extra = VARIANTS[name]
        eps = args.eps_if if extra.get("flow") == "if" else args.eps_gf
        if method == "incop" and eps is not None:
            extra = {**extra, "eps": eps}
        out = args.runs / name
        t0 = time.perf_counter()
        rep = compress(CompressConfig(
            out=out, weights=args.weights, data=args.data, data_options=DataOptions(train_limit=args.train_limit),
            target=args.target, method=method, sparsity=args.sparsity, epochs=0, kd=False, lr=args.lr,
            method_options={"iterations": args.iterations, "retrain_epochs": args.max_epochs, "p": p, "q": q, **extra},
            resume=(out / "checkpoints" / "state.pt").is_file() and not (out / "report.json").is_file()),
            progress=lambda msg, n=name: print(f"[{n}] {msg}", flush=True))
        its = [s for s in rep["steps"] if s["stage"] == "imp"]
        rows.append({
            "variant": name, "method": method, "settings": rep["method"]["settings"],
            "baseline_accuracy": rep["baseline"]["accuracy"], "final_accuracy": rep["final"]["accuracy"],
            "final_sparsity": rep["final"]["sparsity"], "iterations_run": len(its),
            "epochs_total": sum(s["epochs_run"] for s in its), "train_seconds": round(sum(s["train_seconds"] for s in its), 1),
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "per_iteration": [{k: s.get(k) for k in ("iteration", "sparsity", "accuracy", "epochs_run", "train_seconds",
                                                      "flow_after_prune", "flow_distances")} for s in its],
        })
        print(f"{name}: accuracy {rows[-1]['final_accuracy']:.4f} at sparsity {rows[-1]['final_sparsity']:.4f}, "
              f"{rows[-1]['epochs_total']} epochs, {rows[-1]['train_seconds']:.0f} s training", flush=True)
        write_json(args.out.with_suffix(".json"), {"benchmark": "incop_vs_sap", "config": {k: str(v) for k, v in vars(args).items()},
                                                   "rows": rows, "provenance": provenance()})
    md = markdown(rows, args, provenance())
    write_text(args.out.with_suffix(".md"), md)
    print(md)
    return 0


def markdown(rows: list[dict], args: argparse.Namespace, prov: dict) -> str:
    sap = next((r for r in rows if r["variant"] == "sap"), None)
    lines = ["# InCoP vs SAP: the same pruning, retraining stopped by flow consistency", "",
             f"`python benchmarks/incop_vs_sap.py --weights {args.weights} --data {args.data} --iterations {args.iterations} "
             f"--max-epochs {args.max_epochs} --sparsity {args.sparsity} --pq {args.pq}"
             + (f" --train-limit {args.train_limit}" if args.train_limit else "") + "`", "",
             f"(p, q) = ({args.pq}); epsilon: " + "; ".join(
                 f"{r['variant']} {r['settings']['eps']} ({'of the dense flow' if r['settings']['eps_scale'] == 'dense' else 'of the distance right after each prune'})"
                 for r in rows if r["method"] == "incop") + f"; SGD lr {args.lr}, "
             "cross-entropy retraining, no final fine-tuning. Seconds are this machine's wall clock (wall s includes "
             "the flow computations) and move with whatever else runs on it; epochs do not.", "",
             "| variant | final accuracy (baseline) | sparsity | iterations | epochs | epochs vs SAP | training s | wall s | wall vs SAP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['wall_seconds'] / sap['wall_seconds']:.0%}" if sap else "-"
        ep_ratio = f"{r['epochs_total'] / sap['epochs_total']:.0%}" if sap else "-"
        lines.append(f"| {r['variant']} | {100 * r['final_accuracy']:.2f} % ({100 * r['baseline_accuracy']:.2f} %) | "
                     f"{100 * r['final_sparsity']:.1f} % | {r['iterations_run']} | {r['epochs_total']} | {ep_ratio} | "
                     f"{r['train_seconds']:.0f} | {r['wall_seconds']:.0f} | {ratio} |")
    lines += ["", "Per iteration: sparsity / accuracy / retraining epochs; for InCoP also the flow distance right after "
              "the prune and after each epoch.", "",
              "| iteration | " + " | ".join(r["variant"] for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for t in range(max((len(r["per_iteration"]) for r in rows), default=0)):
        cells = []
        for r in rows:
            if t >= len(r["per_iteration"]):
                cells.append("-")
                continue
            it = r["per_iteration"][t]
            cell = f"{100 * it['sparsity']:.1f} % / {100 * it['accuracy']:.2f} % / {it['epochs_run']}"
            if it.get("flow_distances") is not None:
                cell += f" ({it['flow_after_prune']:.3g} → " + ", ".join(f"{d:.3g}" for d in it["flow_distances"]) + ")"
            cells.append(cell)
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    lines += ["", provenance_line(prov) + " One seed.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
