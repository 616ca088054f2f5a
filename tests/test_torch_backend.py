"""The torch backend (ONNX -> onnx2torch -> eager / torch.compile) and per-layer counters of the CPU backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_prune.backends import get_backend, layer_times
from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.export import onnx_bytes
from deploy_prune.models import build_model
from deploy_prune.target import load_target

pytest.importorskip("onnx2torch")

FAST = Protocol(warmup=2, repeats=6, rounds=2, min_time_s=0.0)


def _target(**kw: object) -> Target:
    base: dict[str, object] = dict(name="torch-fast", backend="torch", threads=1, protocol=FAST)
    base.update(kw)
    return Target(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, bytes]:
    torch.manual_seed(0)
    m = build_model("resnet20", 10, 1).eval()
    return m, onnx_bytes(m, (1, 16, 16), 1)


def _feed(sess: object) -> dict[str, np.ndarray]:
    name, shape = sess.inputs[0]  # type: ignore[attr-defined]
    return {name: np.random.default_rng(0).random(shape, dtype=np.float32)}


def test_torch_backend_matches_the_model_and_times_it(resnet: tuple[torch.nn.Module, bytes]) -> None:
    model, proto = resnet
    sess = get_backend("torch").load(proto, _target(), per_layer=True)
    feed = _feed(sess)
    assert sess.inputs[0][1] == [1, 1, 16, 16]
    out = sess.run(feed)[0]
    np.testing.assert_allclose(out, model(torch.from_numpy(feed[sess.inputs[0][0]])).detach().numpy(), rtol=1e-4, atol=1e-5)
    threads = torch.get_num_threads()
    assert sess.time_once(feed) > 0
    assert torch.get_num_threads() == threads  # the timed run's thread pin does not leak into training
    layers = layer_times(sess, feed, runs=3)
    convs = [n for n in layers if "Conv" in n]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert all(v > 0 for v in layers.values())


@pytest.mark.slow  # 20-33 s on 2 cores; make test-all runs it
def test_torch_compile_matches_eager(resnet: tuple[torch.nn.Module, bytes]) -> None:
    model, proto = resnet
    sess = get_backend("torch").load(proto, _target(options={"torch": {"compile": True}}))
    feed = _feed(sess)
    np.testing.assert_allclose(sess.run(feed)[0], model(torch.from_numpy(feed[sess.inputs[0][0]])).detach().numpy(),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="per-layer times need eager torch"):
        get_backend("torch").load(proto, _target(options={"torch": {"compile": True}}), per_layer=True)


def test_torch_backend_bad_input(resnet: tuple[torch.nn.Module, bytes]) -> None:
    _, proto = resnet
    backend = get_backend("torch")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU and torch sees none"):
            backend.load(proto, _target(device="cuda"))
    with pytest.raises(UserError, match="does not know device 'tpu:x'"):
        backend.load(proto, _target(device="tpu:x"))
    with pytest.raises(UserError, match="fp16 with backend torch needs a CUDA device"):
        backend.load(proto, _target(precision="fp16"))
    with pytest.raises(UserError, match=r"bad options.torch key\(s\) \['fast'\]"):
        backend.load(proto, _target(options={"torch": {"fast": True}}))
    with pytest.raises(UserError, match="cannot read the ONNX model"):
        backend.load(b"not onnx", _target())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_torch_backend_on_cuda(resnet: tuple[torch.nn.Module, bytes]) -> None:
    from deploy_prune.latency.measure import LocalMeasurer

    model, proto = resnet
    sess = get_backend("torch").load(proto, _target(device="cuda", precision="fp16"), per_layer=True)
    feed = _feed(sess)
    ref = model(torch.from_numpy(feed[sess.inputs[0][0]])).detach().numpy()
    np.testing.assert_allclose(sess.run(feed)[0], ref, rtol=0.05, atol=0.05)
    assert sum(layer_times(sess, feed, runs=3).values()) > 0
    stats = LocalMeasurer(_target(device="cuda")).time({"m": proto})["m"]
    assert 0 < stats.median < 1000


def test_torch_targets_are_shipped() -> None:
    cpu, gpu = load_target("cpu-torch-1t"), load_target("gpu-torch")
    assert cpu.backend == gpu.backend == "torch" and cpu.device == "cpu" and gpu.device == "cuda"
    assert gpu.options["torch"]["compile"] is True


def test_onnxruntime_reports_per_node_times(resnet: tuple[torch.nn.Module, bytes]) -> None:
    _, proto = resnet
    target = load_target("cpu-ort-1t")
    plain = get_backend("onnxruntime").load(proto, target)
    with pytest.raises(UserError, match="per_layer=True"):
        layer_times(plain, _feed(plain), runs=2)
    sess = get_backend("onnxruntime").load(proto, target, per_layer=True)
    layers = layer_times(sess, _feed(sess), runs=3)
    assert len(layers) >= 10 and all(v >= 0 for v in layers.values()) and sum(layers.values()) > 0


def test_profile_through_the_torch_backend(tmp_path: Path) -> None:
    from deploy_prune.latency.lut import predict
    from deploy_prune.latency.profile import ProfileSpec, run_profile

    torch.manual_seed(0)
    model = build_model("tiny-cnn", 10, 1)
    _, prof = run_profile(ProfileSpec(model, "tiny-cnn", (1, 16, 16), _target(channel_multiple=8)), tmp_path, calibrate=(0.5,))
    assert prof["measurer"]["backend"] == "torch" and prof["provenance"]["backend_versions"]["onnx2torch"]
    assert predict(model, prof)["raw_ms"] == pytest.approx(prof["full_model"]["latency_ms"]["quiet"], rel=1e-6)
