"""DF ablation (Fig. 4a of "A Differentiable Framework for End-to-End Learning of Hybrid Structured Compression"): filter-only vs rank-only vs hybrid at the same FLOPs budgets.

Every run goes through ``compress --method df`` with the same mask-learning epochs and the same
final fine-tuning (KD from the unpruned model), so only ``--df-mode`` differs. The paper's
claim is that the hybrid beats both single modes at every reduction.

The target only matters for the latency columns (FLOPs budgets are exact): its
``channel_multiple`` rounds filters and ranks, so the default ``benchmarks/targets/cpu-ort-1t-any.yaml``
allows any count, as the paper does.

    python benchmarks/df_ablation.py --models resnet20=runs/r20-fmnist --data fashion-mnist \
        --ratios 0.5,0.35 --df-epochs 1 --epochs 2 --out benchmarks/results/df_ablation

``--latency 0.5`` adds the second comparison: DF under a *measured* latency budget against
DeepLSP at the same budget on ``--latency-target`` (the same final fine-tuning), with the FLOPs
each keeps against the speed-up each measures. Its profile is a copy of ``profiles/``' (DF adds
the low-rank tables to it), so the committed profile is not touched.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deploy_prune.data import DataOptions
from deploy_prune.io import provenance, provenance_line, write_json, write_text
from deploy_prune.pipeline import CompressConfig, compress

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20=runs/r20-fmnist", help="name=weights,... (trained checkpoints)")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--target", default=str(HERE / "targets" / "cpu-ort-1t-any.yaml"))
    ap.add_argument("--ratios", default="0.5,0.35", help="FLOPs budgets, shares of the baseline MACs")
    ap.add_argument("--modes", default="filters,ranks,hybrid")
    ap.add_argument("--df-epochs", type=float, default=1.0, help="mask/threshold learning epochs")
    ap.add_argument("--epochs", type=int, default=2, help="final fine-tuning epochs (the same for every mode)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--runs", default="runs/bench-df")
    ap.add_argument("--profiles", default="runs/bench-df/profiles")
    ap.add_argument("--latency", type=float, default=None, help="also DF vs DeepLSP at this share of the measured latency")
    ap.add_argument("--latency-target", default="cpu-ort-1t")
    ap.add_argument("--latency-methods", default="df,deeplsp")
    ap.add_argument("--out", default="benchmarks/results/df_ablation")
    args = ap.parse_args()
    if args.latency is None:
        ablation(args)
    else:
        latency_comparison(args)


def ablation(args: argparse.Namespace) -> None:

    models = dict(m.split("=", 1) for m in args.models.split(","))
    rows: list[dict] = []
    out_json = Path(args.out + ".json")
    if out_json.is_file():  # resume a cut-off benchmark: keep the runs already done
        rows = [r for r in json.loads(out_json.read_text())["rows"]]
    done = {(r["model"], r["flops_budget"], r["mode"]) for r in rows}
    for name, weights in models.items():
        for ratio in (float(r) for r in args.ratios.split(",")):
            for mode in args.modes.split(","):
                if (name, ratio, mode) in done:
                    continue
                out = Path(args.runs) / f"{name}-{mode}-{int(round(100 * ratio))}"
                t0 = time.perf_counter()
                cfg = CompressConfig(out=out, weights=weights, data=args.data, data_options=DataOptions(train_limit=args.train_limit),
                                     target=args.target, flops_ratio=ratio, method="df", epochs=args.epochs, lr=args.lr,
                                     profiles=Path(args.profiles),
                                     method_options={"mode": mode, "df_epochs": args.df_epochs},
                                     # an interrupted cell continues; a finished one is measured afresh
                                     resume=(out / "checkpoints" / "state.pt").is_file() and not (out / "report.json").is_file(),
                                     overwrite=(out / "report.json").is_file())
                rep = compress(cfg, progress=lambda msg, n=name, m=mode, r=ratio: print(f"[{n} {m} {r:.0%}] {msg}", flush=True))
                s = rep["method"]["settings"]
                rows.append({
                    "model": name, "mode": mode, "flops_budget": ratio, "met_budget": rep["met_budget"],
                    "baseline_accuracy": rep["baseline"]["accuracy"], "accuracy": rep["final"]["accuracy"],
                    "flops_ratio": rep["final"]["flops"] / rep["baseline"]["flops"],
                    "params_ratio": rep["final"]["params"] / rep["baseline"]["params"],
                    "latency_ratio_same_session": rep["final"]["latency_ms"]["median"] / rep["final"]["baseline_same_session_ms"],
                    "latency_ms": rep["final"]["latency_ms"]["median"], "baseline_ms": rep["final"]["baseline_same_session_ms"],
                    "surrogate_ratio": s.get("surrogate_ratio"), "threshold_shift": s.get("threshold_shift"),
                    "mask_steps": s.get("mask_steps"), "factorized": len(rep["ranks"]),
                    "filters_removed": sum(g["channels_before"] - g["channels_after"] for g in rep["layers"]),
                    "stage_seconds": rep["stage_seconds"], "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(out),
                })
                res = {"config": vars(args), "rows": rows, "provenance": provenance(target=Path(args.target).stem)}
                write_json(out_json, res)  # after every run: a partial result survives a cut-off
                write_text(Path(args.out + ".md"), markdown(res))
                print(json.dumps(rows[-1])[:300], flush=True)


def latency_comparison(args: argparse.Namespace) -> None:
    import shutil

    name, weights = args.models.split(",")[0].split("=", 1)
    prof = Path(args.runs) / "profiles-latency"
    if not prof.exists() and Path("profiles").is_dir():
        shutil.copytree("profiles", prof)
    rows = []
    for method in args.latency_methods.split(","):
        out = Path(args.runs) / f"{name}-{method}-lat{int(round(100 * args.latency))}"
        t0 = time.perf_counter()
        cfg = CompressConfig(out=out, weights=weights, data=args.data, data_options=DataOptions(train_limit=args.train_limit),
                             target=args.latency_target, latency_ratio=args.latency, method=method, epochs=args.epochs,
                             lr=args.lr, profiles=prof, overwrite=(out / "report.json").is_file(),
                             resume=(out / "checkpoints" / "state.pt").is_file() and not (out / "report.json").is_file(),
                             method_options={"df_epochs": args.df_epochs} if method == "df" else {})  # df's own setting
        rep = compress(cfg, progress=lambda msg, m=method: print(f"[{name} {m} latency] {msg}", flush=True))
        f, b = rep["final"], rep["baseline"]
        rows.append({
            "model": name, "method": method, "latency_budget": args.latency, "met_budget": rep["met_budget"],
            "budget_note": rep["budget_note"], "baseline_accuracy": b["accuracy"], "accuracy": f["accuracy"],
            "latency_ms": f["latency_ms"]["median"], "baseline_ms": f["baseline_same_session_ms"],
            "speedup": f["baseline_same_session_ms"] / f["latency_ms"]["median"],
            "flops_ratio": f["flops"] / b["flops"], "flops_reduction_x": b["flops"] / f["flops"],
            "params_ratio": f["params"] / b["params"], "factorized": len(rep["ranks"]), "sparsity": f["sparsity"],
            "steps": [s["stage"] for s in rep["steps"]], "stage_seconds": rep["stage_seconds"],
            "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(out),
        })
        res = {"config": vars(args), "rows": rows, "provenance": provenance(target=args.latency_target)}
        write_json(Path(args.out + "_latency.json"), res)
        write_text(Path(args.out + "_latency.md"), markdown_latency(res))
        print(json.dumps(rows[-1])[:300], flush=True)


def markdown_latency(res: dict) -> str:
    c = res["config"]
    lines = [
        f"# DF (measured-latency budget) vs DeepLSP at {c['latency']:.0%} of the measured latency on {c['latency_target']}",
        "",
        f"`python benchmarks/df_ablation.py --models {c['models']} --data {c['data']} --latency {c['latency']} "
        f"--latency-target {c['latency_target']} --df-epochs {c['df_epochs']} --epochs {c['epochs']} --lr {c['lr']}`"
        + (f" `--train-limit {c['train_limit']}`" if c.get("train_limit") else ""),
        "",
        "| method | met | accuracy % (baseline) | latency ms (baseline, same session) | measured speed-up | FLOPs kept | "
        "FLOPs reduction | params kept | low-rank layers | zeros | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {'yes' if r['met_budget'] else 'NO'} | {100 * r['accuracy']:.2f} ({100 * r['baseline_accuracy']:.2f}) | "
            f"{r['latency_ms']:.3f} ({r['baseline_ms']:.3f}) | {r['speedup']:.2f}x | {r['flops_ratio']:.3f} | "
            f"{r['flops_reduction_x']:.2f}x | {r['params_ratio']:.3f} | {r['factorized']} | {100 * r['sparsity']:.1f} % | {r['wall_s']:.0f} |")
    lines += ["", "Verdicts:", ""] + [f"- {r['method']}: {r['budget_note']}" for r in res["rows"]]
    p = res["provenance"]
    lines += ["", provenance_line(p) + " One seed per cell."]
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    c = res["config"]
    lines = [
        "# DF ablation: filter-only vs rank-only vs hybrid at the same FLOPs budget",
        "",
        f"`python benchmarks/df_ablation.py --models {c['models']} --data {c['data']} --ratios {c['ratios']} "
        f"--df-epochs {c['df_epochs']} --epochs {c['epochs']} --lr {c['lr']}`"
        + (f" `--train-limit {c['train_limit']}`" if c.get("train_limit") else ""),
        "",
        "| model | FLOPs budget | mode | accuracy % (baseline) | FLOPs kept | params kept | latency ratio (same session) "
        "| filters removed | low-rank layers | surrogate at stop | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['model']} | {r['flops_budget']:.0%} | {r['mode']} | {100 * r['accuracy']:.2f} ({100 * r['baseline_accuracy']:.2f}) | "
            f"{r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | {r['latency_ratio_same_session']:.3f} | {r['filters_removed']} | "
            f"{r['factorized']} | {r['surrogate_ratio']} | {r['wall_s']:.0f} |")
    best = {}
    for r in res["rows"]:
        key = (r["model"], r["flops_budget"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    lines += ["", "Best mode per model and budget: "
              + "; ".join(f"{m} {b:.0%}: **{r['mode']}**" for (m, b), r in best.items()), ""]
    p = res["provenance"]
    lines += [provenance_line(p) + " One seed per cell."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
