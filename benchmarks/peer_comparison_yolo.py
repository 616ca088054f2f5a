"""deploy-prune against Torch-Pruning's YOLOv8 recipe on a YOLOv8n, each at the same measured latency.

The peer is Torch-Pruning's ``examples/yolov8`` recipe: C2f's split rewritten into two convs, L2
group magnitude importance, the Detect head left whole, one global pruning ratio. The rewrite here
is deploy-prune's (``splits.separate_splits``: the same two convs, checked for equal outputs), so
both sides prune the same network. Torch-Pruning does not know latency, so its ratio is scanned and
bisected on latency measured on the target (``peer_comparison.Prober``). deploy-prune runs
``dp.compress`` (``--method``, default deeplsp) to the same budget with ``step_fraction`` 0. Both
then get the same fine-tuning (``examples/detection.py``'s loop, ``--finetune-epochs``). At the end
the baseline and every final model are timed together, interleaved, in ``--final-takes``
measurements, and scored (mAP50-95, mAP50) on a held-out split that neither side saw.

    python benchmarks/peer_comparison_yolo.py --target cpu-ort-1t --budgets 0.6,0.4 --size 128 \\
        --out benchmarks/results/peer_comparison_yolov8n

``--resume`` reuses the trained baseline and the peer's scan in ``--work``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peer_comparison import PEERS, Peer, Prober
from torch import nn

import deploy_prune as dp
from deploy_prune.data import DataOptions, load_data
from deploy_prune.data.shapes import write_shapes
from deploy_prune.export import onnx_bytes
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.latency.measure import measurer_for
from deploy_prune.models.ultralytics import deploy_form, import_ultralytics
from deploy_prune.splits import separate_splits
from deploy_prune.target import load_target
from deploy_prune.train.detect import MeanAP

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "detection.py"


def tp_yolo(model: nn.Module, amount: float, peer: Peer) -> nn.Module:
    """Torch-Pruning's YOLOv8 recipe at one global ratio (module doc)."""
    import torch_pruning as tp
    from ultralytics.nn.modules import Detect

    m = copy.deepcopy(model)
    heads = [x for x in m.modules() if isinstance(x, Detect)]
    tp.pruner.MetaPruner(m, peer.example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=amount, ignored_layers=heads).step()
    return m


PEERS["tp-yolo"] = tp_yolo


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("detection_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--budgets", default="0.6,0.4", help="latency ratios to the unpruned model")
    ap.add_argument("--method", default="deeplsp")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train-images", type=int, default=256)
    ap.add_argument("--val-images", type=int, default=64)
    ap.add_argument("--test-images", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=10, help="training of the unpruned model")
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--refine", type=int, default=3, help="bisection steps after the peer's scan")
    ap.add_argument("--final-takes", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("runs/peer_yolo"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/peer_comparison_yolov8n"))
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    ex = _example()
    args.work.mkdir(parents=True, exist_ok=True)
    target = load_target(args.target)
    shape = (3, args.size, args.size)
    example = torch.zeros(1, *shape)
    opts = DataOptions(image_size=args.size)
    data = load_data(f"yolo:{write_shapes(args.work / 'shapes', args.train_images, args.val_images, args.size, seed=0)}", opts)
    test = load_data(f"yolo:{write_shapes(args.work / 'held_out', 1, args.test_images, args.size, seed=1)}", opts).val

    torch.manual_seed(0)
    base = DetectionModel("yolov8n.yaml", nc=data.num_classes, verbose=False)
    saved = args.work / "base.pt"
    if args.resume and saved.is_file():
        base.load_state_dict(torch.load(saved, weights_only=True))
    else:
        t0 = time.perf_counter()
        ex.train(base, data.train, args.epochs)
        say(f"baseline trained in {time.perf_counter() - t0:.0f} s")
        torch.save(base.state_dict(), saved)

    peer_model = copy.deepcopy(base)
    deploy_form(peer_model)
    separate_splits(peer_model, example)
    prober = Prober("tp-yolo", Peer(peer_model.eval(), example, data, target, args.work), say)

    out_json = args.out.with_suffix(".json")
    rows: list[dict[str, Any]] = []
    finals: dict[str, nn.Module] = {}
    for budget in (float(b) for b in args.budgets.split(",")):
        for side in ("tp-yolo", f"deploy-prune:{args.method}"):
            key = f"{side}@{budget:g}"
            t0 = time.perf_counter()
            if side == "tp-yolo":
                pick = prober.pick(budget, args.refine)
                if not pick["reached"]:
                    rows.append({"budget": budget, "side": side, "reached": False, "floor_ratio": pick["floor_ratio"]})
                    continue
                model, row = pick["model"], {"amount": pick["amount"]}
                searched = time.perf_counter() - t0
                ex.train(model, data.train, args.finetune_epochs)
                row["seconds"] = {"search": round(searched, 1), "finetune": round(time.perf_counter() - t0 - searched, 1)}
            else:
                def finetune(m: nn.Module, epochs: float, ctx: dp.FinetuneContext) -> None:
                    ex.train(m, data.train, epochs, seed=ctx.seed, after_step=ctx.apply_masks)

                res = dp.compress(copy.deepcopy(base), example, target=target, budget=dp.LatencyRatio(budget),
                                  method=args.method, train=data.train, finetune=finetune, evaluate=MeanAP(data.val),
                                  metric="mAP50-95", out=args.work / key.replace(":", "-"), profiles=args.work / "profiles",
                                  epochs=args.finetune_epochs, step_fraction=0, overwrite=True,
                                  progress=lambda msg: say(f"  {msg}"))
                model = res.model
                row = {"met_by_its_own_measurement": res.met_budget, "seconds": res.report["stage_seconds"]}
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            finals[key] = model.eval()
            rows.append({"budget": budget, "side": side, "reached": True, **row})
            say(f"{key}: done in {row['wall_s']:.0f} s")

    # every final model and the baseline, timed together, interleaved; each scored on the held-out split
    base_eval = copy.deepcopy(base)
    deploy_form(base_eval)
    blobs = {"baseline": onnx_bytes(base_eval.eval(), shape), **{k: onnx_bytes(m, shape) for k, m in finals.items()}}
    ratios: dict[str, list[float]] = {k: [] for k in finals}
    ms: dict[str, list[float]] = {k: [] for k in blobs}
    for _ in range(args.final_takes):
        st = measurer_for(target).time(blobs)
        for k in blobs:
            ms[k].append(st[k].quiet)
        for k in finals:
            ratios[k].append(st[k].quiet / st["baseline"].quiet)
    metric = MeanAP(test)
    baseline = {"ms": round(statistics.median(ms["baseline"]), 4), "mAP50-95": round(metric(base_eval), 4),
                "mAP50": round(metric.last["map50"], 4)}
    for row in rows:
        key = f"{row['side']}@{row['budget']:g}"
        if key in finals:
            row["ratio"] = round(statistics.mean(ratios[key]), 4)
            row["ms"] = round(statistics.median(ms[key]), 4)
            row["met"] = row["ratio"] <= row["budget"]
            row["mAP50-95"] = round(metric(finals[key]), 4)
            row["mAP50"] = round(metric.last["map50"], 4)
    res = {"benchmark": "peer_comparison_yolo", "args": {k: str(v) for k, v in vars(args).items()},
           "target": target.name, "baseline": baseline, "rows": rows, "provenance": provenance()}
    write_json(out_json, res)
    write_text(args.out.with_suffix(".md"), markdown(res))
    print(markdown(res))


def markdown(res: dict[str, Any]) -> str:
    b = res["baseline"]
    lines = [f"<!-- {' '.join(sys.argv)} -->", "",
             f"YOLOv8n on generated shapes at {res['args']['size']} px, `{res['target']}`: baseline {b['ms']:.3f} ms, "
             f"mAP50-95 {b['mAP50-95']:.3f}, mAP50 {b['mAP50']:.3f} (held-out split).", "",
             "| budget | side | measured ratio | ms | met | mAP50-95 | mAP50 | TP ratio | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if not r.get("reached"):
            lines.append(f"| {r['budget']:g} | {r['side']} | floor {r['floor_ratio']:.3f} | | not reached | | | | |")
            continue
        lines.append(f"| {r['budget']:g} | {r['side']} | {r['ratio']:.3f} | {r['ms']:.3f} | {'yes' if r['met'] else 'no'} | "
                     f"{r['mAP50-95']:.3f} | {r['mAP50']:.3f} | {r.get('amount', '')} | {r['wall_s']:.0f} |")
    lines += ["", provenance_line(res["provenance"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
