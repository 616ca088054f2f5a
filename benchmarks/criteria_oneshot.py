"""Which importance criterion removes the right channels? (issue: structured pruning, "must show")

Every criterion prunes the same trained model to ``--flops-ratio`` of its FLOPs in one shot
(one uniform keep share for all groups, so only the choice of channels *within* a group
differs), then the model is evaluated with no fine-tuning, after re-estimating the BatchNorm
statistics, and after ``--finetune-epochs`` of fine-tuning (``--finetune-epochs 0`` skips
fine-tuning: fine-tuned accuracies are recorded as null). ``random`` runs with several seeds
to show its spread.

    python benchmarks/criteria_oneshot.py --weights runs/r20-fmnist --data fashion-mnist
    python benchmarks/criteria_oneshot.py --weights runs/r20-fmnist --finetune-epochs 0 --out benchmarks/results/x

Writes benchmarks/results/criteria_oneshot.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from deploy_prune.allocate import uniform_for_flops
from deploy_prune.data import DataOptions, load_data, make_loader
from deploy_prune.graph import ModelGraph
from deploy_prune.importance import CRITERIA, score_groups
from deploy_prune.io import provenance, write_json, write_text
from deploy_prune.models.checkpoint import load_model
from deploy_prune.train import TrainConfig, evaluate, fit, recalibrate_bn

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--flops-ratio", type=float, default=0.5)
    ap.add_argument("--criteria", default=",".join(CRITERIA.names()))
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--score-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--bn-batches", type=int, default=20, help="training batches for BN recalibration")
    ap.add_argument("--finetune-epochs", type=int, default=1, help="0: no fine-tuning (BN-recalibrated accuracy only)")
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--train-limit", type=int, default=None, help="fine-tune on N samples (quick runs)")
    ap.add_argument("--val-limit", type=int, default=None, help="evaluate on a seeded subset of N validation samples")
    ap.add_argument("--out", type=Path, default=RESULTS / "criteria_oneshot")
    args = ap.parse_args(argv)

    device = "cuda" if os.environ.get("DEPLOY_PRUNE_DEVICE") == "cuda" and torch.cuda.is_available() else "cpu"
    data = load_data(args.data, DataOptions(data_dir=args.data_dir, train_limit=args.train_limit, val_limit=args.val_limit))
    base, meta = load_model(args.weights)
    base.to(device)
    base_acc = evaluate(base, data.val, device=device)["accuracy"]
    print(f"baseline val accuracy {base_acc:.4f} ({len(data.val)} samples) on {device}", flush=True)
    bn_batches = [b for i, b in zip(range(args.bn_batches), make_loader(data.train, args.batch_size, shuffle=True, seed=1), strict=False)]
    batches = [b for i, b in zip(range(args.score_batches), make_loader(data.train, args.batch_size, shuffle=True, seed=0), strict=False)]
    runs = [(c, 0) for c in args.criteria.split(",") if c != "random"]
    if "random" in args.criteria.split(","):
        runs += [("random", s) for s in range(args.random_seeds)]
    rows = []
    for crit, seed in runs:
        model = copy.deepcopy(base)
        graph = ModelGraph(model, data.input_shape)
        flops0, params0 = graph.flops_params()
        t0 = time.perf_counter()
        scores = score_groups(model, graph, crit, batches, seed=seed)
        t_score = time.perf_counter() - t0
        plan, share = uniform_for_flops(graph, args.flops_ratio)
        graph.prune_by_scores(plan, scores)
        flops, params = graph.flops_params()
        acc_oneshot = evaluate(model, data.val, device=device)["accuracy"]
        acc_bn = evaluate(recalibrate_bn(model, bn_batches), data.val, device=device)["accuracy"]
        acc_ft = t_ft = None
        if args.finetune_epochs > 0:
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                fit(model, data, TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, seed=seed), tmp, meta,
                    progress=False)
            t_ft = round(time.perf_counter() - t1, 2)
            acc_ft = evaluate(model, data.val, device=device)["accuracy"]
        rows.append({"criterion": crit, "seed": seed, "keep_share": share, "flops": flops, "flops_ratio": flops / flops0,
                     "params_ratio": params / params0, "accuracy_oneshot": acc_oneshot, "accuracy_bn_recalibrated": acc_bn, "accuracy_finetuned": acc_ft,
                     "score_seconds": round(t_score, 2), "finetune_seconds": t_ft})
        ft = f"{acc_ft:.4f}" if acc_ft is not None else "-"
        print(f"{crit:10s} seed {seed}: one-shot {acc_oneshot:.4f}  BN-recal {acc_bn:.4f}  fine-tuned {ft}  "
              f"(FLOPs {flops / flops0:.3f}, score {t_score:.1f}s)", flush=True)

    rnd = [r for r in rows if r["criterion"] == "random"]
    summary = {}
    for key in ("accuracy_oneshot", "accuracy_bn_recalibrated", "accuracy_finetuned"):
        vals = [r[key] for r in rnd if r[key] is not None]
        summary[key] = {"random_mean": statistics.fmean(vals) if vals else None,
                        "random_std": statistics.pstdev(vals) if len(vals) > 1 else (0.0 if vals else None)}
    named = [r for r in rows if r["criterion"] != "random"]
    tuned = args.finetune_epochs > 0
    best = max(named, key=lambda r: r["accuracy_finetuned"]) if named and tuned else None
    best_bn = max(named, key=lambda r: r["accuracy_bn_recalibrated"]) if named else None
    result = {"benchmark": "criteria_oneshot", "weights": str(args.weights), "data": args.data,
              "flops_ratio": args.flops_ratio, "finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr,
              "train_limit": args.train_limit, "val_limit": args.val_limit, "val_size": len(data.val), "device": device, "baseline_accuracy": base_acc, "rows": rows,
              "random": summary, "winner": best["criterion"] if best else None,
              "winner_bn_recalibrated": best_bn["criterion"] if best_bn else None, "provenance": provenance()}
    write_json(args.out.with_suffix(".json"), result)

    lines = ["# One-shot pruning by criterion", "",
             f"Model `{meta.get('model', {}).get('spec', '?')}` from `{args.weights}`, data `{args.data}` "
             f"(val {len(data.val)} samples), baseline val accuracy **{100 * base_acc:.2f} %**.",
             f"Every criterion prunes to {args.flops_ratio:.0%} of the FLOPs in one shot (uniform keep share per group), "
             f"measured raw, after re-estimating BN statistics on {args.bn_batches} training batches (no weight update)"
             + (f", and after {args.finetune_epochs} epoch(s) of fine-tuning at lr {args.finetune_lr}"
                + (f" on {args.train_limit} training samples" if args.train_limit else "") if tuned else ", no fine-tuning")
             + f"; scoring on {args.score_batches} training batches of {args.batch_size}; device {device}.", "",
             "| criterion | FLOPs kept | one-shot | one-shot + BN recal. | vs random (BN recal.) | fine-tuned | vs random (fine-tuned) | scoring s |",
             "|---|---|---|---|---|---|---|---|"]
    rm = summary["accuracy_finetuned"]["random_mean"]
    rb = summary["accuracy_bn_recalibrated"]["random_mean"]
    sort_key = "accuracy_finetuned" if tuned else "accuracy_bn_recalibrated"
    for r in sorted(rows, key=lambda r: -r[sort_key]):
        name = r["criterion"] + (f" (seed {r['seed']})" if r["criterion"] == "random" else "")
        dbn = f"{100 * (r['accuracy_bn_recalibrated'] - rb):+.2f} pp" if rb is not None else "-"
        if r["accuracy_finetuned"] is None:
            ft = delta = "-"
        else:
            ft = f"{100 * r['accuracy_finetuned']:.2f} %"
            delta = f"{100 * (r['accuracy_finetuned'] - rm):+.2f} pp" if rm is not None else "-"
        lines.append(f"| {name} | {r['flops_ratio']:.3f} | {100 * r['accuracy_oneshot']:.2f} % | "
                     f"{100 * r['accuracy_bn_recalibrated']:.2f} % | {dbn} | {ft} | {delta} | {r['score_seconds']:.1f} |")
    if rnd:
        rs = summary["accuracy_bn_recalibrated"]["random_std"]
        lines += ["", f"random over {len(rnd)} seeds: one-shot {100 * summary['accuracy_oneshot']['random_mean']:.2f} "
                  f"± {100 * summary['accuracy_oneshot']['random_std']:.2f} %, BN-recalibrated {100 * rb:.2f} "
                  f"± {100 * rs:.2f} %"
                  + (f", fine-tuned {100 * rm:.2f} ± {100 * summary['accuracy_finetuned']['random_std']:.2f} %." if rm is not None else ".")]
        if len(rnd) > 1:
            clear = [r["criterion"] for r in named if r["accuracy_bn_recalibrated"] > rb + 2 * rs]
            lines += ["", f"Beat random by more than 2 std after BN recalibration (> {100 * (rb + 2 * rs):.2f} %): "
                      + (", ".join(f"**{c}**" for c in clear) if clear else "none") + "."]
    prov = result["provenance"]
    lines += ["", f"Best after BN recalibration: **{result['winner_bn_recalibrated']}**"
              + (f"; best after fine-tuning: **{result['winner']}**." if tuned else "."), "",
              f"{prov['date']}; deploy-prune {prov['tool_version']} ({prov['git_commit']}); torch {prov['torch']}; {prov['cpu']}.", ""]
    write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
