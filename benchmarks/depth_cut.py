"""Does dropping whole residual blocks buy more accuracy per measured millisecond than widths?

Every layer has a fixed cost on the target that no width cut removes (the kernel launch, the
residual add, the per-node dispatch of the runtime), so a latency-aware pruner might do better by
removing blocks outright. This measures it on a model whose identity-shortcut blocks
(``shortcut`` is ``nn.Identity``: the block can become the identity) can go:

1. each such block removed alone: its measured latency (timed interleaved with the baseline) and
   its one-shot test accuracy, before and after re-estimating the BatchNorm statistics;
2. for each budget, the block(s) ``--cut`` removed and then ``compress`` (DeepLSP) to the rest of
   the budget (``budget / ratio of the cut model``) with no fine-tuning of its own, followed by
   the fine-tuning every side of ``peer_comparison.py`` gets (distillation from the *unpruned*
   model);
3. the baseline and every final model timed together, interleaved, in two takes.

Compare with ``peer_comparison.py``'s deploy-prune side at the same budgets (widths alone).

    python benchmarks/depth_cut.py --weights runs/r20-fm5 --data fashion-mnist --target cpu-ort-1t \\
        --budgets 0.5,0.4 --cut layer3.2 --epochs 1 --train-limit 20000 --out benchmarks/results/depth_cut_resnet20
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peer_comparison import finetune
from torch import nn

from deploy_prune.api import compress
from deploy_prune.budget import LatencyRatio
from deploy_prune.data import DataOptions, load_data, make_loader
from deploy_prune.export import onnx_bytes
from deploy_prune.io import atomic_write, provenance, provenance_line, write_json, write_text
from deploy_prune.latency.benchmark import benchmark
from deploy_prune.latency.measure import measurer_for
from deploy_prune.latency.timing import quiet_of
from deploy_prune.models.checkpoint import load_model
from deploy_prune.target import load_target
from deploy_prune.train import evaluate, recalibrate_bn


def identity_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks whose shortcut is the identity: replaced by it, the model still runs."""
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "shortcut", None), nn.Identity)]


def without(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``model`` with the blocks ``names`` replaced by the identity."""
    out = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        out.get_submodule(parent).register_module(child, nn.Identity())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="runs/r20-fm5")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--budgets", default="0.5,0.4")
    ap.add_argument("--cut", default="layer3.2", help="comma-separated blocks removed before compress")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=20000)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--runs", default="runs/bench-depth")
    ap.add_argument("--profiles", default="runs/peer-profiles")
    ap.add_argument("--out", default="benchmarks/results/depth_cut")
    args = ap.parse_args()

    target = load_target(args.target)
    model, meta = load_model(args.weights)
    model.eval()
    data = load_data(args.data, DataOptions(image_size=args.image_size, train_limit=args.train_limit, seed=args.seed))
    test = data.test if data.test is not None else data.val
    example = torch.zeros(1, *data.input_shape)
    bn = [b for _, b in zip(range(16), make_loader(data.train, 128, shuffle=True, seed=1), strict=False)]
    blocks = identity_blocks(model)
    cut = args.cut.split(",")
    unknown = sorted(set(cut) - set(blocks))
    if unknown:
        sys.exit(f"--cut: {', '.join(unknown)} cannot be removed; choose from {', '.join(blocks)}")

    print(f"timing the baseline and {len(blocks)} models with one block removed", flush=True)
    variants = {name: without(model, [name]) for name in blocks}
    stats = measurer_for(target).time({"baseline": onnx_bytes(model, data.input_shape),
                                       **{n: onnx_bytes(m, data.input_shape) for n, m in variants.items()}})
    singles = [{"block": n, "ratio": stats[n].quiet / stats["baseline"].quiet,
                "one_shot": evaluate(m, test)["accuracy"],
                "one_shot_bn": evaluate(recalibrate_bn(copy.deepcopy(m), bn), test)["accuracy"]} for n, m in variants.items()]

    cut_model = without(model, cut)
    r_cut = measurer_for(target).time({"b": onnx_bytes(model, data.input_shape), "c": onnx_bytes(cut_model, data.input_shape)})
    cut_ratio = r_cut["c"].quiet / r_cut["b"].quiet
    rows: list[dict[str, Any]] = []
    runs = Path(args.runs)
    for b in [float(x) for x in args.budgets.split(",")]:
        t0 = time.perf_counter()
        out = runs / f"{'-'.join(cut)}-{int(round(100 * b))}"
        res = compress(cut_model, example, target=target, budget=LatencyRatio(b / cut_ratio), train=data.train,
                       val=data.val, out=out, epochs=0, step_fraction=0.0, lr=args.lr, seed=args.seed,
                       profiles=Path(args.profiles), overwrite=True, progress=lambda m, b=b: print(f"[{b:.0%}] {m}", flush=True))
        pruned = res.model
        finetune(pruned, model, data, args, out / "finetune", meta)
        blob = onnx_bytes(pruned.eval(), data.input_shape)
        atomic_write(out / "final.onnx", lambda p, blob=blob: p.write_bytes(blob))
        rows.append({"budget": b, "cut": cut, "cut_ratio": cut_ratio, "compress_budget": b / cut_ratio,
                     "met_own_check": res.report["met_budget"], "test_accuracy": evaluate(pruned, test)["accuracy"],
                     "onnx": str(out / "final.onnx"), "wall_s": round(time.perf_counter() - t0, 1)})

    base_path = runs / "baseline.onnx"
    blob = onnx_bytes(model, data.input_shape)
    atomic_write(base_path, lambda p: p.write_bytes(blob))
    takes = []
    for _ in range(2):
        timed = benchmark({"baseline": base_path, **{r["onnx"]: r["onnx"] for r in rows}}, [target])
        takes.append({row["model"]: quiet_of(row["latency_ms"]) for row in timed["results"]})
    for r in rows:  # ratios within a take, then averaged (as peer_comparison.py)
        r["ratio"] = sum(t[r["onnx"]] / t[str(base_path)] for t in takes) / len(takes)
        r["meets"] = r["ratio"] <= r["budget"]
    result = {"args": vars(args), "model": (meta.get("model") or {}).get("spec"), "input_shape": list(data.input_shape),
              "baseline": {"test_accuracy": evaluate(model, test)["accuracy"], "latency_ms": takes[0][str(base_path)]},
              "single_blocks": singles, "rows": rows, "provenance": provenance(threads=torch.get_num_threads())}
    out_json = Path(args.out).with_suffix(".json")
    write_json(out_json, result)
    write_text(out_json.with_suffix(".md"), markdown(result))
    print(markdown(result))


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    lines = [f"# Residual blocks removed, then widths: {res['model']} {'x'.join(map(str, res['input_shape']))}", "",
             "`python benchmarks/depth_cut.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items() if v is not None) + "`",
             "", f"Target `{a['target']}`; baseline {res['baseline']['latency_ms']:.3f} ms, "
             f"{100 * res['baseline']['test_accuracy']:.2f} % on the test split.", "",
             "| block removed | latency (of the baseline's) | one shot | one shot, BN re-estimated |", "|---|---|---|---|"]
    lines += [f"| {s['block']} | {s['ratio']:.3f}x | {100 * s['one_shot']:.2f} % | {100 * s['one_shot_bn']:.2f} % |"
              for s in res["single_blocks"]]
    lines += ["", f"{', '.join(res['rows'][0]['cut']) if res['rows'] else ''} removed, then `compress` to the rest of the budget "
              f"and {a['epochs']} epoch(s) of fine-tuning with distillation from the unpruned model:", "",
              "| budget | accuracy | latency (two takes, interleaved) | compress's own check | wall s |", "|---|---|---|---|---|"]
    lines += [f"| {r['budget']:.2f} | {100 * r['test_accuracy']:.2f} % | {r['ratio']:.3f}x{'' if r['meets'] else ' (over)'} | "
              f"{'met' if r['met_own_check'] else 'NOT met'} | {r['wall_s']} |" for r in res["rows"]]
    return "\n".join([*lines, "", provenance_line(res["provenance"]), ""])


if __name__ == "__main__":
    main()
