"""The OpenVINO backend: parity with torch, per-layer counters, profiling through it, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_prune.backends import backend_status, get_backend, layer_times
from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.export import onnx_bytes
from deploy_prune.models import build_model
from deploy_prune.target import load_target, target_from_dict

pytest.importorskip("openvino")


def _target(**kw: object) -> Target:
    base = dict(name="ov-fast", backend="openvino", threads=1, channel_multiple=8,
                protocol=Protocol(warmup=2, repeats=6, rounds=2, min_time_s=0.0))
    base.update(kw)
    return Target(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, bytes]:
    torch.manual_seed(0)
    m = build_model("tiny-cnn", 10, 1).eval()
    return m, onnx_bytes(m, (1, 16, 16), 1)


def test_openvino_runs_like_torch_and_reports_layer_times(tiny: tuple[torch.nn.Module, bytes]) -> None:
    model, proto = tiny
    backend = get_backend("openvino")
    sess = backend.load(proto, _target(), per_layer=True)
    name, shape = sess.inputs[0]
    assert shape == [1, 1, 16, 16]
    x = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    out = sess.run({name: x})[0]
    np.testing.assert_allclose(out, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert sess.time_once({name: x}) > 0
    layers = layer_times(sess, {name: x}, runs=3)
    assert any("Conv" in n for n in layers) and sum(layers.values()) > 0
    assert "openvino" in backend.versions() and backend_status()["openvino"]["available"]


def test_openvino_binds_each_feed_without_copying_into_the_last(tiny: tuple[torch.nn.Module, bytes]) -> None:
    # time_once shares the feed's memory with the request's input tensor; a later feed must be
    # bound anew, never copied into the memory of the one before.
    model, proto = tiny
    sess = get_backend("openvino").load(proto, _target())
    name = sess.inputs[0][0]
    rng = np.random.default_rng(1)
    a, b = (rng.random((1, 1, 16, 16), dtype=np.float32) for _ in range(2))
    a_before = a.copy()
    assert sess.time_once({name: a}) > 0
    out_b = sess.run({name: b})[0]
    np.testing.assert_array_equal(a, a_before)
    np.testing.assert_allclose(out_b, model(torch.from_numpy(b)).detach().numpy(), rtol=1e-4, atol=1e-5)
    out_a = sess.run({name: a})[0]
    np.testing.assert_allclose(out_a, model(torch.from_numpy(a)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_openvino_bad_input(tiny: tuple[torch.nn.Module, bytes]) -> None:
    _, proto = tiny
    backend = get_backend("openvino")
    with pytest.raises(UserError, match="OpenVINO has no device 'npu7' on this machine"):
        backend.load(proto, _target(device="npu7"))
    with pytest.raises(UserError, match="openvino cannot read the model"):
        backend.load(b"not an onnx model", _target())
    with pytest.raises(UserError, match="precision 'int3'"):
        backend.load(proto, _target(precision="int3"))
    # OpenVINO's own reason, not the source location its exception starts with
    with pytest.raises(UserError, match=r"for CPU: NotFound: Unsupported property BOGUS by CPU plugin\.$"):
        backend.load(proto, _target(options={"openvino": {"BOGUS": "1"}}))


def test_profile_and_predict_on_openvino(tmp_path: Path) -> None:
    from deploy_prune.latency.lut import predict
    from deploy_prune.latency.profile import ProfileSpec, run_profile

    torch.manual_seed(0)
    model = build_model("tiny-cnn", 10, 1)
    _, prof = run_profile(ProfileSpec(model, "tiny-cnn", (1, 16, 16), _target()), tmp_path, calibrate=(0.5,))
    assert prof["measurer"]["backend"] == "openvino" and prof["provenance"]["backend_versions"]["openvino"]
    # the remainder makes the raw prediction exact at full width, as on every backend
    assert predict(model, prof)["raw_ms"] == pytest.approx(prof["full_model"]["latency_ms"]["quiet"], rel=1e-6)


def test_openvino_targets_are_shipped() -> None:
    for name, threads in (("cpu-openvino", 0), ("cpu-openvino-1t", 1)):
        t = load_target(name)
        assert t.backend == "openvino" and t.threads == threads and t.channel_multiple == 8


def test_channel_block_from_the_plugins_layout() -> None:
    from deploy_prune.backends.openvino import layout_block

    assert [layout_block(t) for t in ("aBcd16b", "aBcd8b", "aBcde16b", "abcd", "acdb", "undef")] == [16, 8, 16, 1, 1, 1]
    t = target_from_dict({"name": "ov", "backend": "openvino", "threads": 1, "channel_multiple": "auto"})
    assert t.channel_multiple in (1, 8, 16) and t.channel_multiple_from.startswith(f"auto: {t.channel_multiple} (openvino")
