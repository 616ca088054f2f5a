"""deploy-prune against the best-configured peers, each at the same *measured* latency budget.

Peers (``pip install 'deploy-prune[bench]'``):

- ``tp-l1``: Torch-Pruning's ``MagnitudePruner``, L1 magnitude, one pruning ratio for every layer,
  any width (its default).
- ``tp-l1-round``: the same with ``round_to`` = the target's channel block (what a careful user
  sets for a blocked CPU layout).
- ``fastnas``: NVIDIA ModelOpt FastNAS with ``channel_divisor`` 8 (its default 32 leaves CIFAR-style
  ResNets nearly unprunable), score = validation accuracy on 2,000 images.
- ``deploy-prune``: ``compress`` with the method given (``--method``, default deeplsp), or per side
  ``deploy-prune:METHOD:KEY=VALUE...`` (``criterion``, ``amount``, ``steps``, ``step_fraction``, or a
  setting of the method): ``deploy-prune:halp:criterion=fisher``.

Neither peer knows latency, so each one's knob (TP's pruning ratio, FastNAS's FLOPs constraint
as 1 - amount) is searched on latency measured on the target, every candidate timed interleaved
with the baseline: a scan of amounts 0.05-0.90, then a bisection between the first that meets the
budget and the one below, to the least-pruned model at or under the budget. Every side then gets the same
fine-tuning (``train.fit``: ``--epochs``, ``--lr``, distillation from the unpruned model; compress
runs with ``--step-fraction 0`` by default, so its structured steps add none), and at the end the
baseline and every final model are timed together, interleaved, in ``--final-takes`` separate
measurements (each model's ratio to the baseline formed within a take, then averaged), and scored
on the test split. What does not depend on the budget is made once and reused by the later
budgets, as a user would: each peer's scan, and each deploy-prune side's sensitivity analysis.

    python benchmarks/peer_comparison.py --weights runs/r20-fm5 --data fashion-mnist --target cpu-ort-1t \\
        --budgets 0.7,0.5,0.4 --epochs 1 --train-limit 20000 --out benchmarks/results/peer_comparison_resnet20

Rows are written after each run; ``--resume`` keeps the finished rows of an interrupted run.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from deploy_prune.cli import parse_options
from deploy_prune.config import Target
from deploy_prune.data import DataBundle, DataOptions, load_data
from deploy_prune.errors import BudgetUnreachable, UserError
from deploy_prune.export import onnx_bytes
from deploy_prune.graph import ModelGraph
from deploy_prune.io import atomic_write, provenance, provenance_line, write_json, write_text
from deploy_prune.latency.benchmark import benchmark
from deploy_prune.latency.measure import measurer_for
from deploy_prune.latency.timing import quiet_of
from deploy_prune.methods import get_method
from deploy_prune.models.checkpoint import load_model
from deploy_prune.pipeline import CompressConfig, compress
from deploy_prune.target import load_target
from deploy_prune.train import TrainConfig, distillation_loss, evaluate, fit
from deploy_prune.transforms import group_widths

Pruner = Callable[[nn.Module, float, "Peer"], nn.Module]


class Infeasible(Exception):
    """The peer cannot prune this much (FastNAS: the constraint is below its smallest subnet)."""


class Peer:
    """What a peer's pruning function may use: the baseline, its input, data and target."""

    def __init__(self, model: nn.Module, example: torch.Tensor, data: DataBundle, target: Target, work: Path) -> None:
        self.model, self.example, self.data, self.target, self.work = model, example, data, target, work


def _tp(model: nn.Module, amount: float, peer: Peer, round_to: int | None) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model)
    cls = [x for x in m.modules() if isinstance(x, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(m, peer.example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=amount, ignored_layers=[cls], round_to=round_to)
    pruner.step()
    return m


def tp_default(model: nn.Module, amount: float, peer: Peer) -> nn.Module:
    return _tp(model, amount, peer, None)


def tp_round(model: nn.Module, amount: float, peer: Peer) -> nn.Module:
    return _tp(model, amount, peer, peer.target.channel_multiple)


def fastnas(model: nn.Module, amount: float, peer: Peer) -> nn.Module:
    """FastNAS under a FLOPs constraint of ``1 - amount`` of the baseline's. Its per-layer
    sensitivities are computed once and kept in its checkpoint, so later constraints only search."""
    import modelopt.torch.prune as mtp

    g = torch.Generator().manual_seed(0)
    train = peer.data.train
    calib = Subset(train, torch.randperm(len(train), generator=g)[:1024].tolist())  # type: ignore[arg-type]
    val = Subset(peer.data.val, torch.randperm(len(peer.data.val), generator=g)[:2000].tolist())  # type: ignore[arg-type]
    loader = torch.utils.data.DataLoader(calib, batch_size=128)

    def score(m: nn.Module) -> float:
        return float(evaluate(m, val)["accuracy"])

    rules = {"nn.Conv2d": {"*": {"channel_divisor": 8}}, "nn.BatchNorm2d": {"*": {"feature_divisor": 8}},
             "nn.Linear": {"*": {"feature_divisor": 8}}}
    try:
        sub, _ = mtp.prune(copy.deepcopy(model), mode=[("fastnas", rules)], constraints={"flops": f"{100 * (1 - amount):.2f}%"},
                           dummy_input=peer.example, config={"data_loader": loader, "collect_func": lambda b: b[0],
                                                             "score_func": score, "checkpoint": str(peer.work / "fastnas.pth"),
                                                             "verbose": False})
    except ValueError as e:
        if "constraints can be satisfied" in str(e):
            raise Infeasible(str(e)) from None
        raise
    return sub


PEERS: dict[str, Pruner] = {"tp-l1": tp_default, "tp-l1-round": tp_round, "fastnas": fastnas}
# The pruning amounts scanned. Latency is not monotone in them (a width off the CPU's channel
# block can cost more than the channels it saves, and Torch-Pruning leaves a group whole when
# the ratio would keep under one channel), so a plain bisection stops at the first cliff.
GRID = tuple(round(0.05 * i, 2) for i in range(1, 19))


def _ratio(base: bytes, cand: bytes, target: Target) -> tuple[float, float]:
    """Candidate / baseline quiet latency, timed interleaved; and the candidate's quiet ms."""
    st = measurer_for(target).time({"base": base, "cand": cand})
    return st["cand"].quiet / st["base"].quiet, st["cand"].quiet


class Prober:
    """Prunes the baseline by an amount with one peer and measures it against the baseline; the
    scan of ``GRID`` is kept in the run directory, so every budget (and a resumed run) reuses it."""

    def __init__(self, name: str, peer: Peer, say: Callable[[str], None]) -> None:
        self.name, self.peer, self.say = name, peer, say
        self.shape = tuple(peer.example.shape[1:])
        self.base = onnx_bytes(peer.model, self.shape)
        self.path = peer.work / f"{name}-scan.json"

    def probe(self, amount: float) -> tuple[nn.Module, dict[str, Any]]:
        m = PEERS[self.name](self.peer.model, amount, self.peer).eval()
        r, ms = _ratio(self.base, onnx_bytes(m, self.shape), self.peer.target)
        self.say(f"[{self.name}] amount {amount:.3f}: {r:.3f} of the baseline")
        return m, {"amount": round(amount, 4), "ratio": round(r, 4), "ms": round(ms, 4)}

    def scan(self) -> list[dict[str, Any]]:
        points: list[dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else []
        for a in GRID:
            if any(p["amount"] == a for p in points):
                continue
            try:
                points.append(self.probe(a)[1])
            except Infeasible:
                points.append({"amount": a, "infeasible": True})
            write_json(self.path, points)
        return [p for p in points if not p.get("infeasible")]

    def pick(self, budget: float, refine: int) -> dict[str, Any]:
        """The least amount measured at or under ``budget``: the first grid point that meets it,
        then ``refine`` bisection steps between it and the grid point below."""
        points = self.scan()
        ok = [p for p in points if p["ratio"] <= budget]
        if not ok:
            return {"reached": False, "floor_ratio": min(p["ratio"] for p in points), "tried": points}
        hi = min(p["amount"] for p in ok)
        lo = max((p["amount"] for p in points if p["amount"] < hi), default=0.0)
        best, tried = hi, []
        for _ in range(refine):
            mid = (lo + hi) / 2
            _, rec = self.probe(mid)
            tried.append(rec)
            if rec["ratio"] <= budget:
                best = hi = mid
            else:
                lo = mid
        model = PEERS[self.name](self.peer.model, best, self.peer).eval()
        return {"reached": True, "model": model, "amount": round(best, 4), "tried": tried, "scan": points}


def finetune(model: nn.Module, teacher: nn.Module, data: DataBundle, args: argparse.Namespace, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning every side gets: compress's final fine-tuning loop (distillation from the
    unpruned model, cosine schedule, SGD), for ``--epochs``."""
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, seed=args.seed,
                      bn_batches=getattr(args, "bn_batches", TrainConfig.bn_batches))
    return fit(model, data, cfg, out, meta, loss_fn=distillation_loss(teacher), progress=False, distributed=False)


# compress settings a deploy-prune side may set (``deploy-prune:METHOD:KEY=VALUE``); any other key
# is a setting of the method itself. The fine-tuning epochs stay ``--epochs`` for every side.
SIDE_CONFIG = {"criterion": str, "amount": str, "steps": int, "step_fraction": float}


def parse_side(side: str, default_method: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``deploy-prune[:METHOD[:KEY=VALUE]...]`` -> (method, compress settings, method settings)."""
    _, *rest = side.split(":")
    method = rest[0] if rest and rest[0] else default_method
    config: dict[str, Any] = {}
    options: list[str] = []
    for item in rest[1:]:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"side {side!r}: {item!r} is not KEY=VALUE")
        if key in SIDE_CONFIG:
            config[key] = SIDE_CONFIG[key](value)
        else:
            options.append(item)
    return method, config, parse_options(options)


def run_deploy_prune(args: argparse.Namespace, side: str, budget: float, out: Path, say: Callable[[str], None],
                     sensitivity: Path | None = None) -> dict[str, Any]:
    """One ``compress`` run. ``sensitivity``: an earlier budget's sensitivity.json for the same side,
    reused as a user reuses ``deploy-prune sensitivity`` across budgets (compress checks that it
    was made for these weights and data)."""
    method, config, options = parse_side(side, args.method)
    config.setdefault("step_fraction", args.step_fraction)
    cfg = CompressConfig(out=out, weights=args.weights, data=args.data, data_options=_data_options(args), target=args.target,
                         latency_ratio=budget, method=method, method_options=options, epochs=args.epochs,
                         lr=args.lr, seed=args.seed, profiles=Path(args.profiles), overwrite=True,
                         sensitivity=str(sensitivity) if sensitivity else None, **config)
    try:
        rep = compress(cfg, progress=lambda msg: say(f"[deploy-prune {method} {budget:.0%}] {msg}"))
    except BudgetUnreachable as e:
        return {"reached": False, "unreachable": str(e)}
    return {"reached": True, "met_budget": rep["met_budget"], "budget_note": rep["budget_note"],
            "stage_seconds": rep["stage_seconds"],
            "onnx": str(out / "model.onnx"), "model_pt": str(out / "model.pt")}


def _scored(data: DataBundle) -> Any:
    """The split every side is scored on: the test split, else (a dataset without one) validation."""
    return data.test if data.test is not None else data.val


def _data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(image_size=args.image_size, train_limit=args.train_limit, seed=args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="runs/r20-fm5")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--target", default="cpu-ort-1t")
    ap.add_argument("--budgets", default="0.7,0.5,0.4", help="shares of the measured baseline latency")
    ap.add_argument("--sides", default="deploy-prune,tp-l1,tp-l1-round,fastnas",
                    help="deploy-prune[:METHOD] (--method when none is named), tp-l1, tp-l1-round, fastnas")
    ap.add_argument("--method", default="deeplsp", help="deploy-prune's method where a side names none")
    ap.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs, the same for every side")
    ap.add_argument("--step-fraction", type=float, default=0.0, help="compress's fine-tuning after each structured step")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--refine-steps", type=int, default=3, help="bisection steps after a peer's scan")
    ap.add_argument("--runs", default="runs/bench-peers")
    ap.add_argument("--profiles", default="profiles")
    ap.add_argument("--out", default="benchmarks/results/peer_comparison")
    ap.add_argument("--final-takes", type=int, default=2, help="separate timings of all final models, their ratios averaged")
    ap.add_argument("--resume", action="store_true", help="keep the rows of an earlier run of the same command")
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown from the JSON and stop")
    args = ap.parse_args()
    out_json = Path(args.out).with_suffix(".json")
    if args.render:
        res = json.loads(out_json.read_text())
        write_text(out_json.with_suffix(".md"), markdown(res))
        return
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    unknown = [x for x in args.sides.split(",") if x.split(":")[0] != "deploy-prune" and x not in PEERS]
    if unknown:
        ap.error(f"--sides: unknown side(s) {', '.join(unknown)}; choose from deploy-prune[:METHOD[:KEY=VALUE...]], "
                 f"{', '.join(PEERS)}")
    for side in args.sides.split(","):
        if side.split(":")[0] == "deploy-prune":
            try:  # a bad setting fails here, not after the peers before it have run
                method, config, options = parse_side(side, args.method)
                get_method(method, **options, **{k: v for k, v in config.items() if k in ("criterion", "amount")})
            except (ValueError, UserError) as e:
                ap.error(f"--sides: {e}")

    target = load_target(args.target)
    model, meta = load_model(args.weights)
    model.eval()
    data = load_data(args.data, _data_options(args))
    example = torch.zeros(1, *data.input_shape)
    runs = Path(args.runs) / Path(args.weights).name / target.name
    runs.mkdir(parents=True, exist_ok=True)
    peer = Peer(model, example, data, target, runs)
    rows: list[dict[str, Any]] = json.loads(out_json.read_text())["rows"] if args.resume and out_json.is_file() else []
    done = {(r["side"], r["budget"]) for r in rows}
    base_flops, base_params = ModelGraph(model, data.input_shape).flops_params()
    sensitivity: dict[str, Path] = {}  # side -> the first sensitivity.json it made, reused by later budgets

    for b in [float(x) for x in args.budgets.split(",")]:
        for side in args.sides.split(","):
            run_dir = runs / f"{side.replace(':', '-').replace('=', '')}-{int(round(100 * b))}"
            if (side, b) in done:
                if side not in sensitivity and (run_dir / "sensitivity.json").is_file():
                    sensitivity[side] = run_dir / "sensitivity.json"
                continue
            t0 = time.perf_counter()
            row: dict[str, Any] = {"side": side, "budget": b}
            if side.split(":")[0] == "deploy-prune":  # deploy-prune[:METHOD]
                res = run_deploy_prune(args, side, b, run_dir, say, sensitivity.get(side))
                if side not in sensitivity and (run_dir / "sensitivity.json").is_file():
                    sensitivity[side] = run_dir / "sensitivity.json"
                row.update({k: v for k, v in res.items() if k not in ("model",)})
                if res["reached"]:
                    pruned, _ = load_model(run_dir / "model.pt")
                    row["test_accuracy"] = evaluate(pruned, _scored(data))["accuracy"]
            else:
                t_search = time.perf_counter()
                res = Prober(side, peer, say).pick(b, args.refine_steps)
                row.update({k: v for k, v in res.items() if k != "model"})
                row["stage_seconds"] = {"search": round(time.perf_counter() - t_search, 1)}
                if res["reached"]:
                    pruned = res["model"]
                    t_ft = time.perf_counter()
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    finetune(pruned, model, data, args, run_dir, {**meta, "peer": side})
                    row["stage_seconds"]["finetune"] = round(time.perf_counter() - t_ft, 1)
                    row["test_accuracy"] = evaluate(pruned, _scored(data))["accuracy"]
                    blob = onnx_bytes(pruned.eval(), data.input_shape)
                    atomic_write(run_dir / "model.onnx", lambda p, blob=blob: p.write_bytes(blob))
                    row["onnx"] = str(run_dir / "model.onnx")
            if row.get("reached"):
                g = ModelGraph(pruned, data.input_shape)
                flops, params = g.flops_params()
                row.update({"flops_ratio": flops / base_flops, "params_ratio": params / base_params, "widths": group_widths(g)})
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            _write(out_json, args, rows, None, meta, data)
            say(json.dumps({k: v for k, v in row.items() if k not in ("tried", "widths")})[:300])

    # the baseline and every final model, timed together
    base_path = runs / "baseline.onnx"
    blob = onnx_bytes(model, data.input_shape)
    atomic_write(base_path, lambda p: p.write_bytes(blob))
    finals = {f"{r['side']}@{r['budget']}": r["onnx"] for r in rows if r.get("reached") and Path(r.get("onnx", "")).is_file()}
    takes = []  # each take: every model's quiet figure, all timed together
    for i in range(args.final_takes):
        say(f"final timing, take {i + 1} of {args.final_takes}: the baseline and {len(finals)} models")
        res = benchmark({"baseline": base_path, **finals}, [target])
        takes.append({row["model"]: row["latency_ms"] for row in res["results"]})
    base_q = [quiet_of(t[str(base_path)]) for t in takes]
    for r in rows:
        if r.get("onnx") in takes[0]:
            # ratios are formed within a take (interleaved with that take's baseline), then averaged:
            # a sub-millisecond model moves 10-20 % between takes on a shared machine
            ratios = [quiet_of(t[r["onnx"]]) / b for t, b in zip(takes, base_q, strict=True)]
            r["take_ratios"] = [round(x, 4) for x in ratios]
            r["ratio"] = sum(ratios) / len(ratios)
            r["latency_ms"] = sorted(quiet_of(t[r["onnx"]]) for t in takes)[len(takes) // 2]
            r["round_cv"] = max(t[r["onnx"]].get("round_cv") or 0.0 for t in takes)
            r["meets"] = r["ratio"] <= r["budget"]
    baseline = {"latency_ms": sorted(base_q)[len(base_q) // 2], "test_accuracy": evaluate(model, _scored(data))["accuracy"]}
    _write(out_json, args, rows, baseline, meta, data)


def _write(out_json: Path, args: argparse.Namespace, rows: list[dict[str, Any]], baseline: dict[str, Any] | None,
           meta: dict[str, Any], data: DataBundle) -> None:
    res = {"args": vars(args), "model": (meta.get("model") or {}).get("spec"), "scored_on": "test" if data.test is not None else "validation",
           "input_shape": list(data.input_shape), "baseline": baseline,
           "rows": rows, "provenance": provenance(threads=torch.get_num_threads())}
    write_json(out_json, res)
    write_text(out_json.with_suffix(".md"), markdown(res))


SIDE_NAMES = {"deploy-prune": "deploy-prune compress", "tp-l1": "Torch-Pruning L1, any width",
              "tp-l1-round": "Torch-Pruning L1, round_to block", "fastnas": "ModelOpt FastNAS, divisor 8"}


def _side_name(side: str, method: str) -> str:
    name, _, m = side.partition(":")
    return f"deploy-prune compress ({m.replace(':', ', ') or method})" if name == "deploy-prune" else SIDE_NAMES.get(side, side)


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    cmd = ("python benchmarks/peer_comparison.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in a.items() if v not in (None, False) and k not in ("resume", "render")))
    base = res.get("baseline") or {}
    lines = [f"# deploy-prune against peers at the same measured latency: {res.get('model')} {'x'.join(map(str, res['input_shape']))}",
             "", f"`{cmd}`", "",
             f"Target `{a['target']}`; every side fine-tuned {a['epochs']} epoch(s) at lr {a['lr']} with distillation "
             f"from the unpruned model; latency: the baseline and every final model timed together, interleaved, "
             f"quiet figure, each ratio the mean over {a.get('final_takes', 1)} take(s); accuracy on the {res.get('scored_on', 'test')} split. Baseline: "
             + (f"{base['latency_ms']:.3f} ms, {100 * base['test_accuracy']:.2f} %." if base else "(not yet timed)."), ""]
    sides = list(dict.fromkeys(r["side"] for r in res["rows"]))
    budgets = sorted({r["budget"] for r in res["rows"]}, reverse=True)
    lines += ["| budget | " + " | ".join(_side_name(s, a["method"]) for s in sides) + " |", "|---" * (len(sides) + 1) + "|"]
    for b in budgets:
        cells = []
        for s in sides:
            r = next((x for x in res["rows"] if x["side"] == s and x["budget"] == b), None)
            if r is None:
                cells.append("-")
            elif not r.get("reached"):
                floor = r.get("floor_ratio")
                cells.append("unreachable" + (f" (floor {floor:.3f})" if floor else ""))
            else:
                acc = f"{100 * r['test_accuracy']:.2f} %" if r.get("test_accuracy") is not None else "?"
                lat = f" at {r['ratio']:.3f}x" + ("" if r.get("meets") else " (over)") if "ratio" in r else ""
                cells.append(acc + lat)
        lines.append(f"| {b:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Wall seconds per side (pruning or search incl. its measurements; fine-tuning; compress stages):", ""]
    for r in res["rows"]:
        lines.append(f"- {r['side']} at {r['budget']:.2f}: {r.get('wall_s')} s; {json.dumps(r.get('stage_seconds', {}))}")
    lines += ["", provenance_line(res["provenance"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
