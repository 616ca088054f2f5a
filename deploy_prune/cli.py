"""The ``deploy-prune`` command line: a thin Typer shell over library functions.

Every command parses options, calls one library function, and prints. ``UserError``s become a
single ``error: ...`` line on stderr with exit code 2 (3 for an unreachable budget).

This is one module, over the usual length, because it is one Typer app: its length is the flags
and help texts of fifteen verbs, which share the option types, the error handling (``_errors``)
and the consoles defined here; no verb holds logic beyond parsing and printing.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deploy_prune import DEFAULT_TARGET, __version__
from deploy_prune.distributed import is_main
from deploy_prune.errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Prune vision models to a latency budget measured on the target device.",
)

def _flag_type(self: Any, ctx: Any) -> str | None:
    """A flag takes no value, so its help row shows no type (typer's rich help prints ``<bool>``)."""
    return None if getattr(self, "is_flag", False) else _option_type(self, ctx)


if hasattr(typer.core.TyperOption, "display_type_rich"):
    _option_type = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]

# Piped output (CI logs, files) gets a wide console so tables are not cut to 80 columns, and
# lines that are never wrapped, so that a line naming a long path stays one line for grep.
console = Console() if sys.stdout.isatty() else Console(width=160, soft_wrap=True)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _errors(fn: F) -> F:
    """Turn UserError into one clear line and the error's exit code, and a full disk (``ENOSPC``)
    into one line naming the file, exit code 2; an ``--out`` directory the failed command created
    and wrote nothing into is removed."""
    resumable = "resume" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out") if isinstance(kwargs.get("out"), Path) else None
        fresh = out is not None and not out.exists()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            # escaped: a message naming an extra ("deploy-prune[openvino]") is not rich markup
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            from deploy_prune.io import is_disk_full

            if not is_disk_full(e):
                raise
            kept = resumable and out is not None and any((out / "checkpoints").glob("*.pt"))
            where = f" writing {e.filename}" if e.filename else ""
            err_console.print(f"[bold red]error:[/] no space left on device{escape(where)}; free space and rerun"
                              + (" with --resume" if kept else ""), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        finally:
            if fresh and out is not None and sys.exc_info()[0] is not None:
                from deploy_prune.io import remove_if_empty

                remove_if_empty(out)

    return wrapper  # type: ignore[return-value]


# Options shared by several verbs.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="registered model name or path/to/file.py:factory")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="digits | fashion-mnist | imagefolder:PATH | cifar10:PATH | synthetic[:CxHxW]")]
DataDirOpt = Annotated[str | None, typer.Option("--data-dir", help="directory of the dataset files (fashion-mnist)")]
ImageSizeOpt = Annotated[int | None, typer.Option("--image-size", help="resize inputs to SIZE x SIZE")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="allow loading a pickled model (runs code from the file)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for splits, init and shuffling")]
CheckpointModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="architecture, if the checkpoint does not record it")]
LOG_HELP = "record the finished run: tensorboard:DIR or mlflow[:URI] (repeatable; pip install 'deploy-prune\\[tracking]')"
IgnoreOpt = Annotated[str, typer.Option("--ignore", help="comma-separated layer names never to prune")]


def _data_options(data_dir: str | None, image_size: int | None, seed: int, **kw: Any) -> Any:
    from deploy_prune.data import DataOptions

    return DataOptions(data_dir=data_dir, image_size=image_size, seed=seed, **kw)


@app.command()
@_errors
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory to write")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="registered name or path/to/file.py:factory [default: tiny-cnn, or the one recorded in --weights]")] = None,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = None,
    image_size: ImageSizeOpt = None,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 10,
    batch_size: Annotated[int, typer.Option(help="batch size per process")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate (cosine schedule)")] = 0.05,
    optimizer: Annotated[str, typer.Option(help="sgd | adamw")] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="weight decay")] = 5e-4,
    val_fraction: Annotated[float | None, typer.Option(help="share of the training data held out for validation")] = None,
    train_limit: Annotated[int | None, typer.Option(help="use only N training samples (quick runs)")] = None,
    weights: Annotated[str | None, typer.Option(help="start from this checkpoint or run directory")] = None,
    trust_checkpoint: TrustOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run from OUT/checkpoints/last.pt")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the run already in OUT, once the new run finishes: until then the old run (its model.onnx too) waits in OUT/.replaced-run/ and comes back if training fails (a killed run leaves it there; --resume finishes the replacement)")] = False,
    seed: SeedOpt = 0,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Train a model and write OUT/model.pt, OUT/metrics.json and per-epoch checkpoints."""
    from deploy_prune.train import train_model

    metrics = train_model(
        out=out, model_spec=model, data_spec=data,
        data_options=_data_options(data_dir, image_size, seed, val_fraction=val_fraction, train_limit=train_limit),
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        weights=weights, trust=trust_checkpoint, resume=resume, overwrite=overwrite, seed=seed, progress=progress,
    )
    if metrics.get("rank", 0) == 0:
        console.print(f"val accuracy {100 * metrics['val_accuracy']:.2f} % after {metrics['epochs']} epochs "
                      f"({metrics['train_seconds']:.1f} s) -> {out}/model.pt, {out}/metrics.json")


@app.command()
@_errors
def export(
    weights: Annotated[str, typer.Argument(help="checkpoint file or run directory")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="ONNX file to write (default: RUN/model.onnx)")] = None,
    model: CheckpointModelOpt = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="dataset for real parity samples (default: the training data)")] = None,
    data_dir: DataDirOpt = None,
    input_shape: Annotated[str | None, typer.Option(help="C,H,W when the checkpoint does not record it")] = None,
    batch: Annotated[int, typer.Option(help="batch size of the exported graph (with --dynamic-batch: the one parity is checked at)")] = 1,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="make the batch axis of input and output symbolic ('batch')")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17)")] = 18,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing ONNX file and its record")] = False,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Export to ONNX (normalisation, class names, input shape and provenance in its metadata), check it with
    onnx.checker, and compare outputs with torch."""
    from deploy_prune.export import BATCH_DIM, export_run

    rec = export_run(weights, out=out, model_spec=model, data_spec=data, data_dir=data_dir, input_shape=input_shape,
                     batch=batch, opset=opset, trust=trust_checkpoint, overwrite=overwrite, dynamic_batch=dynamic_batch)
    status = "[green]ok[/]" if rec["parity_ok"] else "[red]OVER TOLERANCE[/]"
    shape = [BATCH_DIM, *rec["input_shape"][1:]] if rec["dynamic_batch"] else rec["input_shape"]
    at = f" at batches {', '.join(map(str, rec['parity_batches']))}" if rec.get("parity_batches") else ""
    console.print(f"wrote {rec['onnx']} (opset {rec['opset']}, input {shape}); parity max |diff| "
                  f"{rec['max_abs_diff']:.2e} over {rec['parity_samples']} samples{at} {status}")
    if not rec["parity_ok"]:
        raise typer.Exit(1)


@app.command()
@_errors
def benchmark(
    onnx_models: Annotated[list[Path], typer.Argument(help="ONNX model(s) to time")],
    target: Annotated[list[str], typer.Option("--target", "-t", help="target name or YAML path (repeatable)")] = [DEFAULT_TARGET],  # noqa: B006
    json_out: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="also write the JSON results to this file")] = None,
    warmup: Annotated[int | None, typer.Option(help="override the target's warm-up runs")] = None,
    repeats: Annotated[int | None, typer.Option(help="override the target's timed runs")] = None,
    rounds: Annotated[int | None, typer.Option(help="override the target's interleaved rounds")] = None,
    min_time: Annotated[float | None, typer.Option(help="override the minimum seconds timed per model")] = None,
) -> None:
    """Measure ONNX latency on one or more targets: median, p90/p95/p99, min, spread, throughput; interleaved."""
    from deploy_prune.config import Protocol
    from deploy_prune.io import write_json
    from deploy_prune.latency.benchmark import benchmark as run_benchmark
    from deploy_prune.target import load_target

    if out is not None:  # checked before anything is measured
        _check_json_out(out, "a benchmark result", lambda d: {"protocol", "results"} <= set(d),
                        [("model", p) for p in onnx_models])
    targets = [load_target(t) for t in target]
    base = targets[0].protocol
    proto = Protocol(
        warmup=base.warmup if warmup is None else warmup, repeats=base.repeats if repeats is None else repeats,
        rounds=base.rounds if rounds is None else rounds, min_time_s=base.min_time_s if min_time is None else min_time,
    )
    models = {p.stem if len(onnx_models) == 1 else str(p): p for p in onnx_models}
    with _progress_bar(not json_out) as bar:
        task = bar.add_task("measuring", total=proto.rounds)
        res = run_benchmark(models, targets, proto, on_round=lambda r: bar.update(task, completed=r))
    if out is not None:
        write_json(out, res)
    if json_out:
        sys.stdout.write(json.dumps(res, indent=2, allow_nan=False) + "\n")
        return
    console.print(benchmark_table(res))
    for name, r in {r["target"]: r for r in res["results"]}.items():
        console.print(f"{name}: {r['device']}; " + ", ".join(f"{k} {v}" for k, v in r["backend_versions"].items()))


def _check_json_out(out: Path, what: str, ours: Callable[[dict[str, Any]], bool], inputs: list[tuple[str, Path | None]]) -> None:
    """``--out`` of a verb that writes a JSON result: not one of its inputs, and replacing only an
    earlier result of the same kind (never a checkpoint, a model or another report)."""
    from deploy_prune.io import check_replaceable, json_object, refuse_input_as_output

    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a directory; give a file name")
    refuse_input_as_output("--out", out, [out], inputs)
    check_replaceable("--out", out, what, lambda p: (d := json_object(p)) is not None and ours(d))


def _slowest_layers(layers: dict[str, float], top: int) -> Table:
    """The ``top`` slowest layers of an imported per-layer profile (trtexec, benchmark_app)."""
    table = Table(title="slowest layers")
    table.add_column("layer")
    table.add_column("ms", justify="right")
    for name, ms in sorted(layers.items(), key=lambda kv: -kv[1])[:top]:
        table.add_row(name, f"{ms:.4f}")
    return table


@app.command()
@_errors
def trtexec(
    times: Annotated[Path, typer.Argument(help="JSON from trtexec --exportTimes=FILE")],
    profile: Annotated[Path | None, typer.Option("--profile", help="JSON from trtexec --exportProfile=FILE (per-layer times)")] = None,
    rounds: Annotated[int, typer.Option(help="split the inferences into this many rounds for the round CV")] = 1,
    top: Annotated[int, typer.Option(help="layers to list from --profile")] = 10,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="also write the figures as JSON")] = None,
) -> None:
    """Read trtexec's exported timings (GPU compute time) and per-layer profile as deploy-prune figures."""
    from deploy_prune.io import provenance, write_json
    from deploy_prune.latency.trtexec import load_profile, load_times

    if out is not None:
        _check_json_out(out, "an earlier trtexec result", lambda d: d.get("source") == "trtexec",
                        [("TIMES", times), ("--profile", profile)])
    stats = load_times(times, rounds=rounds)
    layers = load_profile(profile) if profile else {}
    console.print(f"{times}: GPU compute median {stats.median:.3f} ms, p90 {stats.p90:.3f} ms, IQR {stats.iqr:.3f} ms, "
                  f"{stats.n} inferences, round CV {100 * stats.round_cv:.1f} %", highlight=False)
    if layers:
        console.print(f"{profile}: {len(layers)} layers, sum of medians {sum(layers.values()):.3f} ms", highlight=False)
        console.print(_slowest_layers(layers, top))
    if out is not None:
        write_json(out, {"source": "trtexec", "times_file": str(times), "latency_ms": stats.as_dict(),
                         "profile_file": str(profile) if profile else None, "layers_ms": layers, "provenance": provenance()})


@app.command("benchmark-app")
@_errors
def benchmark_app(
    report: Annotated[Path, typer.Argument(help="benchmark_report.csv from benchmark_app -report_folder DIR, or DIR")],
    counters: Annotated[Path | None, typer.Option("--counters", help="benchmark_average_counters_report.csv or ..._detailed_... (per-layer times; found in DIR when REPORT is one)")] = None,
    top: Annotated[int, typer.Option(help="layers to list from the counters")] = 10,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="also write the figures as JSON")] = None,
) -> None:
    """Read OpenVINO benchmark_app's statistics report (latency, throughput) and per-layer counters as deploy-prune figures."""
    from deploy_prune.checks import check_number
    from deploy_prune.io import provenance, write_json
    from deploy_prune.latency.benchmark_app import kernel_precisions, load_counters, load_report, report_files

    check_number("--top", top, lo=0, integer=True)
    report, found = report_files(report)
    counters = counters or found
    if out is not None:
        _check_json_out(out, "an earlier benchmark-app result", lambda d: d.get("source") == "benchmark_app",
                        [("REPORT", report), ("--counters", counters)])
    rep = load_report(report)
    layers = load_counters(counters) if counters else {}
    kernels = kernel_precisions(counters) if counters else {}
    line = f"{report}: latency " + ", ".join(f"{k} {v:.3f} ms" for k, v in rep.latency_ms.items())
    if rep.throughput_per_s is not None:
        line += f"; throughput {rep.throughput_per_s:.1f} inferences/s" + (f" at batch {rep.batch}" if rep.batch else "")
    if rep.iterations is not None:
        line += f"; {rep.iterations} iterations"
    run = [rep.device or "", f"{rep.api} API" if rep.api else "",
           f"{rep.parallel_requests} infer request(s)" if rep.parallel_requests else "",
           *(f"{n} {d} stream(s)" for d, n in rep.streams.items())]
    console.print(line + (f" ({', '.join(r for r in run if r)})" if any(run) else ""), highlight=False)
    if rep.parallel_requests and rep.parallel_requests > 1:
        console.print(f"note: {rep.parallel_requests} parallel infer requests: each latency includes waiting behind the "
                      "others; for a figure comparable with deploy-prune benchmark run benchmark_app with -hint latency "
                      "(or -api sync)", highlight=False)
    if layers:
        console.print(f"{counters}: {len(layers)} executed layers, sum {sum(layers.values()):.3f} ms; kernels "
                      + ", ".join(f"{k} {n}" for k, n in kernels.items()), highlight=False)
        if {"bf16", "f16"} & set(kernels):
            console.print("note: OpenVINO ran layers in reduced precision (bf16/f16 kernels); for fp32 figures run "
                          "benchmark_app with -infer_precision f32", highlight=False)
        console.print(_slowest_layers(layers, top))
    if out is not None:
        write_json(out, {"source": "benchmark_app", "report_file": str(report), **rep.as_dict(),
                         "counters_file": str(counters) if counters else None, "layers_ms": layers,
                         "kernel_precisions": kernels, "provenance": provenance()})


def benchmark_table(res: dict[str, Any]) -> Table:
    """One table across models and targets, rows named by file name (by path where two files share
    a name); 'inf/s' is inferences per second at the batch from the median, 'x first' each model's
    median over its median on the first target."""
    first: dict[str, float] = {}
    for r in res["results"]:
        first.setdefault(r["model"], r["latency_ms"]["median"])
    labels = _model_labels(list(first))
    batches = sorted({str(_batch_of(r)) for r in res["results"]})
    mixed = len(batches) > 1  # a batch column then, else the batch in the title
    cols = ["model", "target", "backend", "precision", "threads", *(["batch"] if mixed else []),
            "median", "p90", "p95", "p99", "min", "IQR", "round CV", "runs", "inf/s", "x first"]
    table = Table(title="latency (ms)" if mixed else f"latency, batch {batches[0]} (ms)")
    for col in cols:
        # a long model path folds onto a second line rather than losing the part that tells it apart
        table.add_column(col, justify="left" if col in ("model", "target", "backend", "precision") else "right",
                         no_wrap=col != "model", overflow="fold" if col == "model" else "ellipsis")
    for r in res["results"]:
        s = r["latency_ms"]
        cells = {"model": labels[r["model"]], "target": r["target"], "backend": r["backend"],
                 "precision": str(r.get("precision", "fp32")), "threads": str(r["threads"]), "batch": str(_batch_of(r)),
                 **{k: _ms(s.get(k)) for k in ("median", "p90", "p95", "p99", "min")}, "IQR": _ms(s.get("iqr")),
                 "round CV": f"{100 * s['round_cv']:.1f}%", "runs": str(s["n"]),
                 "inf/s": "-" if r.get("throughput_per_s") is None else f"{r['throughput_per_s']:.1f}",
                 "x first": f"{s['median'] / first[r['model']]:.2f}"}
        table.add_row(*(cells[c] for c in cols))
    return table


def _model_labels(paths: list[str]) -> dict[str, str]:
    """Each model's file name, or where two share one, its path below the models' common directory
    (runs/a/model.onnx, runs/b/model.onnx -> a/model.onnx, b/model.onnx)."""
    names = [Path(m).name for m in paths]
    if len(set(names)) == len(names):
        return dict(zip(paths, names, strict=True))
    try:
        root = os.path.commonpath(paths)
    except ValueError:  # absolute beside relative paths
        return {m: m for m in paths}
    return {m: os.path.relpath(m, root) if root else m for m in paths}


def _batch_of(row: dict[str, Any]) -> Any:
    return row.get("batch", (row.get("input_shape") or ["?"])[0])


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def parse_options(items: list[str]) -> dict[str, Any]:
    """``-O KEY=VALUE`` pairs; values become int, float or bool where they read as one."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"-O {item!r} is not KEY=VALUE (e.g. -O iterations=15)")
        value: Any = raw.strip()
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"-O {item!r}: {key.strip()} must be a finite number, got {raw.strip()}")
        out[key.strip().replace("-", "_")] = value
    return out


def _parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None


@app.command()
@_errors
def sensitivity(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory for sensitivity.json and sensitivity.png")],
    weights: Annotated[str, typer.Option(help="checkpoint file or run directory")],
    model: CheckpointModelOpt = None,
    data: DataOpt = "digits",
    data_dir: DataDirOpt = None,
    image_size: ImageSizeOpt = None,
    criterion: Annotated[str, typer.Option(help="importance criterion ranking the channels")] = "taylor",
    ratios: Annotated[str, typer.Option(help="shares of a group's channels to remove, each in (0, 1)")] = "0.1,0.3,0.5,0.7,0.9",
    target: Annotated[str | None, typer.Option("--target", "-t", help="target (channel multiple; latency saved once profiled)")] = None,
    ignore: IgnoreOpt = "",
    val_samples: Annotated[int, typer.Option(help="size of the fixed validation subset")] = 1000,
    score_batches: Annotated[int, typer.Option(help="training batches used by the criterion")] = 8,
    bn_batches: Annotated[int, typer.Option(help="re-estimate BatchNorm statistics on this many scoring batches after "
                                            "each cut (0: the drop right after it); deeplsp's -O sensitivity_bn")] = 0,
    workers: Annotated[int, typer.Option(help="processes to split the evaluation over")] = 1,
    profiles: Annotated[Path, typer.Option(help="profiles directory (latency saved, with --target)")] = Path("profiles"),
    force: Annotated[bool, typer.Option("--force", help="use a profile made for another tool/backend version")] = False,
    trust_checkpoint: TrustOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Prune each group alone at several ratios and record the accuracy drop (no fine-tuning)."""
    from deploy_prune.data import load_data
    from deploy_prune.models import check_runs_on
    from deploy_prune.models.checkpoint import load_model
    from deploy_prune.sensitivity import SensitivityConfig, sensitivity_run
    from deploy_prune.target import load_target

    cfg = SensitivityConfig(criterion=criterion, ratios=_parse_floats(ratios, "--ratios"), val_samples=val_samples,
                            score_batches=score_batches, workers=workers, seed=seed, bn_batches=bn_batches)
    tgt = load_target(target) if target else None
    space = tgt.width_space() if tgt else 1
    bundle = load_data(data, _data_options(data_dir, image_size, seed))
    net, meta = load_model(weights, model, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                           trust=trust_checkpoint)
    check_runs_on(net, bundle.input_shape, bundle.num_classes)
    lut_profile = None
    if tgt is not None:
        from deploy_prune.latency.profile import find_profile

        spec = model or meta.get("model", {}).get("spec", "model")
        ign = [s for s in ignore.split(",") if s]
        lut_profile = find_profile(net, spec, bundle.input_shape, tgt, profiles, ign, force)
        if lut_profile is None:
            console.print(f"no latency profile of this model for target {tgt.name!r} under {profiles}/: latency_saved_ms "
                          f"stays empty (run deploy-prune profile --target {tgt.name} --weights {weights} first)")
    with _progress_bar(True) as bar:
        task = bar.add_task(f"sensitivity ({criterion})", total=None)
        res = sensitivity_run(out, net, bundle, cfg, ignore=[s for s in ignore.split(",") if s],
                              channel_multiple=space, meta=meta.get("model", {}), profile=lut_profile,
                              on_job=lambda i, n: bar.update(task, completed=i, total=n))
    worst = max(res["groups"], key=lambda g: g["entries"][len(g["entries"]) // 2]["accuracy_drop"])
    console.print(f"baseline accuracy {100 * res['baseline_accuracy']:.2f} % on {res['val_subset']} validation samples; "
                  f"{len(res['groups'])} groups x {len(cfg.ratios)} ratios in {res['seconds']['total']:.1f} s; "
                  f"most sensitive: {worst['name']}")
    console.print(f"wrote {out}/sensitivity.json and {out}/sensitivity.png")


@app.command()
@_errors
def profile(
    target: Annotated[str, typer.Option("--target", "-t", help="target name or YAML path")] = DEFAULT_TARGET,
    model: Annotated[str | None, typer.Option("--model", "-m", help="registered model or path/to/file.py:factory")] = None,
    weights: Annotated[str | None, typer.Option(help="checkpoint or run directory (architecture and input size)")] = None,
    input_size: Annotated[str | None, typer.Option(help="C,H,W (default: checkpoint's, target's, else 3x224x224 torchvision / 3x32x32)")] = None,
    num_classes: Annotated[int | None, typer.Option(help="classes of the output layer (default 10, or the checkpoint's)")] = None,
    grid: Annotated[int | None, typer.Option("--grid", help="channel step of the grid (default: about 8 points per dimension)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="profiles directory")] = Path("profiles"),
    validate: Annotated[int, typer.Option(help="measure N random pruned variants end to end against the prediction")] = 0,
    ignore: IgnoreOpt = "",
    lowrank: Annotated[bool, typer.Option("--lowrank", help="also time each conv factorised into two convs (for --method df)")] = False,
    seed: SeedOpt = 0,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Measure per-layer latency on the target and store the lookup table under profiles/."""
    from deploy_prune.latency.profile import ProfileSpec, resolve_model, run_profile
    from deploy_prune.target import load_target

    tgt = load_target(target)
    if validate < 0:
        raise UserError(f"--validate must be >= 0, got {validate}")
    if grid is not None and grid < 1:
        raise UserError(f"--grid must be a positive channel step, got {grid}")
    net, name, shape = resolve_model(model, weights, input_size, num_classes, tgt, trust_checkpoint)
    spec = ProfileSpec(net, name, shape, tgt, step=grid, ignore=[s for s in ignore.split(",") if s], lowrank=lowrank)
    with _progress_bar(True, eta=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        path, prof = run_profile(spec, out, validate=validate, seed=seed, progress=progress)
    from deploy_prune.latency.timing import quiet_of

    cal = prof["calibration"]
    console.print(f"{prof['configs_total']} configurations ({prof['configs_measured']} measured, {prof['configs_resumed']} resumed) "
                  f"in {prof['profile_seconds']:.1f} s; full model {quiet_of(prof['full_model']['latency_ms']):.3f} ms measured (quiet rounds), "
                  f"layer sum {prof['full_model']['layer_sum_ms']:.3f} ms; calibration a={cal['a']:.3f} b={cal['b']:.3f} ms")
    choice = prof.get("entry_choice")
    if choice:
        fits = ", ".join(f"{f} {c['calibration_rms_pct']:.1f} %" for f, c in choice["candidates"].items())
        console.print(f"layer entries: {choice['chosen']} (calibration residual, relative RMS: {fits})")
        for f, v in prof.get("validation", {}).get("calibrated_by_entry_field", {}).items():
            console.print(f"  validation (calibrated) predicting from {f}: median |error| {v['median_abs_error_pct']:.1f} %, "
                          f"{100 * v['within_10pct_share']:.0f} % within ±10 %")
    con = prof.get("contention") or {}
    if con.get("configs_remeasured"):
        unsteady = (f", or their rounds disagreed by more than {100 * con['unsteady_cv']:.0f} %; "
                    f"{con['configs_still_unsteady']} still unsteady") if "unsteady_cv" in con else ""
        console.print(f"{con['configs_remeasured']} configuration timings repeated because the machine ran slow while they were timed "
                      f"(sentinel more than {100 * con['band']:.0f} % above its quiet {con['quiet_sentinel_ms']:.4f} ms{unsteady}); "
                      f"{con['configs_still_contended']} still slow")
    if "validation" in prof:
        for kind in ("raw", "calibrated", "calibrated_anchored", "calibrated_same_session"):
            v = prof["validation"][kind]
            console.print(f"validation ({kind}, {v['n_variants']} variants): median |error| {v['median_abs_error_pct']:.1f} %, "
                          f"{100 * v['within_10pct_share']:.0f} % within ±10 %, Spearman {v['spearman']:.3f}")
    console.print(f"wrote {path}")


@app.command()
@_errors
def compress(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory (model.onnx, model.pt, report.*, checkpoints/)", rich_help_panel="Input and output")],
    weights: Annotated[str, typer.Option(help="trained checkpoint or run directory to compress", rich_help_panel="Input and output")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="architecture, if the checkpoint does not record it", rich_help_panel="Input and output")] = None,
    data: Annotated[str, typer.Option("--data", "-d", help="digits | fashion-mnist | imagefolder:PATH | cifar10:PATH | yolo:PATH/data.yaml | synthetic[:CxHxW]", rich_help_panel="Input and output")] = "digits",
    task: Annotated[str | None, typer.Option("--task", help="classify | detect: the task --data must hold (default: the data's own; yolo: is detect, with ultralytics' loss and mAP50-95)", rich_help_panel="Input and output")] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="directory of the dataset files (fashion-mnist)", rich_help_panel="Input and output")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="resize inputs to SIZE x SIZE", rich_help_panel="Input and output")] = None,
    train_limit: Annotated[int | None, typer.Option(help="use only N training samples (quick runs)", rich_help_panel="Input and output")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run from OUT/checkpoints", rich_help_panel="Input and output")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the compress run already in --out, once the new run finishes: until then the old run waits in OUT/.replaced-run/ and comes back if the new run fails (a killed run leaves it there; --resume finishes the replacement)", rich_help_panel="Input and output")] = False,
    log: Annotated[list[str], typer.Option("--log", help=LOG_HELP, rich_help_panel="Input and output")] = [],  # noqa: B006
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="allow loading a pickled model (runs code from the file)", rich_help_panel="Input and output")] = False,
    seed: Annotated[int, typer.Option("--seed", help="seed for splits, init and shuffling", rich_help_panel="Input and output")] = 0,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", help="budget: median latency on the target, in ms", rich_help_panel="Budget")] = None,
    latency_ratio: Annotated[float | None, typer.Option("--latency-ratio", help="budget: share of the measured baseline latency", rich_help_panel="Budget")] = None,
    flops_ratio: Annotated[float | None, typer.Option("--flops-ratio", help="budget: share of the baseline FLOPs (MACs)", rich_help_panel="Budget")] = None,
    params_ratio: Annotated[float | None, typer.Option("--params-ratio", help="budget: share of the baseline parameters", rich_help_panel="Budget")] = None,
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="budget of unstructured methods: share of the weights zeroed", rich_help_panel="Budget")] = None,
    keep_ratio: Annotated[float | None, typer.Option("--keep-ratio", help="budget: share of every group's channels kept (the budget when none is given: 0.5)", rich_help_panel="Budget")] = None,
    method: Annotated[str, typer.Option(help="compression method (deploy-prune methods)", rich_help_panel="Method")] = "deeplsp",
    criterion: Annotated[str | None, typer.Option(help="importance criterion ranking channels [default: the method's; deeplsp: taylor]", rich_help_panel="Method")] = None,
    amount: Annotated[str | None, typer.Option(help="unstructured share of remaining weights masked, or 'adaptive' [default: the method's; deeplsp: 0.05]", rich_help_panel="Method")] = None,
    tolerance: Annotated[float | None, typer.Option(help="--amount adaptive: accuracy drop allowed per layer (0.005 = 0.5 points) [default: 0.005]", rich_help_panel="Method")] = None,
    steps: Annotated[int | None, typer.Option(help="structured pruning steps (default: the method's)", rich_help_panel="Method")] = None,
    df_mode: Annotated[str | None, typer.Option(help="df (-O mode=): hybrid (filters + ranks), filters (DML-S only) or ranks (DTL-S only) [default: hybrid]", rich_help_panel="Method")] = None,
    df_epochs: Annotated[float | None, typer.Option(help="df (-O df_epochs=): epochs of mask/threshold learning (more, up to 2x, while off budget) [default: 2]", rich_help_panel="Method")] = None,
    df_lr: Annotated[float | None, typer.Option(help="df (-O df_lr=): Adam learning rate of the masks and thresholds [default: 0.01]", rich_help_panel="Method")] = None,
    df_beta: Annotated[float | None, typer.Option(help="df (-O beta=): rise of the sigmoid scale mu per epoch (paper: 4; alpha = 50, mu0 = 5) [default: 4]", rich_help_panel="Method")] = None,
    df_c: Annotated[float | None, typer.Option(help="df (-O c=): C in the rank estimate's tau = C / sigma_1 (paper: 2) [default: 2]", rich_help_panel="Method")] = None,
    option: Annotated[list[str], typer.Option("--option", "-O", help="a method setting KEY=VALUE (repeatable), e.g. -O iterations=15 -O flow=gf; see deploy-prune methods", rich_help_panel="Method")] = [],  # noqa: B006
    nm: Annotated[str | None, typer.Option("--nm", help="N:M semi-structured masks (e.g. 2:4, for sparse tensor cores) on top of the method's", rich_help_panel="Method")] = None,
    sensitivity: Annotated[str | None, typer.Option(help="reuse this sensitivity.json (or its run directory)", rich_help_panel="Method")] = None,
    ignore: Annotated[str, typer.Option("--ignore", help="comma-separated layer names never to prune", rich_help_panel="Method")] = "",
    workers: Annotated[int, typer.Option(help="processes for the sensitivity analysis", rich_help_panel="Method")] = 1,
    step_fraction: Annotated[float, typer.Option(help="share of an epoch of fine-tuning after each step", rich_help_panel="Fine-tuning")] = 0.25,
    epochs: Annotated[int, typer.Option(help="final fine-tuning epochs", rich_help_panel="Fine-tuning")] = 3,
    kd: Annotated[bool, typer.Option("--kd/--no-kd", help="distil from the unpruned model during fine-tuning", rich_help_panel="Fine-tuning")] = True,
    lr: Annotated[float, typer.Option(help="fine-tuning learning rate (cosine schedule)", rich_help_panel="Fine-tuning")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="fine-tuning batch size", rich_help_panel="Fine-tuning")] = 128,
    target: Annotated[str, typer.Option("--target", "-t", help="target name or YAML path where latency is measured", rich_help_panel="Target and measurement")] = DEFAULT_TARGET,
    profiles: Annotated[Path, typer.Option(help="profiles directory (the LUT is made there when missing)", rich_help_panel="Target and measurement")] = Path("profiles"),
    force: Annotated[bool, typer.Option("--force", help="use a profile made for another tool/backend version", rich_help_panel="Target and measurement")] = False,
) -> None:
    """Prune to a budget measured on the target, fine-tune, export, and report."""
    from deploy_prune.pipeline import CompressConfig
    from deploy_prune.pipeline import compress as run_compress

    explicit = parse_options(option)
    # DF's flags are aliases of its -O settings, for df alone: SAP has a beta of its own.
    df_flags = {k: v for k, v in (("mode", df_mode), ("df_epochs", df_epochs), ("df_lr", df_lr), ("beta", df_beta),
                                  ("c", df_c)) if v is not None}
    if df_flags and method != "df":
        raise UserError(f"--df-* flags are settings of --method df, not {method}; give {method}'s settings as -O KEY=VALUE")
    cfg = CompressConfig(
        out=out, weights=weights, model=model, data=data, task=task,
        data_options=_data_options(data_dir, image_size, seed, train_limit=train_limit), target=target,
        latency_ms=latency_ms, latency_ratio=latency_ratio, flops_ratio=flops_ratio, params_ratio=params_ratio,
        keep_ratio=keep_ratio, sparsity=sparsity, nm=nm, method=method, criterion=criterion,
        method_options={**df_flags, **explicit}, amount=amount, tolerance=tolerance, steps=steps,
        step_fraction=step_fraction, epochs=epochs, kd=kd, lr=lr, batch_size=batch_size, sensitivity=sensitivity,
        ignore=[s for s in ignore.split(",") if s], workers=workers, profiles=profiles, force_profile=force,
        trust=trust_checkpoint, resume=resume, overwrite=overwrite, seed=seed, log=log,
    )
    try:
        if is_main():  # under torchrun one rank reports
            with _StageProgress() as shown:
                rep = run_compress(cfg, progress=shown)
        else:
            rep = run_compress(cfg)
    except KeyboardInterrupt:
        from deploy_prune.pipeline.stages import ASIDE

        msg = f"interrupted: the last finished stage is kept in {out}/checkpoints; run the same command with --resume to continue"
        if (out / ASIDE).is_dir():
            msg += f" (--resume in place of --overwrite: the run it replaces waits in {out}/{ASIDE} until then)"
        err_console.print(msg)
        raise typer.Exit(130) from None
    if is_main():  # under torchrun every rank returns the report; one prints it
        _print_compress_table(rep)
    if not rep["met_budget"]:
        raise typer.Exit(1)


class _StageProgress:
    """compress's progress on stderr: its lines, and a bar with an ETA for each counted step
    (profile, sensitivity, measurement rounds, fine-tuning) while it runs. Under torchrun only
    rank 0 reports."""

    def __init__(self) -> None:
        self.bars = _progress_bar(True, eta=True, transient=True)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _StageProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def __call__(self, msg: str) -> None:
        self.bars.console.print(f"[dim]{msg}[/]", highlight=False, soft_wrap=True)

    def count(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            for old in self.tasks.values():  # one bar at a time: a new step ends the last
                self.bars.remove_task(old)
            self.tasks = {task: self.bars.add_task(task, total=total)}
        self.bars.update(self.tasks[task], completed=done, total=total)
        if done >= total:
            self.bars.remove_task(self.tasks.pop(task))


def _print_compress_table(rep: dict[str, Any]) -> None:
    b, f = rep["baseline"], rep["final"]
    from rich import box

    from deploy_prune.latency.timing import quiet_of

    table = Table(title=f"{rep['model']['spec']} on {rep['target']['name']}: {rep['method']['name']}", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False)
    # "quiet ms" is the figure the budget was judged on (latency.timing); median and p90 as measured
    metric = (rep.get("metric") or {}).get("name") or "accuracy"
    for col in ("", f"{'acc' if metric == 'accuracy' else metric} %", "quiet ms", "median ms", "p90 ms", "pred ms", "MFLOPs", "params k", "zeros %"):
        table.add_column(col, justify="right", no_wrap=True)

    def row(name: str, r: dict[str, Any]) -> None:
        lat = r.get("latency_ms") or {}
        pred = r.get("predicted_latency_ms")
        quiet = quiet_of(lat) if lat.get("median") is not None else float("nan")
        table.add_row(name, f"{100 * r['accuracy']:.2f}", f"{quiet:.3f}", f"{lat.get('median', float('nan')):.3f}",
                      f"{lat.get('p90', float('nan')):.3f}", "-" if pred is None else f"{pred:.3f}",
                      f"{r['flops'] / 1e6:.2f}", f"{r['params'] / 1e3:.1f}", f"{100 * r.get('sparsity', 0):.1f}")

    row("baseline", b)
    row("final", f)
    console.print(table)
    status = "[green]MET[/]" if rep["met_budget"] else "[bold red]NOT MET[/]"
    console.print(f"budget {rep['budget']['kind']} = {rep['budget']['value']}: {status} ({rep['budget_note']})", highlight=False)
    for note in rep["notes"]:
        console.print(f"note: {note}", highlight=False)
    console.print(f"wrote {rep['run_dir']}/: model.onnx, model.pt, model.pt2, report.json, report.md, report.html")


@app.command()
@_errors
def compare(
    methods: Annotated[str, typer.Option("--methods", help="comma-separated methods (deploy-prune methods), or 'all'")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory: one run per method, leaderboard.json/.md/.png")],
    weights: Annotated[str, typer.Option(help="trained checkpoint or run directory to compress")],
    data: DataOpt = "digits",
    target: Annotated[str, typer.Option("--target", "-t", help="target name or YAML path where latency is measured")] = DEFAULT_TARGET,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", help="budget for methods that take it")] = None,
    latency_ratio: Annotated[float | None, typer.Option("--latency-ratio", help="budget for methods that take it")] = None,
    flops_ratio: Annotated[float | None, typer.Option("--flops-ratio", help="budget for methods that take it")] = None,
    params_ratio: Annotated[float | None, typer.Option("--params-ratio", help="budget for methods that take it")] = None,
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="budget of the unstructured methods")] = None,
    epochs: Annotated[int, typer.Option(help="final fine-tuning epochs, the same for every method")] = 3,
    lr: Annotated[float, typer.Option(help="fine-tuning learning rate")] = 0.01,
    kd: Annotated[bool, typer.Option("--kd/--no-kd", help="distil from the unpruned model during fine-tuning")] = True,
    train_limit: Annotated[int | None, typer.Option(help="use only N training samples (quick runs)")] = None,
    profiles: Annotated[Path, typer.Option(help="profiles directory shared by the runs")] = Path("profiles"),
    option: Annotated[list[str], typer.Option("--option", "-O", help="METHOD:KEY=VALUE setting of one method (repeatable)")] = [],  # noqa: B006
    timeout_min: Annotated[float | None, typer.Option(help="give up on a method after this many minutes")] = None,
    seed: SeedOpt = 0,
) -> None:
    """Run several methods on the same model, data, target and fine-tuning; write a leaderboard."""
    from deploy_prune.compare import CompareConfig, parse_method_options
    from deploy_prune.compare import compare as run_compare
    from deploy_prune.methods import METHODS, check_options

    names = METHODS.names() if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        METHODS.get(name)
    opts = {name: parse_options(kvs) for name, kvs in parse_method_options(option, names).items()}
    for name, kv in opts.items():
        check_options(name, kv)
    budgets = {k: v for k, v in (("latency_ms", latency_ms), ("latency_ratio", latency_ratio), ("flops_ratio", flops_ratio),
                                 ("params_ratio", params_ratio), ("sparsity", sparsity)) if v is not None}
    settings = {"epochs": epochs, "lr": lr, "kd": kd, "profiles": profiles, "seed": seed,
                "data_options": _data_options(None, None, seed, train_limit=train_limit)}
    cfg = CompareConfig(methods=names, out=out, weights=weights, budgets=budgets, target=target, data=data, settings=settings,
                        options=opts, timeout_s=timeout_min * 60 if timeout_min else None)
    with _progress_bar(True) as bar:
        task = bar.add_task("methods", total=len(names))
        board = run_compare(cfg, on_method=lambda m, i, n: bar.update(task, completed=i, description=f"compress --method {m}"))
        bar.update(task, completed=len(names), description="measured together")
    table = Table(title=f"leaderboard on {target}")
    for col in ("method", "kind", "status", "accuracy", "sparsity", "FLOPs kept", "latency ms", "speed-up", "budget met"):
        table.add_column(col)
    for r in board["rows"]:
        if r["status"] != "ok":
            table.add_row(r["method"], r.get("kind", ""), f"failed: {r['reason']}", "", "", "", "", "", "")
            continue
        lat = r.get("latency_ms") or {}
        table.add_row(r["method"], r["kind"], "ok", f"{100 * r['accuracy']:.2f} %", f"{100 * r['sparsity']:.1f} %",
                      f"{r['flops_ratio']:.3f}", f"{lat.get('median', float('nan')):.3f}", f"{r.get('speedup', float('nan')):.2f}x",
                      "yes" if r["met_budget"] else "NO")
    console.print(table)
    console.print(f"wrote {out}/leaderboard.json, leaderboard.md, leaderboard.png")
    if any(r["status"] != "ok" for r in board["rows"]):
        raise typer.Exit(1)


@app.command("report")
@_errors
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="compress run directory (or its report.json)")],
    log: Annotated[list[str], typer.Option("--log", help=LOG_HELP)] = [],  # noqa: B006
) -> None:
    """Regenerate report.md, report.html and the plots from a run's report.json (and record it with --log)."""
    from deploy_prune.report import load_report, report_path, write_reports
    from deploy_prune.report.tracking import parse_trackers, record

    trackers = parse_trackers(log)
    paths = write_reports(run_dir)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    path = report_path(run_dir)
    for line in record(trackers, load_report(path), path.parent):
        console.print(f"recorded in {line}")


@app.command()
@_errors
def gate(
    report: Annotated[Path, typer.Argument(help="report.json of a compress run (or its directory)")],
    max_latency_ms: Annotated[float | None, typer.Option("--max-latency-ms", help="fail above this median latency (ms)")] = None,
    min_accuracy: Annotated[float | None, typer.Option("--min-accuracy", help="fail below this accuracy (fraction, 0.9 = 90 %)")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option("--max-accuracy-drop", help="fail if baseline - final accuracy exceeds this (fraction, 0.01 = 1 point)")] = None,
    remeasure: Annotated[bool, typer.Option("--remeasure", help="measure model.onnx again on --target instead of trusting the report")] = False,
    target: Annotated[str | None, typer.Option("--target", "-t", help="target to re-measure on (with --remeasure)")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="write JUnit XML here for CI systems")] = None,
) -> None:
    """Exit 0 when every check holds, 1 when any fails (one line per check); for CI."""
    from deploy_prune.report.gate import format_result, run_gate

    if remeasure and not target:
        raise UserError("--remeasure needs --target T (where to measure model.onnx)")
    if target and not remeasure:
        raise UserError("--target is only used with --remeasure; add --remeasure or drop --target")
    res = run_gate(report, max_latency_ms=max_latency_ms, min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop,
                   remeasure_target=target if remeasure else None, junit=junit)
    for line in format_result(res):
        console.print(line, highlight=False, markup=False, soft_wrap=True)  # one line per check, as the report's text
    if not res.passed:
        raise typer.Exit(1)


@app.command()
def methods() -> None:
    """List the registered compression methods and importance criteria."""
    from deploy_prune.importance import CRITERIA
    from deploy_prune.methods import METHODS

    for title, reg in (("methods (--method)", METHODS), ("criteria (--criterion)", CRITERIA)):
        table = Table(title=title)
        table.add_column("name")
        table.add_column("description")
        if reg is METHODS:
            for col in ("kind", "lowers dense latency", "budgets"):
                table.add_column(col)
        for name in reg.names():
            extra: list[str] = []
            if reg is METHODS:
                cls: Any = METHODS.get(name)
                extra = [cls.kind, "yes" if cls.lowers_latency else "no", ", ".join(k.replace("_", "-") for k in cls.budget_kinds)]
            table.add_row(name, reg.help(name), *extra)
        console.print(table)


@app.command()
@_errors
def targets() -> None:
    """List the targets found on the lookup path."""
    from deploy_prune.config import list_targets
    from deploy_prune.target import load_target

    table = Table(title="targets")
    for col in ("name", "backend", "device", "threads", "channel multiple", "description", "file"):
        table.add_column(col)
    for name, path in list_targets().items():
        t = load_target(str(path))
        multiple = f"{t.channel_multiple}{' (auto)' if t.channel_multiple_from else ''}"
        table.add_row(name, t.backend, t.device, str(t.threads or "all"), multiple, t.description, str(path))
    console.print(table)


@app.command()
def models() -> None:
    """List the registered models."""
    from deploy_prune.models import MODELS

    table = Table(title="models (also: --model path/to/file.py:factory)")
    table.add_column("name")
    table.add_column("description")
    for name in MODELS.names():
        table.add_row(name, MODELS.help(name))
    console.print(table)


@app.command()
@_errors
def doctor(json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """Versions, which backends can run here, which datasets and targets are found."""
    from deploy_prune.doctor import doctor_report

    rep = doctor_report()
    if json_out:
        sys.stdout.write(json.dumps(rep, indent=2, allow_nan=False) + "\n")
        return
    console.print(f"deploy-prune {rep['deploy_prune']}  python {rep['python']}  torch {rep['torch']}  "
                  f"CUDA: {rep['cuda']}")
    console.print(f"CPU: {rep['cpu']} ({rep['cpu_count']} cores)")
    console.print("packages: " + ", ".join(f"{k} {v or '[red]missing[/]'}" for k, v in rep["packages"].items()))
    table = Table(title="backends")
    for col in ("backend", "usable", "detail", "versions"):
        table.add_column(col)
    for name, b in rep["backends"].items():
        table.add_row(name, "[green]yes[/]" if b["available"] else "[red]no[/]", b["detail"],
                      ", ".join(f"{k} {v}" for k, v in b["versions"].items()))
    console.print(table)
    table = Table(title="datasets")
    table.add_column("dataset")
    table.add_column("where")
    for name, where in rep["datasets"].items():
        table.add_row(name, where)
    console.print(table)
    console.print("targets: " + ", ".join(rep["targets"]))


agent_app = typer.Typer(no_args_is_help=True, help="Run the remote profiling agent on a device.")
app.add_typer(agent_app, name="agent")


@agent_app.command("serve")
@_errors
def agent_serve(
    backend: Annotated[str, typer.Option(help="backend that times the models sent to this agent")] = "onnxruntime",
    host: Annotated[str, typer.Option(help="address to listen on (keep 127.0.0.1 and tunnel over SSH across networks)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8765,
    token_env: Annotated[str, typer.Option("--token-env", help="environment variable holding the shared token")] = "DEPLOY_PRUNE_AGENT_TOKEN",
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="largest request accepted, in MiB")] = 256.0,
) -> None:
    """Serve GET /info and POST /time so that profile/benchmark/compress can measure on this device."""
    from deploy_prune.agent import serve

    serve(backend=backend, host=host, port=port, token_env=token_env, max_body_mb=max_body_mb)


def _progress_bar(enabled: bool, eta: bool = False, transient: bool = False) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if eta:
        cols += [TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*cols, disable=not enabled, console=err_console, transient=transient)


def version_callback(value: bool) -> None:
    if value:
        console.print(f"deploy-prune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version")] = False,
) -> None:
    """Prune vision models to a latency budget measured on the target device."""


if __name__ == "__main__":
    app()
