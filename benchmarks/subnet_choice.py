"""Does the one-shot score of a whole subnet (adaptive BN) rank plans by their accuracy after fine-tuning?

DeepLSP's ``candidates`` setting chooses among several knapsack plans of the same predicted
latency by one number per plan: the validation-subset accuracy of the model cut to it, its
BatchNorm statistics re-estimated, after ``recover_steps`` training steps (``methods.subnet``).
That choice pays only if the number ranks the plans as fine-tuning does. Here every candidate
plan of one budget is cut, scored one-shot (no steps) and with ``--recover-steps``, fine-tuned
the same way (``peer_comparison.finetune``: distillation, ``--epochs``) and scored on the test
split; the output gives the scores per plan, each proxy's Spearman correlation with the
fine-tuned accuracy, and what choosing by it gains over the knapsack's own plan (plan 1).

    python benchmarks/subnet_choice.py --weights runs/r20-fm5 --data fashion-mnist --target cpu-ort-1t \\
        --ratio 0.5 --candidates 8 --epochs 1 --train-limit 20000 --out benchmarks/results/subnet_choice_rank_resnet20_50

The plans share the table's predicted latency; they are not measured (latency is not the
question here). JSON + Markdown under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from peer_comparison import finetune
from scipy.stats import spearmanr

from deploy_prune.data import DataOptions
from deploy_prune.graph import ModelGraph
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.methods.subnet import subnet_metric
from deploy_prune.models.checkpoint import load_model
from deploy_prune.pipeline import CompressConfig
from deploy_prune.pipeline.planner import Planner
from deploy_prune.pipeline.run import UserParts
from deploy_prune.train import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="runs/r20-fm5")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--ratio", type=float, default=0.5, help="the budget, as a share of the measured baseline latency")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--spread", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--profiles", default="runs/peer-profiles")
    ap.add_argument("--bn-batches", type=int, default=16,
                    help="the fine-tuning's precise-BN batches after every epoch (0: the running averages as trained)")
    ap.add_argument("--recover-steps", type=int, default=0,
                    help="also score each plan after this many training steps on the scoring batches (run.recover)")
    ap.add_argument("--finetuned-from", default=None,
                    help="an earlier result JSON of the same plans: reuse its fine-tuned accuracies instead of training")
    ap.add_argument("--out", default="benchmarks/results/subnet_choice_rank")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="subnet-choice-"))
    cfg = CompressConfig(out=work / "run", weights=args.weights, data=args.data, target=args.target,
                         data_options=DataOptions(image_size=args.image_size, train_limit=args.train_limit, seed=args.seed),
                         latency_ratio=args.ratio, method="deeplsp", method_options={"candidates": args.candidates,
                                                                                    "spread": args.spread},
                         epochs=args.epochs, lr=args.lr, seed=args.seed, profiles=Path(args.profiles))
    planner = Planner(cfg, UserParts(), progress=lambda m: print(m, flush=True))
    run, method = planner.run, planner.method
    scores = method._scores(run)
    plans = method.candidate_plans(run, run.state["budget"]["cost_budget"], scores)
    teacher, meta = load_model(args.weights)
    test = run.data.test if run.data.test is not None else run.data.val
    earlier = {json.dumps(r["widths"], sort_keys=True): r["finetuned"]
               for r in (json.loads(Path(args.finetuned_from).read_text())["rows"] if args.finetuned_from else [])}
    rows: list[dict[str, Any]] = []
    for i, (_, widths) in enumerate(plans):
        one_shot = subnet_metric(run, widths, scores)
        model = planner.apply(widths)
        graph = ModelGraph(model, run.data.input_shape)
        row: dict[str, Any] = {"plan": i + 1, "one_shot": round(one_shot, 5)}
        if args.recover_steps:
            row["recovered"] = round(subnet_metric(run, widths, scores, args.recover_steps), 5)
        key = json.dumps(widths, sort_keys=True)
        if key in earlier:
            acc = earlier[key]
        else:
            finetune(model, teacher, run.data, args, work / f"ft{i}", dict(meta))
            acc = float(evaluate(model, test)["accuracy"])
        rows.append({**row, "finetuned": round(acc, 5), "predicted_ms": round(run.cost.total(graph, widths), 5),
                     "flops": graph.flops_params()[0], "widths": widths})
        print(f"plan {i + 1}/{len(plans)}: {row}, fine-tuned {100 * acc:.2f} %", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    ft = np.array([r["finetuned"] for r in rows])
    res: dict[str, Any] = {"args": vars(args), "rows": rows, "best_finetuned": int(np.argmax(ft)) + 1, "proxies": {},
                           "provenance": provenance(threads=run.target.threads)}
    for proxy in ("one_shot", "recovered"):
        if proxy not in rows[0]:
            continue
        x = np.array([r[proxy] for r in rows])
        chosen = int(np.argmax(x))
        res["proxies"][proxy] = {"spearman": float(spearmanr(x, ft)[0]) if len(rows) > 2 else None, "chosen": chosen + 1,
                                 "gain_over_plan_1": float(ft[chosen] - ft[0]), "gain_over_mean": float(ft[chosen] - ft.mean())}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), res)
    write_text(out.with_suffix(".md"), markdown(res))
    print(markdown(res))


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    cmd = ("python benchmarks/subnet_choice.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items() if v is not None))
    rec = "recovered" in res["proxies"]
    lines = [f"# Whole-subnet choice: one-shot score against accuracy after fine-tuning ({Path(a['weights']).name}, "
             f"{a['target']}, {a['ratio']} of the measured latency)", "", f"`{cmd}`", "",
             "| plan | one-shot (adaptive BN, validation subset) |" + (f" after {a['recover_steps']} steps |" if rec else "")
             + " after fine-tuning (test split) | predicted ms | MFLOPs |",
             "|---|---|" + ("---|" if rec else "") + "---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['plan']} | {100 * r['one_shot']:.2f} % |" + (f" {100 * r['recovered']:.2f} % |" if rec else "")
                     + f" {100 * r['finetuned']:.2f} % | {r['predicted_ms']:.3f} | {r['flops'] / 1e6:.2f} |")
    lines.append("")
    for name, p in res["proxies"].items():
        rho = f"{p['spearman']:.3f}" if p["spearman"] is not None else "n/a (too few plans)"
        lines.append(f"- {name.replace('_', '-')}: Spearman with the fine-tuned accuracy {rho}; choosing by it takes plan "
                     f"{p['chosen']}, {100 * p['gain_over_plan_1']:+.2f} points against the knapsack's own plan (plan 1), "
                     f"{100 * p['gain_over_mean']:+.2f} against the mean plan.")
    lines += [f"- The best plan after fine-tuning is plan {res['best_finetuned']}.", "", provenance_line(res["provenance"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
