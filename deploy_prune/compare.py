"""``deploy-prune compare``: several methods on one model, data and target, measured the same way.

Each method runs the compress pipeline in its own process (one failure, divergence or crash does
not sink the others; its row says why, from the structured result the worker sends back: the
error's kind, message and exit code) with the same fine-tuning budget (epochs, learning rate,
distillation, seed) and shared profiles. A method gets the first of the given budgets it can
honour, so ``--latency-ratio 0.5 --sparsity 0.5`` serves structured and unstructured methods
in one leaderboard. Afterwards every compressed model and the baseline are measured again
*together*, interleaved on the target, so their latencies share one session's conditions.

Writes ``OUT/leaderboard.json``, ``leaderboard.md`` and ``leaderboard.png`` (accuracy against
measured latency); each method's run directory is ``OUT/<method>/``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy_prune import DEFAULT_TARGET
from deploy_prune.errors import UserError
from deploy_prune.io import ensure_dir, provenance, read_json, write_json, write_text

BUDGET_FLAGS = ("latency_ms", "latency_ratio", "flops_ratio", "params_ratio", "sparsity")


@dataclass
class CompareConfig:
    methods: list[str]
    out: Path
    weights: str
    budgets: dict[str, float]  # budget kind -> value; each method takes the first it honours
    target: str = DEFAULT_TARGET
    data: str = "digits"
    settings: dict[str, Any] = field(default_factory=dict)  # CompressConfig settings, the same for every method
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> its own settings
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


def _worker(cfg: Any, conn: Any) -> None:
    """One method's compress run in its own process; sends back what happened, never raises."""
    from deploy_prune.pipeline import compress

    try:
        rep = compress(cfg)
        conn.send({"exit_code": 0 if rep["met_budget"] else 1, "error": None})
    except UserError as e:
        conn.send({"exit_code": e.exit_code, "error": str(e), "error_kind": type(e).__name__})
    except BaseException as e:  # a crash in one method is that method's result, not the leaderboard's
        conn.send({"exit_code": 1, "error": f"{type(e).__name__}: {e}", "error_kind": "crash"})
    finally:
        conn.close()


def _run_method(cfg: Any, timeout_s: float | None) -> dict[str, Any]:
    """``_worker`` in a fresh (spawned) process; its answer, or what became of the process."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch or OpenMP state inherited
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(cfg, child), daemon=True)
    proc.start()
    child.close()
    try:
        if parent.poll(timeout_s):
            return dict(parent.recv())
        if proc.is_alive():
            return {"exit_code": -1, "error": f"timed out after {timeout_s:.0f} s", "error_kind": "timeout"}
        return {"exit_code": proc.exitcode, "error": f"the worker died (exit code {proc.exitcode})", "error_kind": "crash"}
    except EOFError:  # the process ended without answering (killed, out of memory)
        proc.join(5)
        return {"exit_code": proc.exitcode, "error": f"the worker died (exit code {proc.exitcode})", "error_kind": "crash"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)


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
        t0 = time.perf_counter()
        if (run_dir / "report.json").is_file():
            rc, err = 0, ""  # finished in an earlier, interrupted compare
        else:
            try:
                run_cfg = _method_config(cfg, method, kind, value, run_dir)
            except UserError as e:  # a setting this method cannot take: its row says so
                rc, err = e.exit_code, str(e)
            else:
                got = _run_method(run_cfg, cfg.timeout_s)
                rc, err = int(got["exit_code"] if got["exit_code"] is not None else 1), got.get("error") or ""
        rows.append(_row(method, run_dir, rc, err, time.perf_counter() - t0))
    _measure_together(cfg, rows)
    board = {"config": {k: _plain(v) for k, v in cfg.__dict__.items()}, "rows": rows,
             "provenance": provenance(target=cfg.target)}
    write_json(out / "leaderboard.json", board)
    write_text(out / "leaderboard.md", markdown(board))
    plot(board, out / "leaderboard.png")
    return board


def _plain(v: Any) -> Any:
    """A config value as JSON: paths as strings, dataclasses (DataOptions) as dicts."""
    if isinstance(v, Path):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _plain(dataclasses.asdict(v))
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _method_config(cfg: CompareConfig, method: str, kind: str, value: float, run_dir: Path) -> Any:
    """The compress settings of one method's run (resumed where an interrupted compare left it)."""
    from deploy_prune.pipeline import CompressConfig

    resume = (run_dir / "checkpoints" / "state.pt").is_file()
    given: dict[str, Any] = {kind: value, **cfg.settings}
    return CompressConfig(out=run_dir, weights=cfg.weights, data=cfg.data, target=cfg.target, method=method,
                          method_options=dict(cfg.options.get(method, {})), resume=resume, **given)


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
             f"same fine-tuning for all ({', '.join(f'{k} {v}' for k, v in c['settings'].items()) or 'compress defaults'}). "
             "Latency: every result and the baseline "
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
