"""Does the LUT predict what the target measures?

For each model and target: ``deploy-prune profile`` (default grid), then ``--validate N``:
N random pruned variants (half one keep share for all groups, half a share per group, in
[0.2, 1.0]) exported, measured end to end and compared with the raw and calibrated
predictions. Goals: median |error| <= 5 %, >= 90 % of variants within ±10 %, Spearman >= 0.95.

    python benchmarks/lut_fidelity.py --targets cpu-ort-1t,cpu-ort --variants 30

Writes benchmarks/results/lut_fidelity.json and .md; profiles go to --profiles (default a
temporary directory, so the repository's profiles/ is not touched).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from deploy_prune.config import Protocol
from deploy_prune.io import provenance, write_json, write_text
from deploy_prune.latency.profile import ProfileSpec, run_profile
from deploy_prune.models import build_model
from deploy_prune.target import load_target

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {  # name -> (model spec, C,H,W)
    "resnet20@32": ("resnet20", (3, 32, 32)),
    "mobilenet_v2@32": ("mobilenet_v2", (3, 32, 32)),
    "resnet18@224": ("resnet18", (3, 224, 224)),
    "yolov8n@128": ("ultralytics:yolov8n.yaml", (3, 128, 128)),  # ultralytics extra; export form, NMS outside
}
DEFAULT_CASES = "resnet20@32,mobilenet_v2@32,resnet18@224"
GOALS = {"median_abs_error_pct": 5.0, "within_10pct_share": 0.9, "spearman": 0.95}


def meets(v: dict) -> bool:
    return (v["median_abs_error_pct"] <= GOALS["median_abs_error_pct"] and v["within_10pct_share"] >= GOALS["within_10pct_share"]
            and v["spearman"] >= GOALS["spearman"])


def render(rows: list[dict], n_variants: int, prov: dict) -> str:
    """The Markdown table of ``rows`` (``prov``: the run's provenance)."""
    lines = ["# LUT fidelity: predicted vs measured latency of random pruned variants", "",
             f"{n_variants} variants per case (half uniform, half per-group keep shares in [0.2, 1.0]), each exported "
             "and measured end to end with the target's protocol; the calibration is fitted on the full model and 3 uniform and 4 "
             "mixed variants drawn apart from these, so calibrated figures are out of sample. *Calibrated* uses the calibration measured at profile time; "
             "*anchored* scales that prediction by the full model measured with the validation ones / its prediction, "
             "as compress scales its budget by the baseline it measures; "
             "*same session* refits the calibration on the calibration variants re-measured interleaved with the validation ones "
             "(drift = full model at validation / at profile time). *Re-timed*: layer configurations timed again because the "
             "profile's sentinel said the machine was slow or their rounds disagreed by over 10 % (still slow after two passes in brackets). *Entries*: the "
             "layer figure the table predicts from (wall: `net_ms`, counters: `counter_net_ms`; with `layer_timing: auto`, "
             "the one whose calibration fitted the whole-model measurements better: each candidate's relative RMS residual, "
             "→ its calibrated validation median |err| / within ±10 %; *+ weights*: the calibration refitted with the "
             "whole-model weight term, its shape in brackets). "
             f"Goals: median |error| <= {GOALS['median_abs_error_pct']:.0f} %, "
             f">= {GOALS['within_10pct_share']:.0%} within ±10 %, Spearman >= {GOALS['spearman']}.", "",
             "| target | model | configs | re-timed | profile s | entries | full model ms (round CV) | raw: med |err| / ≤10 % / ρ | "
             "calibrated: med |err| / ≤10 % / ρ | anchored | same session | drift | goals met (cal. / anch. / same s.) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def entries(r: dict) -> str:
        ch = r.get("entry_choice")
        by = r.get("calibrated_by_entry_field") or {}
        fits = ", ".join(f"{k} {v['calibration_rms_pct']:.1f} %" + (f" → {by[k]['median_abs_error_pct']:.1f} % / "
                                                                      f"{by[k]['within_10pct_share']:.0%}" if k in by else "")
                         for k, v in ch["candidates"].items()) if ch else ""
        kept = ((r.get("weight_stream") or {}).get("whole_model_fit") or {}).get("kept")
        field = str(r.get("entry_field", "-")) + (f" + weights ({kept})" if kept else "")
        return f"{field} ({fits})" if fits else field

    def cell(v: dict) -> str:
        return f"{v['median_abs_error_pct']:.1f} % / {v['within_10pct_share']:.0%} / {v['spearman']:.3f}"

    def yes(ok: bool) -> str:
        return "yes" if ok else "no"

    for r in rows:
        con = r.get("contention") or {}
        lines.append(f"| {r['target']} ({r['threads']} thr) | {r['case']} | {r['configs_total']} | "
                     f"{con.get('configs_remeasured', 0)} ({con.get('configs_still_contended', 0)}) | "
                     f"{r['profile_seconds_without_validation']} | {entries(r)} | {r['full_model_ms']:.3f} ({100 * r['full_model_round_cv']:.1f} %) | "
                     f"{cell(r['raw'])} | {cell(r['calibrated'])} | {cell(r['anchored'])} | {cell(r['same_session'])} | {r['drift']:.3f} | "
                     f"{yes(r['meets_goals_calibrated'])} / {yes(r['meets_goals_anchored'])} / {yes(r['meets_goals_same_session'])} |")
    lines += ["", "Profile seconds = per-layer entries + whole-model calibration, without the validation runs.",
              f"Whole-model protocol: {rows[0]['model_protocol'] if rows else '-'}; layer protocol: "
              f"{rows[0]['layer_protocol'] if rows else '-'}.", "",
              f"{prov['date']}; deploy-prune {prov['tool_version']} ({prov['git_commit']}); {prov['cpu']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="cpu-ort-1t,cpu-ort")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"of {', '.join(CASES)}")
    ap.add_argument("--variants", type=int, default=30)
    ap.add_argument("--model-repeats", type=int, default=None,
                    help="override the whole-model protocol's repeats (ResNet-18 at 224 takes ~30 ms a run)")
    ap.add_argument("--model-min-time", type=float, default=None, help="override the whole-model protocol's min_time_s")
    ap.add_argument("--profiles", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "lut_fidelity")
    ap.add_argument("--render", type=Path, default=None, help="write the Markdown of a finished run's JSON and stop")
    args = ap.parse_args(argv)
    if args.render is not None:
        d = json.loads(args.render.read_text())
        write_text(args.render.with_suffix(".md"), render(d["rows"], len(d["rows"][0]["variants"]), d["provenance"]))
        return 0
    torch.set_num_threads(1)  # export/pruning work stays off the cores being measured as far as possible

    tmp = tempfile.TemporaryDirectory()
    prof_dir = args.profiles or Path(tmp.name)
    rows = []
    for tname in args.targets.split(","):
        target = load_target(tname)
        if args.model_repeats or args.model_min_time is not None:
            p = target.protocol
            target = replace(target, protocol=Protocol(p.warmup, args.model_repeats or p.repeats, p.rounds,
                                                       p.min_time_s if args.model_min_time is None else args.model_min_time))
        for case in args.cases.split(","):
            spec, shape = CASES[case]
            model = build_model(spec, 10, shape[0])
            t0 = time.perf_counter()
            last = [0.0]

            def progress(stage: str, done: int, total: int, case: str = case, tname: str = tname, t0: float = t0,
                         last: list[float] = last) -> None:
                if time.perf_counter() - last[0] > 20 or done == total:
                    print(f"  [{tname} {case}] {stage} {done}/{total} ({time.perf_counter() - t0:.0f} s)", flush=True)
                    last[0] = time.perf_counter()

            path, prof = run_profile(ProfileSpec(model, spec, shape, target), prof_dir, validate=args.variants, progress=progress)
            val = prof["validation"]
            row = {"target": tname, "case": case, "model": spec, "input_shape": list(shape),
                   "threads": prof["measurer"]["threads"], "configs_total": prof["configs_total"],
                   "configs_measured": prof["configs_measured"], "profile_seconds_without_validation":
                   round(prof["stage_seconds"]["layers"] + prof["stage_seconds"]["calibration"], 1),
                   "stage_seconds": prof["stage_seconds"], "full_model_ms": prof["full_model"]["latency_ms"]["median"],
                   "full_model_round_cv": prof["full_model"]["latency_ms"]["round_cv"], "calibration": prof["calibration"],
                   "raw": val["raw"], "calibrated": val["calibrated"], "anchored": val["calibrated_anchored"],
                   "same_session": val["calibrated_same_session"], "drift": val["drift"], "anchor": val["anchor"],
                   "contention": prof["contention"], "entry_field": prof.get("entry_field", "predict_ms"),
                   "weight_stream": prof.get("weight_stream"),
                   "entry_choice": prof.get("entry_choice"), "calibrated_by_entry_field": val.get("calibrated_by_entry_field"),
                   "meets_goals_raw": meets(val["raw"]),
                   "meets_goals_calibrated": meets(val["calibrated"]), "meets_goals_anchored": meets(val["calibrated_anchored"]),
                   "meets_goals_same_session": meets(val["calibrated_same_session"]), "variants": val["variants"],
                   "model_protocol": prof["protocol"]["model"], "layer_protocol": prof["protocol"]["layer"]}
            rows.append(row)
            c = val["calibrated"]
            print(f"{tname} {case}: {row['configs_total']} configs, profile {row['profile_seconds_without_validation']} s; "
                  f"calibrated median |err| {c['median_abs_error_pct']:.1f} %, within 10 % {c['within_10pct_share']:.0%}, "
                  f"rho {c['spearman']:.3f}; raw {val['raw']['median_abs_error_pct']:.1f} %; anchored "
                  f"{row['anchored']['median_abs_error_pct']:.1f} % / {row['anchored']['within_10pct_share']:.0%}; same session "
                  f"{row['same_session']['median_abs_error_pct']:.1f} % / {row['same_session']['within_10pct_share']:.0%} / "
                  f"{row['same_session']['spearman']:.3f}", flush=True)
            write_json(args.out.with_suffix(".json"), {"benchmark": "lut_fidelity", "goals": GOALS, "rows": rows,
                                                       "provenance": provenance()})

    text = render(rows, args.variants, provenance())
    write_text(args.out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
