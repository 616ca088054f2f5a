"""What the BatchNorm running averages cost a short fine-tuning of a deeply pruned model.

The built-in training loop re-estimates BatchNorm statistics after every epoch ("precise BN",
``train.precise_bn``). This measures why: plans from a ``subnet_choice.py`` result (the same
ResNet-20 cut to the same predicted latency in different ways) are fine-tuned for ``--epochs``
with the re-estimation switched off (``bn_batches=0``) under several seeds, and each fine-tuned
model is scored on the test split twice: on the running averages training left, and after
re-estimating the statistics on 16 training batches (no weight update).

    python benchmarks/precise_bn.py --plans-from benchmarks/results/subnet_choice_rank_resnet20_40.json \\
        --plans 5,6 --seeds 1,2 --out benchmarks/results/precise_bn_resnet20_40
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peer_comparison import finetune

from deploy_prune.data import DataOptions, make_loader
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.models.checkpoint import load_model
from deploy_prune.pipeline import CompressConfig
from deploy_prune.pipeline.planner import Planner
from deploy_prune.pipeline.run import UserParts
from deploy_prune.train import evaluate, recalibrate_bn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans-from", required=True, help="a subnet_choice.py result JSON")
    ap.add_argument("--plans", default="1", help="comma-separated plan numbers of that file")
    ap.add_argument("--seeds", default="1,2", help="fine-tuning seeds")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default="benchmarks/results/precise_bn")
    args = ap.parse_args()

    study = json.loads(Path(args.plans_from).read_text())
    a = study["args"]
    work = Path(tempfile.mkdtemp(prefix="precise-bn-"))
    cfg = CompressConfig(out=work / "run", weights=a["weights"], data=a["data"], target=a["target"],
                         data_options=DataOptions(image_size=a["image_size"], train_limit=a["train_limit"], seed=a["seed"]),
                         latency_ratio=a["ratio"], method="halp", epochs=args.epochs, lr=args.lr, seed=a["seed"],
                         profiles=Path(a["profiles"]))
    planner = Planner(cfg, UserParts(), progress=lambda m: print(m, flush=True))
    data = planner.run.data
    test = data.test if data.test is not None else data.val
    teacher, meta = load_model(a["weights"])
    bn = [b for _, b in zip(range(16), make_loader(data.train, 128, shuffle=True, seed=1), strict=False)]
    rows: list[dict[str, Any]] = []
    for plan in [int(p) for p in args.plans.split(",")]:
        widths = study["rows"][plan - 1]["widths"]
        for seed in [int(s) for s in args.seeds.split(",")]:
            model = planner.apply(widths)
            ft = argparse.Namespace(epochs=args.epochs, lr=args.lr, seed=seed, bn_batches=0)
            finetune(model, teacher, data, ft, work / f"ft{plan}-{seed}", dict(meta))
            running = float(evaluate(model, test)["accuracy"])
            precise = float(evaluate(recalibrate_bn(model, bn), test)["accuracy"])
            rows.append({"plan": plan, "seed": seed, "running_averages": round(running, 5), "re_estimated": round(precise, 5)})
            print(rows[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    res = {"args": vars(args), "study": a, "rows": rows, "provenance": provenance()}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), res)
    write_text(out.with_suffix(".md"), markdown(res))
    print(markdown(res))


def markdown(res: dict[str, Any]) -> str:
    a, s = res["args"], res["study"]
    cmd = "python benchmarks/precise_bn.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items())
    lines = [f"# Precise BN: a short fine-tuning scored on its running averages and re-estimated ({Path(s['weights']).name}, "
             f"{s['ratio']} of the measured latency on {s['target']})", "", f"`{cmd}`", "",
             f"Every fine-tuning: {a['epochs']} epoch(s) at lr {a['lr']}, distillation, BatchNorm re-estimation off; "
             "scored on the test split.", "",
             "| plan | seed | on the running averages | statistics re-estimated (16 batches) |", "|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['plan']} | {r['seed']} | {100 * r['running_averages']:.2f} % | {100 * r['re_estimated']:.2f} % |")
    lines += ["", provenance_line(res["provenance"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
