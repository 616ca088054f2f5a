"""The deployed artefact of an int8 target: ONNX Runtime static quantization, timed and run as shipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from deploy_prune.cli import app
from deploy_prune.config import parse_target_dict
from deploy_prune.errors import UserError
from deploy_prune.export import onnx_bytes
from deploy_prune.latency.measure import LocalMeasurer
from deploy_prune.quantize import deploy_onnx, is_quantized
from deploy_prune.target import load_target

INT8 = dict(name="q8", backend="onnxruntime", precision="int8", threads=1, warmup=2, repeats=10, rounds=2, min_time_s=0.0)


@pytest.fixture(scope="module")
def fp32() -> bytes:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    return onnx_bytes(m, (3, 16, 16), 1)


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]  # type: ignore[no-any-return]


def test_int8_quantizes_to_qdq_and_stays_close(fp32: bytes) -> None:
    rng = np.random.default_rng(1)
    cal = [rng.standard_normal((1, 3, 16, 16), dtype=np.float32) for _ in range(8)]
    q = deploy_onnx(fp32, parse_target_dict(INT8), cal)
    ops = {n.op_type for n in onnx.load_from_string(q).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and is_quantized(q) and not is_quantized(fp32)
    x = rng.standard_normal((1, 3, 16, 16), dtype=np.float32)
    ref, got = _run(fp32, x), _run(q, x)
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max()  # int8 error, not a different model
    assert deploy_onnx(q, parse_target_dict(INT8)) == q  # already quantized: run as it is
    assert deploy_onnx(fp32, parse_target_dict({**INT8, "precision": "fp32"})) == fp32


@pytest.mark.parametrize(("flags", "full_range"), [({"avx2"}, False), ({"avx2", "avx512_vnni"}, True), ({"avx2", "avx_vnni"}, True)])
def test_int8_weights_take_7_bits_on_an_x86_cpu_without_vnni(fp32: bytes, monkeypatch: pytest.MonkeyPatch,
                                                             flags: set[str], full_range: bool) -> None:
    """Without VNNI, ORT's U8S8 kernels add u8*s8 product pairs in int16 and saturate at full
    range: an AVX2 CPU gets 7-bit weights, one with VNNI the full 8 bits."""
    import platform

    from deploy_prune import io

    monkeypatch.setattr(io, "cpu_flags", lambda: flags)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    rng = np.random.default_rng(1)
    q = deploy_onnx(fp32, parse_target_dict(INT8), [rng.standard_normal((1, 3, 16, 16), dtype=np.float32) for _ in range(4)])
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load_from_string(q).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) == 4]
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert (peak > 64) == full_range, peak


def test_the_measurer_times_the_quantized_model(fp32: bytes) -> None:
    m = LocalMeasurer(parse_target_dict(INT8))
    stats = m.time({"model": fp32})["model"]
    assert stats.n >= 10 and stats.median > 0
    assert m.info()["precision"] == "int8"
    assert is_quantized(m.deployed(fp32)) and m.deployed(fp32) == m.deployed(fp32)  # quantized once, cached


@pytest.mark.parametrize("change, message", [
    (dict(calibration={"method": "kl"}), "calibration.method"),
    (dict(calibration={"samples": 0}), "calibration.samples"),
    (dict(calibration={"batches": 8}), "unknown key 'calibration.batches'"),
    (dict(precision="int4"), "precision"),
])
def test_bad_int8_targets_are_refused(change: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        parse_target_dict({**INT8, **change})


def test_a_precision_the_backend_has_no_path_for(fp32: bytes) -> None:
    with pytest.raises(UserError, match="backend onnxruntime has no fp16 path .* no fp16 kernels"):
        deploy_onnx(fp32, parse_target_dict({**INT8, "precision": "fp16"}))
    with pytest.raises(UserError, match=r"backend torch has no int8 path \(it runs fp32, bf16, fp16\): PyTorch"):
        deploy_onnx(fp32, parse_target_dict({**INT8, "backend": "torch"}))
    with pytest.raises(UserError, match="give calibration data"):
        deploy_onnx(fp32, parse_target_dict(INT8), [])


def test_tensorrt_int8_is_symmetric_qdq_and_fp16_the_fp32_graph(fp32: bytes) -> None:
    """TensorRT's explicit quantization takes Q/DQ with zero point 0 only; its fp16 (and torch's
    fp16/bf16) is the fp32 graph, marked as deployed, which the backend converts itself."""
    rng = np.random.default_rng(2)
    cal = [rng.standard_normal((1, 3, 16, 16), dtype=np.float32) for _ in range(8)]
    q = onnx.load_from_string(deploy_onnx(fp32, parse_target_dict({**INT8, "backend": "tensorrt", "device": "cuda"}), cal))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    zero_points = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    ort_q = onnx.load_from_string(deploy_onnx(fp32, parse_target_dict(INT8), cal))  # asymmetric uint8 activations
    assert any(onnx.numpy_helper.to_array(t).dtype == np.uint8 for t in ort_q.graph.initializer)
    for backend, precision, device in [("tensorrt", "fp16", "cuda"), ("torch", "fp16", "cuda"), ("torch", "bf16", "cpu")]:
        out = deploy_onnx(fp32, parse_target_dict({**INT8, "backend": backend, "precision": precision, "device": device}))
        proto = onnx.load_from_string(out)
        assert proto.graph == onnx.load_from_string(fp32).graph and is_quantized(out)
        assert {p.key: p.value for p in proto.metadata_props}["deploy_prune.precision"] == precision


def test_benchmark_shows_both_precisions_in_one_table(fp32: bytes, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(fp32)
    assert load_target("cpu-ort-int8-1t").precision == "int8"
    res = CliRunner().invoke(app, ["benchmark", str(path), "--target", "cpu-ort-1t", "--target", "cpu-ort-int8-1t",
                                   "--repeats", "20", "--rounds", "2", "--warmup", "2", "--min-time", "0", "--json"])
    assert res.exit_code == 0, res.output
    rows = __import__("json").loads(res.output)["results"]
    assert [(r["target"], r["precision"]) for r in rows] == [("cpu-ort-1t", "fp32"), ("cpu-ort-int8-1t", "int8")]


def test_compress_to_the_int8_latency(tiny_run: Path, tmp_path: Path) -> None:
    """The closed loop measures the int8 model; the report scores fp32 and deployed side by side.
    (The tiny CNN at int8 is mostly fixed cost: its narrowest widths measure ~0.9 of it, hence 0.95.)"""
    from deploy_prune.data import DataOptions
    from deploy_prune.pipeline import CompressConfig, compress
    from deploy_prune.report import load_report
    from deploy_prune.report.gate import budget_verdict, run_gate, validate_report

    target = tmp_path / "q8.yaml"
    target.write_text("name: q8\nbackend: onnxruntime\nprecision: int8\nthreads: 1\nchannel_multiple: 8\n"
                      "calibration: {method: minmax, samples: 64}\nwarmup: 3\nrepeats: 30\nrounds: 3\nmin_time_s: 0.05\n")
    out = tmp_path / "run"

    class Progress:  # what the CLI's bars are fed: lines, and counted work with its total
        def __init__(self) -> None:
            self.lines: list[str] = []
            self.done: dict[str, tuple[int, int]] = {}

        def __call__(self, msg: str) -> None:
            self.lines.append(msg)

        def count(self, task: str, done: int, total: int) -> None:
            self.done[task] = (done, total)

    shown = Progress()
    rep = compress(CompressConfig(out=out, weights=str(tiny_run), data="digits", data_options=DataOptions(train_limit=300),
                                  target=str(target), latency_ratio=0.95, method="uniform", epochs=1, step_fraction=0.5,
                                  score_batches=2, batch_size=64, profiles=tmp_path / "profiles"), progress=shown)
    assert shown.done["measure"] == (3, 3) and shown.done["profile: layers"][0] == shown.done["profile: layers"][1]
    assert any(t.startswith("fine-tune ") and d == n for t, (d, n) in shown.done.items()), shown.done
    assert any(line.startswith("profiling q8: no latency table") for line in shown.lines)
    assert rep["target"]["precision"] == "int8" and rep["measurer"]["precision"] == "int8"
    base, fin = rep["baseline"], rep["final"]
    assert base["deployed"]["precision"] == "int8"
    assert fin["deployed"]["fp32_latency_ms"]["median"] > 0 and fin["deployed"]["latency_ms"]["median"] > 0
    assert abs(base["deployed"]["accuracy"] - base["accuracy"]) < 0.05  # calibrated on real data: close to fp32
    art = Path(fin["deployed"]["path"])
    assert art == out / "model.int8.onnx" and is_quantized(art.read_bytes())
    prof = next((tmp_path / "profiles" / "q8").glob("*.json"))
    assert __import__("json").loads(prof.read_text())["measurer"]["precision"] == "int8"
    gate = run_gate(out, max_accuracy_drop=1.0)
    assert gate.passed and "deployed int8" in gate.checks[0].message
    v = rep["final"]["verdict"]  # what the verdict was decided on: the rounds of both final measurements
    assert len(v["candidate_round_medians"]) == len(v["baseline_round_medians"]) == 2 and v["limit"] == 0.95
    assert v["candidate_round_medians"][1] == fin["latency_ms"]["round_medians"]
    verdict = budget_verdict(validate_report(load_report(out)))  # recomputed from report.json as written
    assert verdict.exact and verdict.met is rep["met_budget"]
    assert "(int8, deployed)" in (out / "report.md").read_text()
    # A device behind an agent scores nothing here: the gate says it judges the fp32 metric.
    report = out / "report.json"
    data = __import__("json").loads(report.read_text())
    del data["final"]["deployed"]["accuracy"], data["baseline"]["deployed"]["accuracy"]
    report.write_text(__import__("json").dumps(data))
    gate = run_gate(out, max_accuracy_drop=1.0)
    assert gate.passed and "(fp32; the int8 artefact was not scored)" in gate.checks[0].message


@pytest.mark.parametrize("precision, quantized", [("int8", True), ("bf16", False)])
def test_openvino_deploys_int8_with_nncf_and_bf16_as_is(fp32: bytes, precision: str, quantized: bool) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from deploy_prune.quantize import DeployedModule

    target = parse_target_dict({**INT8, "backend": "openvino", "precision": precision})
    rng = np.random.default_rng(2)
    art = deploy_onnx(fp32, target, [rng.standard_normal((1, 3, 16, 16), dtype=np.float32) for _ in range(16)])
    ops = {n.op_type for n in onnx.load_from_string(art).graph.node}
    assert ("QuantizeLinear" in ops) is quantized
    x = torch.from_numpy(rng.standard_normal((3, 3, 16, 16), dtype=np.float32))
    ref = torch.from_numpy(_run(fp32, x[:1].numpy()))
    got = DeployedModule(art, target)(x)  # three inputs through a batch-1 artefact
    assert got.shape == (3, 10)
    assert (got[:1] - ref).abs().max() < 0.1 * ref.abs().max()
    assert LocalMeasurer(target).time({"m": fp32})["m"].median > 0


def test_calibration_inputs_come_from_the_training_batches() -> None:
    from deploy_prune.quantize import calibration_inputs

    target = parse_target_dict({**INT8, "calibration": {"samples": 5}})
    batches = [(torch.randn(3, 1, 4, 4), torch.zeros(3)), (torch.randn(3, 1, 4, 4), torch.zeros(3))]
    got = calibration_inputs(batches, target)
    assert len(got) == 5 and all(x.shape == (1, 1, 4, 4) for x in got)
    assert len(calibration_inputs(batches[:1], target)) == 3  # fewer than asked: what there is (compress notes it)
    with pytest.raises(UserError, match="calibration needs input tensors"):
        calibration_inputs([{"image": 1}], target)
    with pytest.raises(UserError, match="gave no calibration inputs"):
        calibration_inputs([], target)


def test_a_graph_with_two_inputs_is_timed_at_int8() -> None:
    """A profile's one-layer graph of a residual add feeds two inputs; timing calibrates both."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "r"], ["y"])], "res",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    m = LocalMeasurer(parse_target_dict(INT8))
    assert is_quantized(m.deployed(model))
    assert m.time({"g": model})["g"].median > 0


def test_an_int8_entry_runs_channels_last_as_inside_the_model() -> None:
    """ORT runs int8 convs channels-last; a one-layer graph pays a transpose in and out that a
    layer between two int8 layers does not. The entry drops them and computes the same."""
    from deploy_prune.backends.onnxruntime import optimized_graph, without_layout_transposes
    from deploy_prune.latency import lut
    from deploy_prune.latency.profile import layer_entry_graph
    from deploy_prune.quantize import in_model_view

    target = parse_target_dict(INT8)
    fam = lut.Family(op="conv", kernel=(3, 3), padding=(1, 1), in_hw=(16, 16), batch=1, act="Relu")
    quantized = in_model_view(deploy_onnx(lut.layer_graph(fam, 16, 32), target))
    entry = layer_entry_graph(lut.layer_graph(fam, 16, 32), target)
    assert entry == without_layout_transposes(quantized)
    assert [n.op_type for n in optimized_graph(quantized).graph.node] == ["Transpose", "QLinearConv", "Transpose"]
    assert [n.op_type for n in optimized_graph(entry).graph.node] == ["QLinearConv"]
    s0 = ort.InferenceSession(quantized, providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(entry, providers=["CPUExecutionProvider"])
    assert s1.get_inputs()[0].shape == [1, 16, 16, 16] and s1.get_outputs()[0].shape == [1, 16, 16, 32]
    x = np.random.default_rng(0).integers(0, 255, (1, 16, 16, 16), dtype=np.uint8)
    nchw = s0.run(None, {s0.get_inputs()[0].name: x})[0]
    nhwc = s1.run(None, {s1.get_inputs()[0].name: x.transpose(0, 2, 3, 1)})[0]
    assert np.array_equal(nhwc.transpose(0, 3, 1, 2), nchw)
