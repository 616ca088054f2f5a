"""Pruning for the model as it ships: planned on int8 latency vs planned on fp32 and quantized.

For each trained model: ``compress`` to ``--ratio`` of the int8 baseline's latency measured on
``--int8-target`` (the closed loop times the quantized model), and ``compress`` to the same ratio
on ``--fp32-target``. Both pruned models are then quantized the same way (calibrated on the
training data), scored at int8, and timed on the int8 target interleaved with the unpruned
model's int8 artefact: is the int8-planned model faster, or more accurate, as deployed?

    python benchmarks/int8_targets.py --weights runs/r20-fmnist --data fashion-mnist \
        --int8-target cpu-ort-int8-1t --fp32-target cpu-ort-1t --ratio 0.5 --epochs 1

The LUT's fidelity at int8 is ``benchmarks/lut_fidelity.py --targets cpu-ort-int8-1t``.
Writes ``--out`` .json and .md after every model (a cut-off keeps what finished).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from deploy_prune.data import DataOptions, load_data, make_loader
from deploy_prune.errors import BudgetUnreachable
from deploy_prune.export import onnx_bytes
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.latency.measure import measurer_for
from deploy_prune.latency.timing import quiet_of
from deploy_prune.models.checkpoint import load_model
from deploy_prune.pipeline import CompressConfig, compress
from deploy_prune.quantize import DeployedModule, calibration_inputs, deploy_onnx
from deploy_prune.target import load_target
from deploy_prune.train import evaluate


def _compress(args: argparse.Namespace, weights: str, target: str, out: Path, opts: DataOptions) -> dict[str, Any]:
    cfg = CompressConfig(out=out, weights=weights, data=args.data, data_options=opts, target=target,
                         latency_ratio=args.ratio, method=args.method, epochs=args.epochs, step_fraction=args.step_fraction,
                         lr=args.lr, profiles=Path(args.profiles),
                         resume=(out / "checkpoints" / "state.pt").is_file() and not (out / "report.json").is_file(),
                         overwrite=(out / "report.json").is_file())
    return compress(cfg, progress=lambda msg: print(f"[{out.name}] {msg}", flush=True))


def _head_to_head(args: argparse.Namespace, weights: str, runs: dict[str, Path], opts: DataOptions) -> dict[str, Any]:
    """Both pruned models and the unpruned one, quantized alike, timed together on the int8 target."""
    target = load_target(args.int8_target)
    data = load_data(args.data, opts)
    batches = [b for _, b in zip(range(8), make_loader(data.train, 64, shuffle=True, seed=0), strict=False)]
    cal = calibration_inputs(batches, target)
    models = {"unpruned": load_model(weights)[0], **{k: load_model(p / "model.pt")[0] for k, p in runs.items()}}
    shape = tuple(data.input_shape)
    arts = {k: deploy_onnx(onnx_bytes(m, shape, target.batch), target, cal) for k, m in models.items()}
    stats = measurer_for(target).time(arts)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for k, m in models.items():
        out[k] = {"int8_accuracy": evaluate(DeployedModule(arts[k], target), data.val)["accuracy"],
                  "fp32_accuracy": evaluate(m, data.val)["accuracy"],
                  "int8_ms": quiet_of(stats[k].as_dict()), "int8_median_ms": stats[k].median,
                  "ratio_to_unpruned": quiet_of(stats[k].as_dict()) / quiet_of(stats["unpruned"].as_dict())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="runs/r20-fmnist", help="comma-separated trained runs")
    ap.add_argument("--image-size", default="", help="comma-separated, one per run (blank: the dataset's own)")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--int8-target", default="cpu-ort-int8-1t")
    ap.add_argument("--fp32-target", default="cpu-ort-1t")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--method", default="deeplsp")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--step-fraction", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--runs", default="runs/bench-int8")
    ap.add_argument("--profiles", default="runs/bench-int8-profiles")
    ap.add_argument("--out", default="benchmarks/results/int8_targets")
    args = ap.parse_args()
    sizes = [s for s in args.image_size.split(",")] if args.image_size else []
    rows: list[dict[str, Any]] = []
    for i, weights in enumerate(args.weights.split(",")):
        size = int(sizes[i]) if i < len(sizes) and sizes[i] else None
        opts = DataOptions(image_size=size, train_limit=args.train_limit)
        name = Path(weights).name
        row: dict[str, Any] = {"weights": weights, "image_size": size}
        runs = {}
        for key, target in (("int8_planned", args.int8_target), ("fp32_planned", args.fp32_target)):
            out = Path(args.runs) / f"{name}-{key}"
            t0 = time.perf_counter()
            try:
                rep = _compress(args, weights, target, out, opts)
            except BudgetUnreachable as e:
                print(f"[{out.name}] unreachable: {e}", flush=True)
                row[key] = {"unreachable": str(e)}
                continue
            runs[key] = out
            row[key] = {"target": target, "met_budget": rep["met_budget"], "budget_note": rep["budget_note"],
                        "baseline": rep["baseline"], "final": rep["final"], "wall_s": round(time.perf_counter() - t0, 1),
                        "widths": {la["group"]: la["channels_after"] for la in rep["layers"]}}
        if runs:
            row["head_to_head"] = _head_to_head(args, weights, runs, opts)
        rows.append(row)
        _write(args, rows)


def _write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    res = {"config": vars(args), "rows": rows, "provenance": provenance(target=args.int8_target)}
    write_json(Path(args.out + ".json"), res)
    write_text(Path(args.out + ".md"), markdown(res))


def markdown(res: dict[str, Any]) -> str:
    c = res["config"]
    cmd = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in c.items() if v not in (None, ""))
    lines = [f"# Planned on int8 latency vs planned on fp32, both deployed at int8 ({c['int8_target']})", "",
             f"`python benchmarks/int8_targets.py {cmd}`", ""]
    for r in res["rows"]:
        lines += [f"## {r['weights']}", ""]
        for key in ("int8_planned", "fp32_planned"):
            x = r.get(key, {})
            if "unreachable" in x:
                lines.append(f"- {key}: unreachable: {x['unreachable']}")
            elif x:
                lines.append(f"- {key} on {x['target']}: {'MET' if x['met_budget'] else 'NOT MET'} ({x['budget_note']}); "
                             f"{x['wall_s']:.0f} s")
        h = r.get("head_to_head")
        if h:
            lines += ["", f"Deployed at int8 on {c['int8_target']}, timed together:", "",
                      "| model | fp32 accuracy % | int8 accuracy % | int8 latency ms (quiet) | ratio to unpruned |",
                      "|---|---|---|---|---|"]
            for k, v in h.items():
                lines.append(f"| {k} | {100 * v['fp32_accuracy']:.2f} | {100 * v['int8_accuracy']:.2f} | "
                             f"{v['int8_ms']:.3f} | {v['ratio_to_unpruned']:.3f} |")
        wi, wf = (r.get("int8_planned") or {}).get("widths"), (r.get("fp32_planned") or {}).get("widths")
        if wi and wf:
            lines += ["", "| group | int8-planned | fp32-planned |", "|---|---|---|"]
            lines += [f"| {g} | {wi[g]} | {wf.get(g, '')} |" for g in wi]
        lines.append("")
    lines.append(provenance_line(res["provenance"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
