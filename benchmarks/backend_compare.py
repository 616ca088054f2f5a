"""Does the best pruning decision depend on the backend?

The same trained model is compressed with DeepLSP to the same share of its measured latency on
each target (same sensitivity file, same fine-tuning), then the baseline and every compressed
model are measured on every target, interleaved per target. If a model pruned for backend A is
relatively slower on B than the one pruned for B (or the widths differ), the decision differs.

    python benchmarks/backend_compare.py --weights runs/r20-fmnist --data fashion-mnist \
        --targets cpu-ort-1t,cpu-openvino-1t --latency-ratio 0.5 --epochs 1 --train-limit 20000

Writes benchmarks/results/backend_compare.json and .md; runs under --runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from deploy_prune.data import DataOptions
from deploy_prune.export import onnx_bytes
from deploy_prune.io import atomic_write, provenance, provenance_line, write_json, write_text
from deploy_prune.latency.benchmark import benchmark
from deploy_prune.models.checkpoint import load_model
from deploy_prune.pipeline import CompressConfig, compress
from deploy_prune.target import load_target

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="runs/r20-fmnist")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--targets", default="cpu-ort-1t,cpu-openvino-1t")
    ap.add_argument("--latency-ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-backends"))
    ap.add_argument("--profiles", type=Path, default=Path("runs/bench-backends/profiles"))
    ap.add_argument("--out", type=Path, default=RESULTS / "backend_compare")
    args = ap.parse_args(argv)
    targets = args.targets.split(",")

    runs: dict[str, dict] = {}
    sensitivity = None
    for t in targets:
        out = args.runs / f"for-{t}"
        t0 = time.perf_counter()
        cfg = CompressConfig(out=out, weights=args.weights, data=args.data, data_options=DataOptions(train_limit=args.train_limit),
                             target=t, latency_ratio=args.latency_ratio, method="deeplsp", epochs=args.epochs, lr=args.lr,
                             profiles=args.profiles, sensitivity=sensitivity, resume=(out / "checkpoints").is_dir())
        rep = compress(cfg, progress=lambda msg, t=t: print(f"[{t}] {msg}", flush=True))
        sensitivity = sensitivity or str(out / "sensitivity.json")  # accuracy-based: the same for every target
        runs[t] = {"report": rep, "onnx": str(out / "model.onnx"), "wall_s": round(time.perf_counter() - t0, 1)}

    model, meta = load_model(args.weights)
    shape = tuple(meta["input_shape"])
    base_onnx = args.runs / "baseline.onnx"
    blob = onnx_bytes(model.eval(), shape)
    atomic_write(base_onnx, lambda p: p.write_bytes(blob))
    models = {"baseline": base_onnx, **{f"pruned-for-{t}": runs[t]["onnx"] for t in targets}}
    res = benchmark(models, [load_target(t) for t in targets])
    ms = {(r["model"], r["target"]): r["latency_ms"]["median"] for r in res["results"]}
    paths = {k: str(v) for k, v in models.items()}

    rows = []
    for label, path in paths.items():
        rep = runs[label.removeprefix("pruned-for-")]["report"] if label != "baseline" else None
        row = {"model": label, "accuracy": rep["final"]["accuracy"] if rep else runs[targets[0]]["report"]["baseline"]["accuracy"],
               "flops": rep["final"]["flops"] if rep else runs[targets[0]]["report"]["baseline"]["flops"],
               "met_budget_on_own_target": rep["met_budget"] if rep else None}
        for t in targets:
            row[f"{t}_ms"] = ms[(path, t)]
            row[f"{t}_ratio"] = ms[(path, t)] / ms[(paths["baseline"], t)]
        rows.append(row)
    widths = {t: {w["group"]: w["channels_after"] for w in runs[t]["report"]["layers"]} for t in targets}
    a, b = targets[0], targets[-1]
    differ = sorted(g for g in widths[a] if widths[a][g] != widths[b].get(g))
    verdict = {}
    for t in targets:  # on each target: is the model pruned for it the faster of the pruned ones?
        own = ms[(paths[f"pruned-for-{t}"], t)]
        others = {o: ms[(paths[f"pruned-for-{o}"], t)] for o in targets if o != t}
        verdict[t] = {"own_ms": own, "others_ms": others, "own_is_fastest": all(own <= v for v in others.values())}
    result = {"benchmark": "backend_compare", "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "widths": widths, "groups_with_different_widths": differ, "verdict": verdict,
              "runs": {t: {"wall_s": r["wall_s"], "run_dir": str(args.runs / f"for-{t}"), "budget_note": r["report"]["budget_note"]}
                       for t, r in runs.items()},
              "measurement": res, "provenance": provenance()}
    write_json(args.out.with_suffix(".json"), result)
    write_text(args.out.with_suffix(".md"), markdown(result, targets))
    print(markdown(result, targets))
    return 0


def markdown(res: dict, targets: list[str]) -> str:
    c = res["config"]
    head = " | ".join(f"{t} ms (× baseline)" for t in targets)
    lines = [f"# The same model pruned to {float(c['latency_ratio']):.0%} of its measured latency on each backend", "",
             f"`python benchmarks/backend_compare.py --weights {c['weights']} --data {c['data']} --targets {c['targets']} "
             f"--latency-ratio {c['latency_ratio']} --epochs {c['epochs']}" + (f" --train-limit {c['train_limit']}" if c["train_limit"] != "None" else "")
             + "`", "", "DeepLSP, one sensitivity file for both runs, the same fine-tuning; every model then measured on every "
             "target (interleaved per target, in one session).", "",
             f"| model | accuracy | FLOPs | {head} |", "|---|---|---|" + "---|" * len(targets)]
    for r in res["rows"]:
        cells = " | ".join(f"{r[f'{t}_ms']:.3f} ({r[f'{t}_ratio']:.3f})" for t in targets)
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.2f} % | {r['flops'] / 1e6:.2f} M | {cells} |")
    lines += ["", f"Groups whose kept width differs between the two plans: {len(res['groups_with_different_widths'])} "
              f"of {len(next(iter(res['widths'].values())))}"
              + (f" ({', '.join(res['groups_with_different_widths'])})." if res["groups_with_different_widths"] else "."), ""]
    for t, v in res["verdict"].items():
        lines.append(f"- On {t}, the model pruned for it is {'the fastest' if v['own_is_fastest'] else 'NOT the fastest'} "
                     f"of the pruned ones ({v['own_ms']:.3f} ms vs " + ", ".join(f"{o}: {m:.3f} ms" for o, m in v["others_ms"].items()) + ").")
    lines += [""] + [f"- run for {t}: {r['budget_note']} ({r['wall_s']:.0f} s)" for t, r in res["runs"].items()]
    lines += ["", provenance_line(res["provenance"]) + " One seed.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
