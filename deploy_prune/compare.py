"""``deploy-prune compare``: several methods on one model, data and target, measured the same way.

Each method runs ``deploy-prune compress`` in its own process (one failure or divergence does not
sink the others; its row says why) with the same fine-tuning budget (epochs, learning rate,
distillation, seed) and shared profiles. A method gets the first of the given budgets it can
honour, so ``--latency-ratio 0.5 --sparsity 0.5`` serves structured and unstructured methods
in one leaderboard. Afterwards every compressed model and the baseline are measured again
*together*, interleaved on the target, so their latencies share one session's conditions.

Writes ``OUT/leaderboard.json``, ``leaderboard.md`` and ``leaderboard.png`` (accuracy against
measured latency); each method's run directory is ``OUT/<method>/``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy_prune.errors import UserError
from deploy_prune.io import ensure_dir, provenance, read_json, write_json, write_text

BUDGET_FLAGS = ("latency_ms", "latency_ratio", "flops_ratio", "params_ratio", "sparsity")


@dataclass
class CompareConfig:
    methods: list[str]
    out: Path
    weights: str
    budgets: dict[str, float]  # budget kind -> value; each method takes the first it honours
    target: str = "cpu-ort-1t"
    data: str = "digits"
    extra: list[str] = field(default_factory=list)  # further compress flags, the same for every method
    options: dict[str, list[str]] = field(default_factory=dict)  # method -> ["KEY=VALUE", ...]
    timeout_s: float | None = None


def parse_method_options(items: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
    """``METHOD:KEY=VALUE`` pairs, per method."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, colon, kv = item.partition(":")
        if not colon or name not in methods or "=" not in kv:
            raise UserError(f"-O {item!r} must be METHOD:KEY=VALUE with METHOD one of {', '.join(methods)} "
                            "(e.g. -O sap:iterations=15)")
        out.setdefault(name, []).append(kv)
    return out


def _cls(method: str) -> Any:
    from deploy_prune.methods import METHODS

    return METHODS.get(method)


def pick_budget(method: str, budgets: dict[str, float]) -> tuple[str, float] | None:
    kinds = _cls(method).budget_kinds
    return next(((k, v) for k, v in budgets.items() if k in kinds), None)


def _row(method: str, run_dir: Path, rc: int, err: str, wall: float) -> dict[str, Any]:
    cls = _cls(method)
    row: dict[str, Any] = {"method": method, "kind": cls.kind, "lowers_latency": cls.lowers_latency, "run_dir": str(run_dir),
                           "wall_s": round(wall, 1)}
    rep_path = run_dir / "report.json"
    if rc not in (0, 1) or not rep_path.is_file():  # 1 = finished but over a latency budget: still a result
        return {**row, "status": "failed", "reason": err or f"exit code {rc}"}
    rep = read_json(rep_path)
    f, b = rep["final"], rep["baseline"]
    return {**row, "status": "ok", "budget": rep["budget"], "met_budget": rep["met_budget"], "accuracy": f["accuracy"],
            "baseline_accuracy": b["accuracy"], "sparsity": f["sparsity"], "flops": f["flops"], "params": f["params"],
            "flops_ratio": f["flops"] / b["flops"], "params_ratio": f["params"] / b["params"],
            "train_s": rep["stage_seconds"].get("finetune", 0.0), "total_s": rep["stage_seconds"].get("total"),
            "onnx": str(run_dir / "model.onnx")}


def compare(cfg: CompareConfig, on_method: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run every method, measure the results together, write the leaderboard; returns it."""
    for m in cfg.methods:
        _cls(m)  # unknown names fail before anything runs
    if not cfg.budgets:
        raise UserError("give at least one budget (--latency-ratio, --flops-ratio, --sparsity, ...)")
    out = ensure_dir(cfg.out)
    rows: list[dict[str, Any]] = []
    for i, method in enumerate(cfg.methods):
        if on_method:
            on_method(method, i, len(cfg.methods))
        picked = pick_budget(method, cfg.budgets)
        if picked is None:
            kinds = ", ".join("--" + k.replace("_", "-") for k in _cls(method).budget_kinds)
            rows.append({"method": method, "kind": _cls(method).kind, "status": "failed",
                         "reason": f"takes none of the given budgets; it takes {kinds}"})
            continue
        kind, value = picked
        run_dir = out / method
        argv = [sys.executable, "-m", "deploy_prune", "compress", "--weights", cfg.weights, "--data", cfg.data,
                "--target", cfg.target, "--method", method, f"--{kind.replace('_', '-')}", str(value), "--out", str(run_dir),
                *cfg.extra]
        for kv in cfg.options.get(method, []):
            argv += ["-O", kv]
        if (run_dir / "checkpoints" / "state.pt").is_file() and not (run_dir / "report.json").is_file():
            argv.append("--resume")  # an interrupted compare continues where each method stopped
        t0 = time.perf_counter()
        if (run_dir / "report.json").is_file():
            rc, err = 0, ""  # finished in an earlier, interrupted compare
        else:
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=cfg.timeout_s)
                rc = proc.returncode
                lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
                err = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
            except subprocess.TimeoutExpired:
                rc, err = -1, f"timed out after {cfg.timeout_s:.0f} s"
        rows.append(_row(method, run_dir, rc, err.removeprefix("error: ").strip(), time.perf_counter() - t0))
    _measure_together(cfg, rows)
    board = {"config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()}}, "rows": rows,
             "provenance": provenance(target=cfg.target)}
    write_json(out / "leaderboard.json", board)
    write_text(out / "leaderboard.md", markdown(board))
    plot(board, out / "leaderboard.png")
    return board


def _measure_together(cfg: CompareConfig, rows: list[dict[str, Any]]) -> None:
    """The baseline and every result, timed interleaved in one session on the target."""
    from deploy_prune.export import onnx_bytes
    from deploy_prune.io import atomic_write
    from deploy_prune.latency.benchmark import benchmark
    from deploy_prune.models.checkpoint import load_model
    from deploy_prune.target import load_target

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    model, meta = load_model(cfg.weights)
    blob = onnx_bytes(model.eval(), tuple(meta["input_shape"]))
    base = cfg.out / "baseline.onnx"
    atomic_write(base, lambda p: p.write_bytes(blob))
    res = benchmark({"baseline": base, **{r["method"]: r["onnx"] for r in ok}}, [load_target(cfg.target)])
    by_model = {r["model"]: r["latency_ms"] for r in res["results"]}
    base_ms = by_model[str(base)]["median"]
    for r in ok:
        lat = by_model[r["onnx"]]
        r["latency_ms"] = {"median": lat["median"], "p90": lat["p90"], "round_cv": lat["round_cv"]}
        r["baseline_ms"] = base_ms
        r["speedup"] = base_ms / lat["median"]


def markdown(board: dict[str, Any]) -> str:
    c = board["config"]
    budgets = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in c["budgets"].items())
    lines = [f"# Method leaderboard on {c['target']}", "",
             f"Weights `{c['weights']}`, data `{c['data']}`, budgets {budgets} (each method takes the first it honours), "
             f"same fine-tuning for all ({' '.join(c['extra']) or 'compress defaults'}). Latency: every result and the baseline "
             "re-measured together, interleaved, in one session.", "",
             "| method | kind | status | accuracy | sparsity | FLOPs kept | params kept | latency ms (p90) | speed-up | "
             "budget met | train s | total s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = sorted((r for r in board["rows"] if r["status"] == "ok"), key=lambda r: -r["accuracy"])
    for r in ok:
        lat = r.get("latency_ms") or {}
        lines.append(f"| {r['method']} | {r['kind']} | ok | {100 * r['accuracy']:.2f} % | {100 * r['sparsity']:.1f} % | "
                     f"{r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | {lat.get('median', float('nan')):.3f} "
                     f"({lat.get('p90', float('nan')):.3f}) | {r.get('speedup', float('nan')):.2f}x{'' if r['lowers_latency'] else ' †'} | "
                     f"{'yes' if r['met_budget'] else 'NO'} ({r['budget']['kind'].replace('_', '-')}) | {r['train_s']:.0f} | "
                     f"{r['total_s']:.0f} |")
    for r in board["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r.get('kind', '')} | FAILED: {r['reason']} | | | | | | | | | |")
    base = next((r for r in ok), None)
    if base:
        lines += ["", f"Baseline: {100 * base['baseline_accuracy']:.2f} %, {base['baseline_ms']:.3f} ms (same session)."]
    if any(not r["lowers_latency"] for r in ok):
        lines += ["", "† The method does not lower dense latency: its model runs the baseline's dense graph, so the spread of "
                  "these speed-ups around 1.00x is the measurement noise of this session."]
    p = board["provenance"]
    lines += ["", f"{p['date']}; deploy-prune {p['tool_version']} ({p['git_commit']}); {p['cpu']}.", ""]
    return "\n".join(lines)


def plot(board: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deploy_prune.io import atomic_write

    ok = [r for r in board["rows"] if r["status"] == "ok" and r.get("latency_ms")]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in ok:
        ax.scatter(r["latency_ms"]["median"], 100 * r["accuracy"], marker="o" if r["lowers_latency"] else "x")
        ax.annotate(r["method"], (r["latency_ms"]["median"], 100 * r["accuracy"]), fontsize=8, xytext=(3, 3),
                    textcoords="offset points")
    ax.axvline(ok[0]["baseline_ms"], color="grey", ls="--", lw=0.8)
    ax.axhline(100 * ok[0]["baseline_accuracy"], color="grey", ls="--", lw=0.8)
    ax.set_xlabel(f"measured latency on {board['config']['target']} (ms, median)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("methods: accuracy vs measured latency (x: unstructured, dense latency)")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path
