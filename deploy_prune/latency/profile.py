"""``deploy-prune profile``: measure a model's per-layer latency LUT on a target.

Steps: (1) list the model's layers and the configurations pruning can reach
(``lut.layer_configs``), (2) time each distinct configuration's standalone graph, in chunks
interleaved round by round, saving after every chunk so an interrupted profile resumes, and
time again the chunks whose sentinel says the machine was slow meanwhile (``SENTINEL``),
(3) time the full model and a few uniformly pruned variants end to end (and, where the weights
can stream, a few with a share per group: ``whole_model_weight_term``), in two sittings (one
before step 2, one after), giving the constant remainder and the linear calibration, (4)
optionally validate on random pruned variants. Steps (3) and (4) use ``latency.validate``,
which measures whole pruned models against the table.

The profile is written atomically to ``profiles/<target>/<model-fingerprint>.json``.

This is one module, over the usual length, because it builds one record: the header, the
entries with their chunk and sentinel bookkeeping (resume, re-timing), and the fields completed
from the whole-model measurements (entry choice, weight-streaming term, remainder) are all
written by ``run_profile`` and checked on reading by ``check_profile``, so the profile's format
is defined in one place; ``resolve_model`` is the ``profile`` command's resolution of its model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from deploy_prune import __version__
from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.export.timing import timing_onnx
from deploy_prune.graph import ModelGraph
from deploy_prune.io import ensure_dir, provenance, read_json, write_json
from deploy_prune.latency import lut
from deploy_prune.latency.measure import Measurer, measurer_for
from deploy_prune.latency.timing import QUIET_BAND, pool_sittings, quiet_estimate, split_protocol
from deploy_prune.widths import round_channels

Progress = Callable[[str, int, int], None]  # (stage, done, total)
CHUNK = 48  # configurations timed together (interleaved); also the resume granularity
COUNTER_RUNS = 20  # profiled runs of a whole model for its per-layer counters
# layer_timing: counters reads a chunk's counters in rounds, every configuration once per round
# (each round: as many untimed runs, then COUNTER_ROUND_RUNS timed), and keeps an entry's median
# over the rounds: a machine whose speed drifts over seconds then shifts every configuration
# alike instead of the few timed while it was slow (two profiles of MobileNetV2 made minutes
# apart had entries 2-3 us apart, the size of a narrow layer).
COUNTER_ROUNDS = 3
COUNTER_ROUND_RUNS = 7
OVERHEAD = "__overhead__"
# Every chunk also times one fixed layer, the sentinel. A shared VM has episodes, seconds to
# minutes long, in which everything runs slower (a MobileNetV2 profile had 5 of its 15 chunks in
# one: the overhead graph and the profiler's per-node cost up by about half; in another the
# sentinel read 1.74x and the layers a median 1.24x); entries timed then would be priced as if
# their layers were slow, and not by one factor that could be divided out. Chunks whose
# sentinel reads above the quiet band of all chunks' sentinels (``timing.QUIET_BAND``) are timed
# again, at most REMEASURE_PASSES times, and an entry is replaced only by a quieter reading (or,
# when its rounds disagreed, a steadier one: UNSTEADY_CV).
# The passes together time again at most REMEASURE_SHARE of the configurations, the slowest
# chunks first: on a machine loaded throughout, most chunks read slow, and re-timing them all
# (ResNet-18 on both vCPUs: 1861 timings for 1093 configurations, 1056 still slow) took the
# profile from 220 s to 570 s for little.
SENTINEL = "__sentinel__"
SENTINEL_DESC = "conv 3x3, 32 -> 32 channels, 16x16, ReLU"
REMEASURE_PASSES = 2
REMEASURE_SHARE = 0.5
# An entry whose rounds disagree (std/mean of its round medians above UNSTEADY_CV) is timed again
# too, even when its chunk's sentinel read quiet: a burst shorter than a round slows the few
# configurations timed during it and not the sentinel. A MobileNetV2 int8 profile had 53 of 695
# entries above 0.1 (a typical entry: 0.01), a row of one layer's grid up to 2.5x its neighbours;
# timed again, all 53 read steady and 10-60 % lower. A quieter reading replaces it, and so does a
# steadier one (``cleaner``).
UNSTEADY_CV = 0.1


def layer_protocol(p: Protocol) -> Protocol:
    """The protocol for single-layer entries, derived from the target's whole-model one.

    A layer runs in microseconds to a few milliseconds and there are hundreds of them, so each
    gets a tenth of the warm-up and repeats and 1/40 of the minimum time (50 ms for the
    default 2 s), over at most 3 interleaved rounds (our choice: it keeps ResNet-20's profile
    under a minute while the round-to-round CV of an entry stays at a few percent).
    """
    rounds = min(p.rounds, 3)
    return Protocol(warmup=max(2, p.warmup // 10), repeats=max(rounds, p.repeats // 10), rounds=rounds,
                    min_time_s=p.min_time_s / 40)


def profile_path(out_dir: str | Path, target: Target, fingerprint: str) -> Path:
    return Path(out_dir) / target.name / f"{fingerprint}.json"


def prunable_dims(graph: ModelGraph) -> dict[str, tuple[bool, bool]]:
    """Per layer: can pruning change its (input, output) channels?"""
    out: dict[str, list[bool]] = {}
    for g in graph.groups():
        for n in g.out_layers:
            out.setdefault(n, [False, False])[1] = True
        for n in g.in_layers:
            out.setdefault(n, [False, False])[0] = True
    return {k: (v[0], v[1]) for k, v in out.items()}


@dataclass
class ProfileSpec:
    """What to profile: the unpruned model, how it is fed, and the grid."""

    model: nn.Module
    name: str  # model spec, for the file name
    input_shape: tuple[int, ...]
    target: Target
    step: int | None = None
    max_points: int = 8
    ignore: Sequence[str] = ()
    lowrank: bool = False  # also the two convs each conv runs as once factorised (for df)


def describe(spec: ProfileSpec) -> tuple[ModelGraph, list[lut.LayerSpec], str]:
    graph = ModelGraph(spec.model, spec.input_shape, ignore=spec.ignore, channel_multiple=spec.target.channel_multiple)
    proto = onnx.load_from_string(timing_onnx(spec.model, spec.input_shape, spec.target.batch))
    specs = lut.layer_specs(spec.model, spec.input_shape, spec.target.batch, proto, prunable_dims(graph))
    fp = lut.model_fingerprint(spec.name, specs, spec.input_shape, spec.target.batch)
    return graph, specs, fp


def plan_variant(graph: ModelGraph, shares: Mapping[str, float]) -> dict[str, int]:
    """Channel counts per group for keep shares, rounded to the target's channel multiple."""
    return {g.name: round_channels(g.channels * shares.get(g.name, 1.0), g.channels, graph.channel_multiple)
            for g in graph.groups()}


def pruned_copy(model: nn.Module, input_shape: Sequence[int], plan: Mapping[str, int], ignore: Sequence[str] = (),
                multiple: int = 1) -> nn.Module:
    """A copy of ``model`` keeping ``plan[group]`` channels (the first ones: which channels go does
    not change latency)."""
    m = copy.deepcopy(model)
    g = ModelGraph(m, input_shape, ignore=ignore, channel_multiple=multiple)
    g.prune({info.name: list(range(plan[info.name], info.channels)) for info in g.groups()
             if plan.get(info.name, info.channels) < info.channels})
    return m


def random_shares(graph: ModelGraph, rng: np.random.Generator, uniform: bool, lo: float = 0.2, hi: float = 1.0) -> dict[str, float]:
    if uniform:
        r = float(rng.uniform(lo, hi))
        return {g.name: r for g in graph.groups()}
    return {g.name: float(rng.uniform(lo, hi)) for g in graph.groups()}


def check_profile(prof: Mapping[str, Any], target: Target, fingerprint: str | None, info: Mapping[str, Any] | None,
                  force: bool = False) -> list[str]:
    """Reasons ``prof`` does not belong to this target/model/tool; raises unless ``force``."""
    why = []
    if prof.get("schema") != lut.SCHEMA_VERSION:
        why.append(f"schema {prof.get('schema')} (this tool reads {lut.SCHEMA_VERSION})")
    if prof.get("target", {}).get("name") != target.name:
        why.append(f"target {prof.get('target', {}).get('name')!r}, not {target.name!r}")
    if prof.get("layer_timing", "wall") != target.layer_timing:
        why.append(f"layer timing {prof.get('layer_timing', 'wall')!r}, not {target.layer_timing!r}")
    if fingerprint is not None and prof.get("fingerprint") != fingerprint:
        why.append(f"model {prof.get('fingerprint')!r}, not {fingerprint!r}")
    if prof.get("provenance", {}).get("tool_version") != __version__:
        why.append(f"deploy-prune {prof.get('provenance', {}).get('tool_version')}, not {__version__}")
    if info is not None and prof.get("measurer", {}).get("backend_versions") != info.get("backend_versions"):
        why.append(f"backend {prof.get('measurer', {}).get('backend_versions')}, not {info.get('backend_versions')}")
    made_in = prof.get("target", {}).get("channel_multiple")
    if made_in is not None and made_in != target.channel_multiple:  # its grid steps in other units
        why.append(f"channel multiple {made_in}, not {target.channel_multiple}")
    narrow = list(target.width_space().narrow)
    if "grid" in prof and prof["grid"].get("narrow", []) != narrow:  # widths it did not measure would be extrapolated
        why.append(f"narrow widths {prof['grid'].get('narrow', [])}, not {narrow}")
    made_at = prof.get("measurer", {}).get("precision", "fp32")
    if made_at != target.precision:  # int8 kernels are other kernels: an fp32 table prices none of them
        why.append(f"precision {made_at!r}, not {target.precision!r}")
    if info is not None and info.get("device") and prof.get("measurer", {}).get("device") != info["device"]:
        # a LUT says nothing about another chip: the same target name on a new machine needs a new profile
        why.append(f"device {prof.get('measurer', {}).get('device')!r}, not {info['device']!r}")
    if why and not force:
        raise UserError(f"the profile was made for {'; '.join(why)}: re-run deploy-prune profile, or pass --force to use it anyway")
    return why


def load_profile(path: str | Path, target: Target | None = None, fingerprint: str | None = None,
                 info: Mapping[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Read a profile, check its entries (``lut.check_table``) and that it belongs to ``target`` and
    the model ``fingerprint``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no profile at {str(p)!r}; create it with deploy-prune profile --target ... --model ...")
    prof = read_json(p, what="deploy-prune profile", fix="delete it and profile again")
    if not isinstance(prof, dict) or "entries" not in prof:
        raise UserError(f"{str(p)!r} is not a deploy-prune profile")
    lut.check_table(prof, str(p))
    if target is not None:
        prof["compat_warnings"] = check_profile(prof, target, fingerprint, info, force)
    return prof


def find_profile(model: nn.Module, name: str, input_shape: Sequence[int], target: Target, profiles: str | Path = "profiles",
                 ignore: Sequence[str] = (), force: bool = False) -> dict[str, Any] | None:
    """The target's profile of this (unpruned) model, checked; None when there is none yet."""
    _, _, fp = describe(ProfileSpec(model, name, tuple(input_shape), target, ignore=ignore))
    path = profile_path(profiles, target, fp)
    if not path.is_file():
        return None
    return load_profile(path, target, fp, measurer_for(target).info(), force=force)


# ---------------------------------------------------------------------------------------------
def run_profile(
    spec: ProfileSpec,
    out_dir: str | Path = "profiles",
    validate: int = 0,
    calibrate: Sequence[float] = (0.75, 0.5, 0.3),
    seed: int = 0,
    calibrate_mixed: int | None = None,
    progress: Progress | None = None,
    measurer: Measurer | None = None,
    force: bool = False,
    reuse: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Profile ``spec.model`` on ``spec.target``; returns the profile path and its content.

    An interrupted run's entries are resumed; with ``reuse``, so are the entries of the finished
    profile at the same path (to add low-rank tables to it, measuring only those)."""
    # latency.validate builds on this module (its specs and variants), so it is imported where it is used
    from deploy_prune.latency.validate import calibration_variants, export_variants, plot_validation, validate_profile

    t_start = time.perf_counter()
    target = spec.target
    m = measurer or measurer_for(target)
    info = m.info()
    graph, specs, fp = describe(spec)
    path = profile_path(out_dir, target, fp)
    partial = path.with_suffix(".partial.json")
    ensure_dir(path.parent)

    configs: dict[str, tuple[lut.Family, int, int]] = {}
    layers: dict[str, dict[str, Any]] = {}
    narrow = list(target.width_space().narrow)
    for s in specs:
        pairs = lut.layer_configs(s, target.channel_multiple, spec.step, spec.max_points, narrow)
        d = s.as_dict()
        d["grid_in"] = sorted({ci for ci, _ in pairs})
        d["grid_out"] = sorted({co for _, co in pairs})
        layers[s.name] = d
        for ci, co in pairs:
            configs.setdefault(s.family.key(ci, co), (s.family, ci, co))
        lr = lut.lowrank_configs(s, d["grid_in"], d["grid_out"], target.channel_multiple, spec.step, spec.max_points) \
            if spec.lowrank else None
        if lr is not None:
            first, second = lut.lowrank_families(s)  # type: ignore[misc]
            d["lowrank"] = {"first": first.as_dict(), "second": second.as_dict(), "grid_rank": lr[0]}
            for fam, ci, co in lr[1]:
                configs.setdefault(fam.key(ci, co), (fam, ci, co))

    header = {
        "schema": lut.SCHEMA_VERSION, "fingerprint": fp, "structure": lut.structure_signature(specs),
        "model": {"name": spec.name, "input_shape": list(spec.input_shape), "batch": target.batch},
        "target": target.as_dict(), "measurer": info,
        "protocol": {"layer": layer_protocol(target.protocol).__dict__, "model": target.protocol.__dict__,
                     # how counter entries are read: a partial profile read otherwise is not resumed
                     **({"counters": {"rounds": COUNTER_ROUNDS, "runs": COUNTER_ROUND_RUNS, "probe": True}}
                        if reads_counters(target) else {}),
                     "sentinel": SENTINEL_DESC},
        "grid": {"step": spec.step, "max_points": spec.max_points, "channel_multiple": target.channel_multiple, "narrow": narrow},
        "layer_timing": target.layer_timing,
        "layers": layers,
    }
    entries: dict[str, Any] = {}
    # Resume what an interrupted run measured under the same conditions, and reuse a finished
    # profile's entries (adding the low-rank tables to a profile measures only those).
    for prev in ((path, partial) if reuse else (partial,)):
        if not prev.is_file():
            continue
        old = read_json(prev)
        tool = old.get("tool_version", old.get("provenance", {}).get("tool_version"))
        same = all(old.get(k) == header[k] for k in ("schema", "fingerprint", "measurer", "protocol", "grid")) \
            and old.get("layer_timing", "wall") == target.layer_timing \
            and old.get("target", {}).get("name") == target.name and tool == __version__
        if same or force:
            entries.update({k: v for k, v in old.get("entries", {}).items() if k in configs and lut.entry_problem(v) is None})
    todo = [k for k in configs if k not in entries]
    resumed = len(configs) - len(todo)
    # The calibration variants are timed in two sittings, before and after the layers (minutes
    # apart), and their quiet figure taken over both (``timing.pool_sittings``).
    t0 = time.perf_counter()
    mixed = (CALIBRATION_MIXED if weights_may_stream(spec, info) else 0) if calibrate_mixed is None else calibrate_mixed
    variants = calibration_variants(spec, graph, calibrate, mixed, seed)
    cal_blobs = export_variants(variants, spec.input_shape, target, progress, "calibration")
    first_half, second_half = split_protocol(target.protocol)
    two_sittings = target.protocol.rounds >= 2
    if progress and two_sittings:
        progress("calibration: first sitting", 0, 1)
    first = m.time(cal_blobs, first_half) if two_sittings else {}
    if progress and two_sittings:
        progress("calibration: first sitting", 1, 1)
    t_cal = time.perf_counter() - t0
    lp = layer_protocol(target.protocol)
    chunk_id = 1 + max((int(e.get("chunk", -1)) for e in entries.values()), default=-1)

    def run_chunks(keys: list[str], stage: str, done: int, total: int) -> None:
        """Time ``keys`` chunk by chunk, saving after each; a re-measured entry replaces the old
        one only when its chunk ran quieter."""
        nonlocal chunk_id
        if progress:
            progress(stage, done, total)
        keys = sorted(keys, key=lambda k: k.rsplit("|", 1)[0])  # a chunk holds similar layers (their interleaving matters)
        for i in range(0, len(keys), CHUNK):
            new = time_chunk(m, target, {k: configs[k] for k in keys[i:i + CHUNK]}, lp, chunk_id)
            chunk_id += 1
            for k, e in new.items():
                old = entries.get(k)
                if old is None:
                    entries[k] = e
                elif cleaner(e, old):
                    entries[k] = {**e, "replaced": {f: old.get(f) for f in ("predict_ms", "sentinel_ms", "round_cv", "chunk")}}
            write_json(partial, {**header, "tool_version": __version__, "entries": entries})
            done += len(new)
            if progress:
                progress(stage, done, total)

    run_chunks(todo, "layers", resumed, len(configs))
    # Chunks timed while the machine was slow (``SENTINEL``) are timed again: an episode passes.
    remeasured = 0
    for attempt in range(1, REMEASURE_PASSES + 1):
        slow = sorted(contended(entries)[1], key=lambda k: -entries[k]["sentinel_ms"])
        slow += sorted(set(unsteady(entries)) - set(slow), key=lambda k: -entries[k]["round_cv"])
        slow = slow[:max(0, int(REMEASURE_SHARE * len(configs)) - remeasured)]
        if not slow:
            break
        remeasured += len(slow)
        run_chunks(slow, f"layers: re-measure slow chunks ({attempt})", 0, len(slow))
    ref, slow = contended(entries)
    still_unsteady = len(unsteady(entries))
    t_layers = time.perf_counter() - t_start - t_cal

    prof: dict[str, Any] = {**header, "entries": entries, "configs_measured": len(todo), "configs_resumed": resumed,
                            "configs_total": len(configs),
                            "contention": {"sentinel": SENTINEL_DESC, "quiet_sentinel_ms": ref, "band": QUIET_BAND,
                                           "configs_remeasured": remeasured, "configs_still_contended": len(slow),
                                           "unsteady_cv": UNSTEADY_CV, "configs_still_unsteady": still_unsteady}}
    # Whole-model measurements: full width (the remainder) and uniform variants (calibration).
    t0 = time.perf_counter()
    stream = stream_counters(spec, m, info)
    label = "calibration: second sitting" if two_sittings else "calibration: measure"
    if progress:
        progress(label, 0, 1)
    second = m.time(cal_blobs, second_half if two_sittings else target.protocol)
    if progress:
        progress(label, 1, 1)
    measured = {k: pool_sittings([first[k], second[k]]) if two_sittings else second[k].as_dict() for k in cal_blobs}
    prof = choose_entries(prof, target, spec, stream, variants, measured)
    prof["calibration"].update(shares=list(calibrate), mixed=mixed, seed=seed)
    t_cal += time.perf_counter() - t0
    prof["stage_seconds"] = {"layers": round(t_layers, 2), "calibration": round(t_cal, 2)}
    prof["provenance"] = provenance(target=target.name, backend=info.get("backend"), backend_versions=info.get("backend_versions"),
                                    device=info.get("device"), threads=info.get("threads"), where=info.get("where"))
    if validate:
        t0 = time.perf_counter()
        prof["validation"] = validate_profile(spec, prof, graph, m, validate, seed, progress)
        prof["stage_seconds"]["validation"] = round(time.perf_counter() - t0, 2)
        plot_validation(prof["validation"], path.with_suffix(".validation.png"), f"{spec.name} on {target.name}")
    prof["profile_seconds"] = round(time.perf_counter() - t_start, 2)
    write_json(path, prof)
    partial.unlink(missing_ok=True)
    return path, prof


def sentinel_graph(batch: int) -> bytes:
    """The fixed layer every chunk times beside its configurations (``SENTINEL``)."""
    return lut.layer_graph(lut.Family(op="conv", kernel=(3, 3), padding=(1, 1), in_hw=(16, 16), batch=batch, act="Relu"), 32, 32)


def layer_entry_graph(graph: bytes, target: Target) -> bytes:
    """What an entry times for ``graph``: the graph itself at fp32; at a quantized precision its
    deployed artefact, on ONNX Runtime as the layer runs inside the quantized model
    (``quantize.in_model_view``: int8 in, int8 out; the boundary quantize and dequantize are
    15-20 % of a small int8 conv there), and channels-last in and out as its int8 kernels run
    between two int8 layers (``backends.onnxruntime.without_layout_transposes``). OpenVINO keeps the boundary: its CPU plugin runs a
    graph fed int8 more slowly than the float one (a 32-channel 3x3 conv at 16x16: 0.069 ms
    against 0.033 ms), which is not how a layer runs inside its model."""
    if target.precision == "fp32":
        return graph
    from deploy_prune.quantize import deploy_cached, in_model_view

    deployed = deploy_cached(graph, target)
    if target.backend != "onnxruntime":
        return deployed
    from deploy_prune.backends.onnxruntime import without_layout_transposes

    return without_layout_transposes(in_model_view(deployed))


def time_chunk(m: Measurer, target: Target, configs: Mapping[str, tuple[lut.Family, int, int]], lp: Protocol,
               chunk: int) -> dict[str, dict[str, Any]]:
    """The entries of one chunk of configurations, timed interleaved with the overhead graph and
    the sentinel; each entry records the chunk and its sentinel reading."""
    models = {k: layer_entry_graph(lut.layer_graph(*cfg), target) for k, cfg in configs.items()}
    models[SENTINEL] = sentinel_graph(target.batch)
    models[OVERHEAD] = lut.overhead_graph()  # the fixed cost of a run, under this chunk's conditions
    stats = m.time(models, lp)
    ovh = stats[OVERHEAD].median
    timed = [*configs, SENTINEL]
    counters = chunk_counters(m, {k: models[k] for k in timed}) if reads_counters(target) else {}
    out: dict[str, dict[str, Any]] = {}
    for k in timed:
        st = stats[k]
        e = {"median_ms": st.median, "net_ms": max(st.median - ovh, 0.0), "overhead_ms": ovh,
             "p90_ms": st.p90, "iqr_ms": st.iqr, "n": st.n, "round_cv": st.round_cv, **counters.get(k, {})}
        e["predict_ms"] = e["counter_net_ms" if counters else "net_ms"]
        out[k] = e
    s = out.pop(SENTINEL)  # gross, not net of the run's or the profiler's overhead: never 0, and those slow down too
    sent = s["counter_ms"] if counters else s["median_ms"]
    return {k: {"config": {**configs[k][0].as_dict(), "cin": configs[k][1], "cout": configs[k][2]}, **e,
                "chunk": chunk, "sentinel_ms": sent} for k, e in out.items()}


def contended(entries: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, list[str]]:
    """The quiet sentinel reading over all chunks, and the entries whose chunk read above its band.
    Entries without a sentinel (resumed from a profile that had none) are taken as they are."""
    by_chunk = {e["chunk"]: e["sentinel_ms"] for e in entries.values() if "sentinel_ms" in e and "chunk" in e}
    if not by_chunk:
        return None, []
    ref = quiet_estimate(list(by_chunk.values()))
    if ref <= 0:
        return ref, []
    return ref, [k for k, e in entries.items() if e.get("sentinel_ms", 0.0) > ref * (1.0 + QUIET_BAND)]


def unsteady(entries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Entries whose round medians disagree by more than ``UNSTEADY_CV`` (std / mean)."""
    return [k for k, e in entries.items() if e.get("round_cv", 0.0) > UNSTEADY_CV]


def cleaner(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether a re-timed entry replaces the old one: a reading whose chunk ran quieter (its
    sentinel) always does; when the old one was unsteady, so does a steadier one."""
    if new["sentinel_ms"] < old.get("sentinel_ms", float("inf")):
        return True
    return bool(old.get("round_cv", 0.0) > UNSTEADY_CV and new.get("round_cv", 0.0) < old["round_cv"])


def chunk_counters(m: Measurer, graphs: Mapping[str, bytes]) -> dict[str, dict[str, float]]:
    """Counter fields of each layer graph's entry, read in ``COUNTER_ROUNDS`` interleaved rounds.

    Each graph is timed with a probe beside it (``lut.with_probe``): ``floor``, the probe's counter
    in the same runs, is what the profiler adds to one node. ``counter_ms`` is the median over
    rounds of the layer's own nodes; ``counter_net_ms`` the median of (own nodes - nodes x floor),
    at least 0: the layer's compute, the figure prediction uses. Inside a whole model each node
    also costs the runtime's dispatch, the same for every variant of the model, so that part of
    the model's latency stays in the remainder.
    """
    probed = {k: lut.with_probe(g) for k, g in graphs.items()}
    names = {k: lut.own_names(g) for k, g in graphs.items()}
    raw: dict[str, list[float]] = {k: [] for k in graphs}
    net: dict[str, list[float]] = {k: [] for k in graphs}
    floors: dict[str, list[float]] = {k: [] for k in graphs}
    for _ in range(COUNTER_ROUNDS):
        counters = m.layer_times(probed, COUNTER_ROUND_RUNS)
        for k in graphs:
            own = lut.own_counters(names[k], counters[k])
            floor = lut.probe_ms(counters[k])
            raw[k].append(sum(own.values()))
            net[k].append(max(sum(own.values()) - len(own) * floor, 0.0))
            floors[k].append(floor)
    return {k: {"counter_ms": float(np.median(raw[k])), "counter_net_ms": float(np.median(net[k])),
                "counter_floor_ms": float(np.median(floors[k]))} for k in graphs}


BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
# Random-share variants measured beside the uniform ones for the calibration (whole_model_weight_term).
CALIBRATION_MIXED = 4
# The share of the calibration's leave-one-out error the whole-model weight term must remove to be
# kept: on 8 noisy points a third coefficient also fits noise.
WEIGHT_TERM_GAIN = 0.25


ENTRY_FIELDS = {"wall": ("net_ms",), "counters": ("counter_net_ms",), "auto": ("counter_net_ms", "net_ms")}


def reads_counters(target: Target) -> bool:
    """Whether a profile for ``target`` reads the backend's per-node counters of each entry."""
    return ENTRY_FIELDS[target.layer_timing] != ("net_ms",)


def choose_entries(prof: dict[str, Any], target: Target, spec: ProfileSpec, stream: dict[str, Any],
                   variants: Mapping[str, nn.Module], measured: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The profile completed from the whole-model measurements: which entry field predicts
    (``predict_ms``), the weight-streaming term, the remainder and the calibration.

    ``layer_timing: auto`` has both a wall and a counter figure for every entry, and keeps the
    one whose calibration fits the calibration variants' measurements with the smaller relative
    RMS residual. Neither is better everywhere, nor on one machine every time (AMD EPYC VM,
    ``benchmarks/results/lut_fidelity_*_epyc*.md``): MobileNetV2 on one core with counter entries
    missed the 5 % median goal (5.3 %), and with ``auto`` one profile's counter calibration was
    off by 7.3 % RMS against 3.6 % for the wall entries (kept: 1.4 % median error on 30 variants),
    while the next profile's were level (3.5 % and 3.6 %); on two threads one profile kept
    counters (2.7 % against 5.4 %) and another wall entries (7.1 % against 3.9 %; 4.0 % median
    error out of sample, against 5.4 % with the counters). Choosing on 4 points is a
    2-degree-of-freedom test, but it is a test against the very measurements prediction must
    match, and it costs no extra timing. The choice and both fits are recorded under
    ``entry_choice``, and ``validate.validate_profile`` scores every candidate out of sample."""
    from deploy_prune.latency.validate import fit_calibration

    fits: dict[str, dict[str, Any]] = {}
    for f in ENTRY_FIELDS[target.layer_timing]:
        cand = predicting_from(prof, f)
        cand["weight_stream"] = fit_stream(spec, cand, stream)
        predicted = {k: lut.predict(model, cand) for k, model in variants.items()}
        s_full = predicted["full"]["layer_sum_ms"]
        cand["remainder_ms"] = measured["full"]["quiet"] - s_full
        cand["full_model"] = {"latency_ms": measured["full"], "layer_sum_ms": s_full}
        cand["calibration"] = fit_calibration(measured, predicted, list(variants))
        fits[f] = cand
    rms = {f: calibration_rms_pct(c["calibration"]) for f, c in fits.items()}
    best = min(fits, key=lambda f: rms[f])
    out = fits[best]
    out["entry_field"] = best
    if len(fits) > 1:
        out["entry_choice"] = {"chosen": best, "by": "relative RMS residual of the calibration fit",
                               "candidates": {f: {"calibration_rms_pct": rms[f], "a": c["calibration"]["a"], "b": c["calibration"]["b"],
                                                  "weight_stream": c["weight_stream"]} for f, c in fits.items()}}
    return whole_model_weight_term(out, variants, measured)


def loo_rms_pct(features: np.ndarray, ys: np.ndarray, always: int | None = None) -> float:
    """Leave-one-out relative RMS residual (%) of the least-squares fit ``ys ~ features @ coef``:
    each point predicted by the fit on the others (a fit with more terms always fits its own
    points better; this asks whether it predicts the next model better). Point ``always`` is
    never left out: the full model anchors the table (its remainder), and it is the one point
    above the cache that the variants never reach, so leaving it out tests an extrapolation
    no prediction makes."""
    res = []
    for i in range(len(ys)):
        if i == always:
            continue
        keep = np.arange(len(ys)) != i
        coef = np.linalg.lstsq(features[keep], ys[keep], rcond=None)[0]
        res.append(float(features[i] @ coef) / ys[i] - 1.0)
    return float(100.0 * np.sqrt(np.mean(np.square(res))))


# The shapes of the whole-model weight term: each weight byte costs the same, or it costs in
# proportion to the share a cache of the profile's size streams (``lut.streamed_share``) on a ramp.
WEIGHT_TERM_SHAPES: dict[str, tuple[float, float] | None] = {"every byte": None, "ramp 0.5-1.4": lut.STREAM_RAMP,
                                                               "ramp 0.3-1.0": (0.3, 1.0)}


def whole_model_weight_term(prof: dict[str, Any], variants: Mapping[str, nn.Module],
                            measured: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``prof`` with its calibration refitted as ``measured ~ a * layer_sum + w * streamed_MB + b``
    on the whole-model measurements, when that predicts them clearly better (leave-one-out) than
    its own calibration; the record of the comparison either way (``weight_stream.whole_model_fit``).

    A layer's entry is timed with its weights hot in the cache; inside the model each layer
    reads its weights in again from a farther level. ``fit_stream`` measures that from the
    backend's per-layer counters, but ONNX Runtime's int8 counters are too coarse for it (about
    1 us per node), and a calibration on uniform variants cannot tell it from the layers' own
    work, which shrinks with the weights. The mixed calibration variants tell them apart. Int8
    MobileNetV2 at 32x32 on one Xeon core (2.2 MB of int8 weights, a 2 MiB L2): the weights alone
    ranked 30 random variants' measured latency at Spearman 0.93-0.97, the layer sum at
    0.92-0.94, and with this term the calibrated prediction ranked them at 0.977
    (``benchmarks/results/lut_fidelity_cpu-ort-int8-1t.md``).

    ``streamed_MB`` is the weights' MB times the share streamed, in one of ``WEIGHT_TERM_SHAPES``
    (the one with the smallest leave-one-out error; ramps need the cache size). The term is a
    weight-streaming term of the table (``lut.stream_ms``), so the allocator prices it as it
    prices streaming. Needs at least 5 variants (three coefficients, one point left out)."""
    keys = list(variants)
    ws = dict(prof.get("weight_stream") or {})
    bpw = int(ws.get("bytes_per_weight", 4))
    if len(keys) < 5 or "full" not in keys:
        return prof
    hot = {**prof, "weight_stream": None, "calibration": None}
    layers = np.array([lut.predict(variants[k], hot)["layer_sum_ms"] for k in keys])
    now = np.array([lut.predict(variants[k], {**prof, "calibration": None})["layer_sum_ms"] for k in keys])
    nbytes = np.array([float(sum(lut.weight_bytes(variants[k], bpw).values())) for k in keys])
    ys = np.array([measured[k]["quiet"] for k in keys])
    ones, full = np.ones(len(keys)), keys.index("full")
    loo_now = loo_rms_pct(np.c_[now, ones], ys, full)
    shapes: dict[str, dict[str, Any]] = {}
    for label, ramp in WEIGHT_TERM_SHAPES.items():
        if ramp is None:
            rec: dict[str, Any] = {"every_byte": True}
        elif "cache_bytes" in ws:
            rec = {"cache_bytes": ws["cache_bytes"], "ramp": list(ramp)}
        else:
            continue
        mb = np.array([b / 1e6 * lut.streamed_share(b, rec) for b in nbytes])
        if np.ptp(mb) == 0:
            continue
        feats = np.c_[layers, mb, ones]
        a, w, b = (float(v) for v in np.linalg.lstsq(feats, ys, rcond=None)[0])
        raw = layers + mb * w / a + (ys[full] - layers[full] - mb[full] * w / a) if a > 0 else layers
        shapes[label] = {"a": a, "w_ms_per_mb": w, "b": b, "loo_rms_pct": loo_rms_pct(feats, ys, full), "rec": rec,
                         "mb": mb, "plausible": bool(a > 0 and w > 0 and raw.min() > 0)}
    record = {"points": len(keys), "loo_rms_pct_calibration": loo_now,
              "shapes": {k: {f: v[f] for f in ("a", "w_ms_per_mb", "b", "loo_rms_pct", "plausible")} for k, v in shapes.items()}}
    # Kept only when it predicts clearly better, and as a cost a run can pay: positive, and
    # leaving every variant's raw prediction (entries + term + remainder) above zero.
    fit = [k for k, v in shapes.items() if v["plausible"] and v["loo_rms_pct"] < (1.0 - WEIGHT_TERM_GAIN) * loo_now]
    if not fit:
        prof["weight_stream"] = {**ws, "whole_model_fit": {**record, "kept": None}}
        return prof
    best = min(fit, key=lambda k: shapes[k]["loo_rms_pct"])
    c = shapes[best]
    prof["weight_stream"] = {"bytes_per_weight": bpw, "ms_per_mb": c["w_ms_per_mb"] / c["a"], **c["rec"],
                             "from": "whole-model fit (profile.whole_model_weight_term)",
                             "whole_model_fit": {**record, "kept": best}, "replaced": ws}
    stream = c["mb"] * c["w_ms_per_mb"] / c["a"]
    chosen = (prof.get("entry_choice") or {}).get("candidates", {}).get(prof.get("entry_field"))
    if chosen is not None:  # the chosen candidate, rebuilt from its record, is the profile's prediction
        chosen.update(a=c["a"], b=c["b"], weight_stream=prof["weight_stream"])
    prof["calibration"] = {"a": c["a"], "b": c["b"],
                           "fit": f"measured_ms = a * (layer_sum_ms + streamed_MB * ms_per_mb) + b (least squares; {best})",
                           "points": [{"variant": k, "layer_sum_ms": float(x + st), "measured_ms": float(y)}
                                      for k, x, st, y in zip(keys, layers, stream, ys, strict=True)]}
    # the remainder keeps raw_ms exact at full width, as choose_entries set it
    s_full = lut.predict(variants["full"], {**prof, "calibration": None})["layer_sum_ms"]
    prof["remainder_ms"] = float(measured["full"]["quiet"] - s_full)
    prof["full_model"] = {**prof.get("full_model", {}), "layer_sum_ms": s_full}
    return prof


def predicting_from(prof: Mapping[str, Any], field: str, fit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``prof`` predicting from the entries' ``field``; with ``fit`` (an ``entry_choice``
    candidate), also with that candidate's calibration and weight-streaming term."""
    out = {**prof, "entries": {k: {**e, "predict_ms": e.get(field, e["predict_ms"])} for k, e in prof["entries"].items()}}
    if fit is not None:
        out.update(weight_stream=fit["weight_stream"], calibration={"a": fit["a"], "b": fit["b"]})
    return out


def calibration_rms_pct(cal: Mapping[str, Any]) -> float:
    """Relative RMS residual (%) of a calibration over its own points."""
    r = [(cal["a"] * p["layer_sum_ms"] + cal["b"]) / p["measured_ms"] - 1.0 for p in cal["points"] if p["measured_ms"] > 0]
    return float(100.0 * np.sqrt(np.mean(np.square(r)))) if r else float("inf")


def cache_of(target: Target, info: Mapping[str, Any]) -> tuple[int, str] | None:
    """(bytes, where from) of the cache a model's weights must fit in to stay resident: the
    target's ``cache_kib``, else this machine's L2 per thread times the threads (a CPU measured
    locally: each thread's core has its own), else None (unknown)."""
    from deploy_prune.io import cpu_cache_bytes

    if target.cache_kib is not None:
        return target.cache_kib * 1024, "target cache_kib"
    if info.get("where") == "local" and target.device == "cpu" and (l2 := cpu_cache_bytes(2)):
        return l2 * max(1, int(info.get("threads") or 1)), "L2 per thread x threads (sysfs)"
    return None


def weights_may_stream(spec: ProfileSpec, info: Mapping[str, Any]) -> bool:
    """Whether the full model's weights reach the lowest ramp of ``WEIGHT_TERM_SHAPES`` (0.3 of
    the cache), where the whole-model weight term can find something; below that the mixed
    calibration variants would cost profile time for nothing (an unknown cache: they are timed)."""
    cache = cache_of(spec.target, info)
    if cache is None:
        return True
    lowest = min(r[0] for r in WEIGHT_TERM_SHAPES.values() if r is not None)
    return sum(lut.weight_bytes(spec.model, BYTES_PER_WEIGHT.get(spec.target.precision, 4)).values()) >= lowest * cache[0]


def stream_counters(spec: ProfileSpec, m: Measurer, info: Mapping[str, Any]) -> dict[str, Any]:
    """What the weight-streaming term is fitted on (``latency.lut`` docstring): the cache, and the
    full model's own per-layer counters (``by_layer``), measured once whatever the entries.

    The cache is ``cache_kib`` of the target, else this machine's L2 per thread (a CPU measured
    locally: each thread's core has its own), else unknown. The counters are read only when the
    full model streams at least half its weights (``lut.streamed_share``): below that there is
    little to fit. ``rec`` says why there is no term when there is none."""
    from deploy_prune.latency.counters import attribute, node_to_layer

    target = spec.target
    bpw = BYTES_PER_WEIGHT.get(target.precision, 4)
    rec: dict[str, Any] = {"bytes_per_weight": bpw, "ms_per_mb": None}
    cache = cache_of(target, info)
    if cache is None:
        return {"rec": {**rec, "why_none": "cache size unknown: set cache_kib in the target"}}
    rec["cache_bytes"], rec["cache_from"] = cache
    rec["ramp"] = list(lut.STREAM_RAMP)
    rec["full_model_bytes"] = sum(lut.weight_bytes(spec.model, bpw).values())
    share = rec["full_model_streamed_share"] = lut.streamed_share(rec["full_model_bytes"], rec)
    if share < 0.5:  # too little streaming to fit a slope on; pruned variants stream less still
        return {"rec": {**rec, "why_none": f"the full model's weights mostly fit in the cache (share streamed {share:.2f})"}}
    blob = timing_onnx(spec.model, tuple(spec.input_shape), target.batch)
    try:
        probed = m.layer_times({"full": lut.with_probe(blob)}, COUNTER_RUNS)["full"]
    except UserError as e:
        return {"rec": {**rec, "why_none": f"no per-layer counters: {e}"}}
    counters = lut.net_of_probe(probed)  # as the entries: less what the profiler adds to each node...
    by_layer = {k: max(v, 0.0) for k, v in  # ...and clipped per layer, as the entries
                attribute(counters, node_to_layer(onnx.load_from_string(blob), spec.model, torch.zeros(1, *spec.input_shape))).items()}
    return {"rec": rec, "by_layer": by_layer}


def fit_stream(spec: ProfileSpec, prof: Mapping[str, Any], stream: Mapping[str, Any]) -> dict[str, Any]:
    """The LUT's weight-streaming term: the ms per MB of weights a run pays when it streams them
    all in, fitted on the full model (``stream_counters``) against ``prof``'s entries.

    The slope is a least-squares line of (in-model counter - hot entry) on weight bytes, layer
    by layer. It is kept only when the backend had counters, the slope is positive and the
    correlation at least 0.5, and it is divided by the full model's share streamed; the record
    says which. Against wall entries, which carry each one-layer graph's boundary costs, the
    counters differ by more than the streaming, and the fit mostly finds no clear slope (then
    there is no term: the calibration's slope is all the wall candidate has)."""
    rec = dict(stream["rec"])
    if "by_layer" not in stream:
        return rec
    by_layer = stream["by_layer"]
    wb = lut.weight_bytes(spec.model, rec["bytes_per_weight"])
    hot = lut.predict(spec.model, {**prof, "weight_stream": None, "calibration": None})["per_layer"]
    names = [n for n in hot if n in by_layer and n in wb]
    xs = np.array([wb[n] / 1e6 for n in names])
    ys = np.array([by_layer[n] - hot[n] for n in names])
    if len(names) < 3 or np.ptp(xs) == 0:
        return {**rec, "why_none": "too few layers to fit"}
    slope, intercept = np.polyfit(xs, ys, 1)
    corr = float(np.corrcoef(xs, ys)[0, 1])
    rec.update({"fit_slope_ms_per_mb": float(slope), "fit_intercept_ms": float(intercept), "fit_corr": corr, "layers": len(names)})
    if not (slope > 0 and corr >= 0.5):
        return {**rec, "why_none": f"no clear cost of cold weights (slope {slope:.4f} ms/MB, correlation {corr:.2f})"}
    rec["ms_per_mb"] = float(slope) / rec["full_model_streamed_share"]  # the layers' excess is the full model's share of the whole cost
    return rec


TORCHVISION_INPUT = (3, 224, 224)
CIFAR_INPUT = (3, 32, 32)


def parse_input_size(text: str) -> tuple[int, ...]:
    """``C,H,W`` / ``CxHxW``, or one number ``S`` for ``3,S,S``."""
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(","))
        if len(vals) == 1:
            vals = (3, vals[0], vals[0])
        assert len(vals) == 3 and min(vals) > 0
    except (ValueError, AssertionError):
        raise UserError(f"bad --input-size {text!r}; use C,H,W such as 3,224,224 (or one number for 3xSxS)") from None
    return vals


def resolve_model(
    model_spec: str | None, weights: str | None, input_size: str | None, num_classes: int | None, target: Target,
    trust: bool = False,
) -> tuple[nn.Module, str, tuple[int, ...]]:
    """The model to profile, its name and its C,H,W input, from the CLI's options.

    Input size: ``--input-size``, else the checkpoint's recorded shape, else the target's
    ``input_shape``, else 3x224x224 for torchvision models and 3x32x32 for the others.
    """
    from deploy_prune.models import MODELS, is_user_model
    from deploy_prune.models.checkpoint import load_model

    if model_spec is None and weights is None:
        raise UserError("profile needs --model NAME (or --weights CHECKPOINT)")
    meta: dict[str, Any] = {}
    shape: tuple[int, ...] | None = parse_input_size(input_size) if input_size else None
    if weights is not None:
        model, meta = load_model(weights, model_spec, num_classes=num_classes, trust=trust)
        shape = shape or (tuple(meta["input_shape"]) if "input_shape" in meta else None)
    if shape is None:
        torchvision_like = model_spec in ("resnet18", "resnet50", "vgg16", "mobilenet_v2", "mobilenet_v3_large")
        shape = tuple(target.input_shape) if target.input_shape else (TORCHVISION_INPUT if torchvision_like else CIFAR_INPUT)
    if weights is None:
        from deploy_prune.models import build_model

        assert model_spec is not None
        model = build_model(model_spec, num_classes or 10, shape[0])
    name = model_spec or meta.get("model", {}).get("spec", "model")
    if not is_user_model(name) and name not in MODELS.names():
        name = "model"
    from deploy_prune.models import check_runs_on

    check_runs_on(model, shape)
    return model, name, shape
