"""Which importance criterion removes the right channels?

Every criterion prunes the same trained model to ``--flops-ratio`` of its FLOPs in one shot
(one uniform keep share for all groups, so only the choice of channels *within* a group
differs), then the model is evaluated with no fine-tuning, after re-estimating the BatchNorm
statistics, and after ``--finetune-epochs`` of fine-tuning (``--finetune-epochs 0`` skips
fine-tuning: fine-tuned accuracies are recorded as null). ``random`` runs with several seeds
to show its spread; each data-driven criterion runs on ``--score-seeds`` different draws of
scoring batches (the criterion's own noise), and only its first draw is fine-tuned.
A criterion beats random *clearly* when its mean over draws is more than 2 std above random's
mean and its worst draw is above random's best seed (after BN recalibration).

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
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--score-seeds", type=int, default=3, help="draws of scoring batches per data-driven criterion")
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

    def score_batches(seed: int) -> list:
        loader = make_loader(data.train, args.batch_size, shuffle=True, seed=seed)
        return [b for i, b in zip(range(args.score_batches), loader, strict=False)]

    runs = [(c, s) for c in args.criteria.split(",") if c != "random"
            for s in range(args.score_seeds if CRITERIA.get(c).needs_data else 1)]
    if "random" in args.criteria.split(","):
        runs += [("random", s) for s in range(args.random_seeds)]
    rows = []
    for crit, seed in runs:
        model = copy.deepcopy(base)
        graph = ModelGraph(model, data.input_shape)
        flops0, params0 = graph.flops_params()
        t0 = time.perf_counter()
        scores = score_groups(model, graph, crit, score_batches(seed) if CRITERIA.get(crit).needs_data else [], seed=seed)
        t_score = time.perf_counter() - t0
        plan, share = uniform_for_flops(graph, args.flops_ratio)
        graph.prune_by_scores(plan, scores)
        flops, params = graph.flops_params()
        acc_oneshot = evaluate(model, data.val, device=device)["accuracy"]
        acc_bn = evaluate(recalibrate_bn(model, bn_batches), data.val, device=device)["accuracy"]
        acc_ft = t_ft = None
        if args.finetune_epochs > 0 and (crit == "random" or seed == 0):
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
                        "random_std": statistics.pstdev(vals) if len(vals) > 1 else (0.0 if vals else None),
                        "random_best": max(vals) if vals else None}
    rb, rs, rbest = (summary["accuracy_bn_recalibrated"][k] for k in ("random_mean", "random_std", "random_best"))
    rm = summary["accuracy_finetuned"]["random_mean"]
    tuned = args.finetune_epochs > 0
    per: dict[str, dict] = {}
    for crit in dict.fromkeys(r["criterion"] for r in rows if r["criterion"] != "random"):
        mine = [r for r in rows if r["criterion"] == crit]
        bn = [r["accuracy_bn_recalibrated"] for r in mine]
        ft = [r["accuracy_finetuned"] for r in mine if r["accuracy_finetuned"] is not None]
        per[crit] = {"draws": len(mine), "bn_mean": statistics.fmean(bn), "bn_std": statistics.pstdev(bn) if len(bn) > 1 else 0.0,
                     "bn_min": min(bn), "bn_max": max(bn), "finetuned": ft[0] if ft else None,
                     "score_seconds": statistics.fmean(r["score_seconds"] for r in mine),
                     "flops_ratio": mine[0]["flops_ratio"]}
        per[crit]["beats_random_clearly"] = (rb is not None and len(rnd) > 1 and per[crit]["bn_mean"] > rb + 2 * rs
                                             and per[crit]["bn_min"] > rbest)
    best = max(per, key=lambda c: per[c]["finetuned"]) if per and tuned else None
    best_bn = max(per, key=lambda c: per[c]["bn_mean"]) if per else None
    result = {"benchmark": "criteria_oneshot", "weights": str(args.weights), "data": args.data,
              "flops_ratio": args.flops_ratio, "finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr,
              "score_seeds": args.score_seeds, "score_batches": args.score_batches,
              "train_limit": args.train_limit, "val_limit": args.val_limit, "val_size": len(data.val), "device": device,
              "baseline_accuracy": base_acc, "rows": rows, "criteria": per,
              "random": summary, "winner": best, "winner_bn_recalibrated": best_bn, "provenance": provenance()}
    write_json(args.out.with_suffix(".json"), result)

    lines = ["# One-shot pruning by criterion", "",
             f"Model `{meta.get('model', {}).get('spec', '?')}` from `{args.weights}`, data `{args.data}` "
             f"(val {len(data.val)} samples), baseline val accuracy **{100 * base_acc:.2f} %**.",
             f"Every criterion prunes to {args.flops_ratio:.0%} of the FLOPs in one shot (uniform keep share per group), "
             f"measured raw, after re-estimating BN statistics on {args.bn_batches} training batches (no weight update)"
             + (f", and after {args.finetune_epochs} epoch(s) of fine-tuning at lr {args.finetune_lr}"
                + (f" on {args.train_limit} training samples" if args.train_limit else "") if tuned else ", no fine-tuning")
             + f"; scoring on {args.score_batches} training batches of {args.batch_size}, {args.score_seeds} draws of "
             f"them per data-driven criterion (fine-tuned: the first draw); random over {len(rnd)} seeds; device {device}.", "",
             "| criterion | draws | one-shot + BN recal., mean ± std (min-max) | vs random, in random's std | "
             "beats random clearly | fine-tuned | vs random (fine-tuned) | scoring s |",
             "|---|---|---|---|---|---|---|---|"]
    order = sorted(per, key=lambda c: -per[c]["bn_mean"])
    for c in order:
        p = per[c]
        z = f"{(p['bn_mean'] - rb) / rs:+.1f}" if rb is not None and rs else "-"
        ft = f"{100 * p['finetuned']:.2f} %" if p["finetuned"] is not None else "-"
        dft = f"{100 * (p['finetuned'] - rm):+.2f} pp" if p["finetuned"] is not None and rm is not None else "-"
        lines.append(f"| {c} | {p['draws']} | {100 * p['bn_mean']:.2f} ± {100 * p['bn_std']:.2f} % "
                     f"({100 * p['bn_min']:.2f}-{100 * p['bn_max']:.2f}) | {z} | {'**yes**' if p['beats_random_clearly'] else 'no'} | "
                     f"{ft} | {dft} | {p['score_seconds']:.1f} |")
    if rnd:
        rft = [r["accuracy_finetuned"] for r in rnd if r["accuracy_finetuned"] is not None]
        lines.append(f"| random | {len(rnd)} | {100 * rb:.2f} ± {100 * rs:.2f} % "
                     f"({100 * min(r['accuracy_bn_recalibrated'] for r in rnd):.2f}-{100 * rbest:.2f}) | 0 | - | "
                     + (f"{100 * rm:.2f} ± {100 * summary['accuracy_finetuned']['random_std']:.2f} % ({100 * min(rft):.2f}-{100 * max(rft):.2f})"
                        if rft else "-") + " | - | 0.0 |")
        clear = [c for c in order if per[c]["beats_random_clearly"]]
        lines += ["", "Beat random clearly after BN recalibration (mean > random's mean + 2 std = "
                  f"{100 * (rb + 2 * rs):.2f} %, every draw > random's best {100 * rbest:.2f} %): "
                  + (", ".join(f"**{c}**" for c in clear) if clear else "none") + "."]
        if tuned and rft:
            above = [c for c in order if per[c]["finetuned"] is not None and per[c]["finetuned"] > max(rft)]
            lines += ["", f"After fine-tuning, above random's best seed ({100 * max(rft):.2f} %): "
                      + (", ".join(f"**{c}**" for c in above) if above else "none") + "."]
    lines += ["", "Per run:", "", "| criterion | draw/seed | FLOPs kept | one-shot | one-shot + BN recal. | fine-tuned | scoring s |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        ft = f"{100 * r['accuracy_finetuned']:.2f} %" if r["accuracy_finetuned"] is not None else "-"
        lines.append(f"| {r['criterion']} | {r['seed']} | {r['flops_ratio']:.3f} | {100 * r['accuracy_oneshot']:.2f} % | "
                     f"{100 * r['accuracy_bn_recalibrated']:.2f} % | {ft} | {r['score_seconds']:.1f} |")
    prov = result["provenance"]
    lines += ["", f"Best after BN recalibration (mean over draws): **{result['winner_bn_recalibrated']}**"
              + (f"; best after fine-tuning: **{result['winner']}**." if tuned else "."), "",
              f"{prov['date']}; deploy-prune {prov['tool_version']} ({prov['git_commit']}); torch {prov['torch']}; {prov['cpu']}.", ""]
    write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
