"""Per-group sensitivity: prune one group alone at several ratios, no fine-tuning, and
measure the validation-accuracy drop on a fixed validation subset.

Each ratio is snapped to the nearest width of the target's width space (``widths.WidthSpace``:
the multiples of its channel block and the narrow widths below it), the widths the allocator
chooses from. Rounding to the block alone would leave every group of one block (ResNet-20's
first stage at 16 channels on AVX-512) unmeasured below its full width, and the allocator would
then price those narrow widths as nearly free.

Channels are ranked by an importance criterion computed once on the unpruned model from
training batches (so the validation subset stays untouched by scoring). Each (group, ratio)
is an independent job on a copy of the model; jobs can be spread over worker processes.

``latency_saved_ms`` is filled once the target has a latency profile (``deploy-prune profile``); until
then it is recorded as null rather than guessed.
"""

from __future__ import annotations

import copy
import hashlib
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploy_prune.data import DataBundle, make_loader
from deploy_prune.errors import UserError
from deploy_prune.graph import ModelGraph
from deploy_prune.importance import CRITERIA, score_groups
from deploy_prune.io import atomic_write, provenance, read_json, write_json
from deploy_prune.latency import lut
from deploy_prune.train import recalibrate_bn
from deploy_prune.widths import WidthSpace

SCHEMA_VERSION = 1


@dataclass
class SensitivityConfig:
    criterion: str = "taylor"
    ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # share of a group's channels removed
    val_samples: int = 1000
    score_batches: int = 8
    batch_size: int = 128
    workers: int = 1
    seed: int = 0
    # 0: the drop right after the cut. N: BatchNorm statistics re-estimated on N of the scoring
    # batches first (adaptive BN), so the drop is the cut's and not its stale statistics'.
    bn_batches: int = 0

    def __post_init__(self) -> None:
        bad = [r for r in self.ratios if not 0.0 < r < 1.0]
        if bad or not self.ratios:
            raise UserError(f"--ratios must be in (0, 1), got {bad or 'none'}; e.g. --ratios 0.1,0.3,0.5,0.7,0.9")
        CRITERIA.get(self.criterion)
        if self.workers < 1 or self.val_samples < 1 or self.score_batches < 1:
            raise UserError("--workers, --val-samples and --score-batches must be >= 1")
        if not 0 <= self.bn_batches <= self.score_batches:
            raise UserError(f"--bn-batches must be from 0 to --score-batches ({self.score_batches}), got {self.bn_batches}")


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), bs):
            correct += int((model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum())
    return correct / len(x)


# Worker state, set before forking so children inherit it without pickling the model.
_STATE: dict[str, Any] = {}


def _job(job: tuple[str, float]) -> dict[str, Any]:
    name, ratio = job
    s = _STATE
    if s.get("forked"):
        torch.set_num_threads(1)  # one thread per worker: no oversubscription, no OpenMP-after-fork hang
    model = copy.deepcopy(s["model"])
    graph = ModelGraph(model, s["input_shape"], s["ignore"], s["space"])
    total = graph_channels = next(g.channels for g in graph.groups() if g.name == name)
    keep = s["space"].snap(total * (1.0 - ratio), total)
    graph.prune_by_scores({name: keep}, {name: s["scores"][name]})
    if s["bn_batches"]:
        recalibrate_bn(model, s["batches"][: s["bn_batches"]])
    acc = s["metric"](model) if s.get("metric") else _accuracy(model, s["x"], s["y"])
    flops, params = graph.flops_params()
    saved = None
    if s.get("profile") is not None:  # LUT prediction (calibrated) of the model pruned at this group alone
        saved = s["lat0"] - lut.predict(model, s["profile"])["calibrated_ms"]
    return {"group": name, "ratio": ratio, "kept_channels": keep, "channels": graph_channels, "accuracy": acc,
            "accuracy_drop": s["baseline"] - acc, "flops_saved": s["flops0"] - flops,
            "params_saved": s["params0"] - params, "latency_saved_ms": saved}


def _init_forked() -> None:
    _STATE["forked"] = True


def run_sensitivity(
    model: nn.Module,
    data: DataBundle,
    cfg: SensitivityConfig,
    *,
    ignore: Sequence[str] = (),
    channel_multiple: int | WidthSpace = 1,
    on_job: Callable[[int, int], None] | None = None,
    meta: dict[str, Any] | None = None,
    profile: dict[str, Any] | None = None,
    metric: Callable[[nn.Module], float] | None = None,
) -> dict[str, Any]:
    """Score channels, then prune each group alone at each ratio and record the accuracy drop,
    and, given the target's latency ``profile`` of this model, the predicted latency saved.
    ``metric(model)`` (higher is better), when given, replaces accuracy on the validation subset
    (the drops are then in its units), and the jobs run in this process."""
    t0 = time.perf_counter()
    input_shape = data.input_shape
    space = WidthSpace.of(channel_multiple)
    graph = ModelGraph(model, input_shape, ignore, space)
    # Fixed validation subset: the first ``val_samples`` of the seeded validation split.
    x = y = None
    n = 0
    if metric is None:
        n = min(cfg.val_samples, len(data.val))  # type: ignore[arg-type]
        xs, ys = zip(*(data.val[i] for i in range(n)), strict=True)
        x, y = torch.stack(xs), torch.as_tensor(ys)
    batches = []
    for i, b in enumerate(make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed)):
        if i >= cfg.score_batches:
            break
        batches.append(b)
    t_score = time.perf_counter()
    scores = score_groups(model, graph, cfg.criterion, batches, seed=cfg.seed)
    t_score = time.perf_counter() - t_score
    flops0, params0 = graph.flops_params()
    baseline = metric(model) if metric else _accuracy(model, x, y)  # type: ignore[arg-type]
    lat0 = lut.predict(model, profile)["calibrated_ms"] if profile else None
    _STATE.clear()
    _STATE.update(model=model, input_shape=input_shape, ignore=list(ignore), space=space,
                  scores=scores, batches=batches, bn_batches=cfg.bn_batches, x=x, y=y, metric=metric, baseline=baseline,
                  flops0=flops0, params0=params0, profile=profile, lat0=lat0)
    jobs = [(g.name, r) for g in graph.groups() for r in cfg.ratios]
    results: list[dict[str, Any]] = []
    try:
        if cfg.workers > 1 and metric is None:
            with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("fork"), initializer=_init_forked) as ex:
                for res in ex.map(_job, jobs):
                    results.append(res)
                    if on_job:
                        on_job(len(results), len(jobs))
        else:
            for job in jobs:
                results.append(_job(job))
                if on_job:
                    on_job(len(results), len(jobs))
    finally:
        _STATE.clear()
    groups = []
    for g in graph.groups():
        entries = [{k: v for k, v in r.items() if k not in ("group", "channels")} for r in results if r["group"] == g.name]
        groups.append({"name": g.name, "channels": g.channels, "flops": g.flops, "params": g.params,
                       "in_hw": list(g.in_hw), "layers": g.out_layers, "entries": entries})
    return {
        "schema_version": SCHEMA_VERSION,
        "config": asdict(cfg),
        "model": meta or {},
        "fingerprint": fingerprint(model, cfg, data.name, ignore, space),
        "baseline_accuracy": baseline,
        "val_subset": n,
        "latency_profile": {"fingerprint": profile["fingerprint"], "target": profile["target"]["name"],
                            "baseline_predicted_ms": lat0} if profile else None,
        "width_space": {"multiple": space.multiple, "narrow": list(space.narrow)},
        "flops": flops0,
        "params": params0,
        "groups": groups,
        "seconds": {"scoring": round(t_score, 2), "total": round(time.perf_counter() - t0, 2)},
        "provenance": provenance(threads=torch.get_num_threads()),
    }


def fingerprint(model: nn.Module, cfg: SensitivityConfig, data: str, ignore: Sequence[str], multiple: int | WidthSpace) -> str:
    """Identifies what a sensitivity file was computed from, so compress can reuse it safely."""
    space = WidthSpace.of(multiple)
    # A space without narrow widths keeps the plain multiple's fingerprint.
    widths: Any = (space.multiple, space.narrow) if space.narrow else space.multiple
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    cfg_d = asdict(cfg)
    cfg_d.pop("workers")  # how the work was split does not change the result
    if not cfg_d["bn_batches"]:
        cfg_d.pop("bn_batches")  # files written without the field stay valid
    h.update(repr((sorted(cfg_d.items()), data, list(ignore), widths)).encode())
    return h.hexdigest()[:16]


def load_sensitivity(path: str | Path, expected_fingerprint: str | None = None) -> dict[str, Any]:
    """Read a sensitivity.json; refuse one computed for another model or setting."""
    res = read_json(path)
    if not isinstance(res, dict) or res.get("schema_version") != SCHEMA_VERSION or "groups" not in res:
        raise UserError(f"{str(path)!r} is not a deploy-prune sensitivity file (schema {SCHEMA_VERSION}); rerun sensitivity")
    if expected_fingerprint and res.get("fingerprint") != expected_fingerprint:
        raise UserError(f"{str(path)!r} was computed for other weights or settings; rerun sensitivity")
    return res


def plot_heatmap(res: dict[str, Any], path: str | Path) -> Path:
    """Groups x ratios, coloured by the accuracy drop (percentage points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = res["groups"]
    ratios = res["config"]["ratios"]
    drop = np.array([[100 * e["accuracy_drop"] for e in g["entries"]] for g in groups])
    kept = np.array([[e["kept_channels"] for e in g["entries"]] for g in groups])
    # The channel multiple rounds several ratios to the same width: only the first of them is a
    # distinct width tried; the repeats are left blank.
    repeat = np.zeros_like(kept, dtype=bool)
    repeat[:, 1:] = kept[:, 1:] == kept[:, :-1]
    shown = np.ma.masked_array(drop, repeat)
    fig, ax = plt.subplots(figsize=(1.2 * len(ratios) + 3, 0.35 * len(groups) + 1.8))
    cmap = plt.get_cmap("magma_r").copy()
    cmap.set_bad("#eeeeee")
    top = max(1.0, float(drop.max()))
    im = ax.imshow(shown, aspect="auto", cmap=cmap, vmin=0, vmax=top)
    ax.set_xticks(range(len(ratios)), [f"{r:.0%}" for r in ratios])
    ax.set_yticks(range(len(groups)), [f"{g['name']} ({g['channels']})" for g in groups], fontsize=8)
    for i in range(drop.shape[0]):
        for j in range(drop.shape[1]):
            if not repeat[i, j]:
                ax.text(j, i, f"{kept[i, j]}: {drop[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if drop[i, j] > 0.6 * top else "black")
    ax.set_xlabel("share of the group's channels asked to be removed (cell: channels kept: drop in pp; blank: "
                  "the same width as to its left)", fontsize=8)
    ax.set_title(f"accuracy drop (pp), criterion {res['config']['criterion']}, baseline {100 * res['baseline_accuracy']:.2f} %")
    fig.colorbar(im, ax=ax, label="accuracy drop (pp)")
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return out


def sensitivity_run(
    out: str | Path, model: nn.Module, data: DataBundle, cfg: SensitivityConfig, **kw: Any
) -> dict[str, Any]:
    """``deploy-prune sensitivity``: run, then write sensitivity.json and sensitivity.png in ``out``."""
    res = run_sensitivity(model, data, cfg, **kw)
    write_json(Path(out) / "sensitivity.json", res)
    plot_heatmap(res, Path(out) / "sensitivity.png")
    return res
