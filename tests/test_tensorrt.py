"""The TensorRT backend's pure parts (settings, cache key, shapes, cache files), the trtexec importers,
and, where tensorrt and a GPU exist, parity with torch, timing, per-layer times and the engine cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_prune.backends import BACKENDS, get_backend
from deploy_prune.backends.tensorrt import (
    TensorRTBackend,
    build_settings,
    cache_dir,
    check_version,
    engine_key,
    parse_device,
    profile_shape,
)
from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.latency.trtexec import load_profile, load_times


def _target(**kw: object) -> Target:
    base = dict(name="trt-fast", backend="tensorrt", device="cuda", precision="fp32",
                protocol=Protocol(warmup=2, repeats=6, rounds=2, min_time_s=0.0))
    base.update(kw)
    return Target(**base)  # type: ignore[arg-type]


# --- settings, key, shapes ---------------------------------------------------------------------------


def test_build_settings_precision_workspace_and_options() -> None:
    s = build_settings(_target())
    assert s["precision"] == "fp32" and s["workspace_mb"] == 1024 and s["tf32"] is False
    assert s["profiling_verbosity"] == "layer_names_only"
    fp16 = build_settings(_target(precision="fp16", options={"tensorrt": {"workspace_mb": 256}}))
    assert fp16["precision"] == "fp16" and fp16["workspace_mb"] == 256
    assert build_settings(_target(precision="int8"))["precision"] == "int8"
    assert build_settings(_target(), per_layer=True)["profiling_verbosity"] == "detailed"
    level5 = build_settings(_target(options={"tensorrt": {"builder_optimization_level": 5}}))
    assert level5["builder_optimization_level"] == 5


def test_build_settings_rejects_bad_input() -> None:
    with pytest.raises(UserError, match=r"unknown options.tensorrt key\(s\) \['workspace'\]; valid keys: workspace_mb"):
        build_settings(_target(options={"tensorrt": {"workspace": 512}}))
    with pytest.raises(UserError, match="workspace_mb must be int"):
        build_settings(_target(options={"tensorrt": {"workspace_mb": "1G"}}))
    with pytest.raises(UserError, match="workspace_mb must be > 0"):
        build_settings(_target(options={"tensorrt": {"workspace_mb": 0}}))
    with pytest.raises(UserError, match="builder_optimization_level must be 0-5"):
        build_settings(_target(options={"tensorrt": {"builder_optimization_level": 9}}))
    with pytest.raises(UserError, match="cache must be bool"):
        build_settings(_target(options={"tensorrt": {"cache": 1}}))
    with pytest.raises(UserError, match="must be a mapping"):
        build_settings(_target(options={"tensorrt": [1]}))
    with pytest.raises(UserError, match="precision 'bf16' is not one TensorRT takes"):
        build_settings(_target(precision="bf16"))


def test_engine_key_changes_with_each_input_and_only_then() -> None:
    onnx, settings = b"onnx-bytes", build_settings(_target())
    key = engine_key(onnx, settings, "10.3.0", "Orin (compute 8.7)")
    reordered = dict(reversed(list(settings.items())))
    assert len(key) == 64 and key == engine_key(onnx, reordered, "10.3.0", "Orin (compute 8.7)")
    others = {
        engine_key(b"onnx-bytez", settings, "10.3.0", "Orin (compute 8.7)"),
        engine_key(onnx, {**settings, "precision": "fp16"}, "10.3.0", "Orin (compute 8.7)"),
        engine_key(onnx, {**settings, "workspace_mb": 512}, "10.3.0", "Orin (compute 8.7)"),
        engine_key(onnx, settings, "10.3.1", "Orin (compute 8.7)"),
        engine_key(onnx, settings, "10.3.0", "Orin (compute 8.6)"),
        engine_key(onnx, settings, "10.3.0", "Orin (compute 8.7)x"),
        # moving bytes from one part to the next must not give the same key
        engine_key(onnx, settings, "10.3.0O", "rin (compute 8.7)"),
    }
    assert key not in others and len(others) == 7


def test_parse_device_and_version_checks() -> None:
    assert parse_device("cuda") == 0 and parse_device("cuda:2") == 2
    for bad in ("cpu", "cuda:x", "gpu:0", "cuda:"):
        with pytest.raises(UserError, match="set device: cuda"):
            parse_device(bad)
    check_version("10.3.0", "int8")
    check_version("11.0.0", "fp32")
    with pytest.raises(UserError, match="removed the fp16 builder flag"):
        check_version("11.0.0", "fp16")
    with pytest.raises(UserError, match="needs TensorRT 10"):
        check_version("8.6.1", "fp32")


def test_profile_shape_resolves_dynamic_dims_from_the_target() -> None:
    assert profile_shape("x", [-1, 3, 32, 32], 4, None) == [4, 3, 32, 32]
    assert profile_shape("x", [-1, 3, -1, -1], 2, [3, 64, 48]) == [2, 3, 64, 48]
    with pytest.raises(UserError, match="set input_shape"):
        profile_shape("x", [1, 3, -1, -1], 1, None)
    with pytest.raises(UserError, match="static shape"):
        profile_shape("x", [-1, 3, 32, 32], 1, [3, 64, 64])
    with pytest.raises(UserError, match="static batch 1"):
        profile_shape("x", [1, 3, -1, -1], 8, [3, 32, 32])
    with pytest.raises(UserError, match="has 2 dims"):
        profile_shape("x", [-1, 3, 32, 32], 1, [32, 32])


def test_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOY_PRUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" / "tensorrt"
    monkeypatch.delenv("DEPLOY_PRUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "deploy-prune" / "tensorrt"


def test_target_errors_come_before_tensorrt_is_needed() -> None:
    backend = TensorRTBackend()
    with pytest.raises(UserError, match="not on device 'cpu'"):
        backend.load(b"not onnx", _target(device="cpu"))
    with pytest.raises(UserError, match="precision 'int3'"):
        backend.load(b"not onnx", _target(precision="int3"))
    with pytest.raises(UserError, match="unknown options.tensorrt"):
        backend.load(b"not onnx", _target(options={"tensorrt": {"fp16": True}}))


# --- availability ---------------------------------------------------------------------------------


def test_unavailable_here_with_a_reason() -> None:
    ok, why = BACKENDS.get("tensorrt").available()
    if ok:
        pytest.skip(f"tensorrt is usable here ({why})")
    assert why in ("tensorrt is not installed", "no CUDA GPU visible to torch")
    with pytest.raises(UserError, match=r"backend 'tensorrt' is not usable here: .*deploy-prune\[tensorrt\]"):
        get_backend("tensorrt")


# --- trtexec importers -------------------------------------------------------------------------------


def _times_record(start: float, compute: float, old: bool = False) -> dict[str, float]:
    rec = {"startEnqMs": start, "endEnqMs": start + 0.05, "startH2dMs": start, "endH2dMs": start + 0.01,
           "startComputeMs": start + 0.01, "endComputeMs": start + 0.01 + compute,
           "startD2hMs": start + 0.01 + compute, "endD2hMs": start + 0.02 + compute,
           "h2dMs": 0.01, "computeMs": compute, "d2hMs": 0.01, "latencyMs": compute + 0.02}
    if old:
        rec["endToEndMs"] = compute + 0.02
    return rec


def test_load_times_uses_compute_ms(tmp_path: Path) -> None:
    f = tmp_path / "times.json"
    computes = [1.0, 1.2, 0.9, 1.1, 5.0, 1.0]
    f.write_text(json.dumps([_times_record(300.0 + 2 * i, c) for i, c in enumerate(computes)]))
    s = load_times(f)
    assert s.n == 6 and s.median == pytest.approx(np.median(computes)) and s.max == 5.0 and s.rounds == 1
    s2 = load_times(f, rounds=2)
    assert s2.rounds == 2 and s2.round_medians == pytest.approx([1.0, 1.1]) and s2.round_cv > 0
    # an older trtexec: warm-up queries included, dropped by warmup_ms
    old = tmp_path / "old.json"
    old.write_text(json.dumps([_times_record(10.0 * i, 9.0 if i < 3 else 2.0, old=True) for i in range(6)]))
    assert load_times(old).median == pytest.approx(5.5)
    assert load_times(old, warmup_ms=25.0).median == pytest.approx(2.0) and load_times(old, warmup_ms=25.0).n == 3


def test_load_times_bad_files(tmp_path: Path) -> None:
    cases = {
        "notjson.json": ("[{\"computeMs\": 1.0,", "is not JSON"),
        "dict.json": (json.dumps({"computeMs": 1.0}), "must hold a JSON list of per-inference records"),
        "nokey.json": (json.dumps([{"latencyMs": 1.0}]),
                       r"record 0 has no numeric 'computeMs' \(has \['latencyMs'\]\)"),
        "empty.json": ("[]", "holds no inference records"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=msg) as e:
            load_times(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_times(tmp_path / "missing.json")
    (tmp_path / "ok.json").write_text(json.dumps([_times_record(0.0, 1.0)]))
    with pytest.raises(UserError, match="rounds must be between 1 and the 1 records"):
        load_times(tmp_path / "ok.json", rounds=2)


def test_load_profile_median_then_average(tmp_path: Path) -> None:
    new = tmp_path / "profile.json"
    new.write_text(json.dumps([
        {"count": 10},
        {"name": "/conv1/Conv + /relu/Relu", "timeMs": 2.0, "averageMs": 0.2, "medianMs": 0.19, "percentage": 66.7},
        {"name": "/fc/Gemm", "timeMs": 1.0, "averageMs": 0.1, "medianMs": 0.09, "percentage": 33.3},
    ]))
    assert load_profile(new) == pytest.approx({"/conv1/Conv + /relu/Relu": 0.19, "/fc/Gemm": 0.09})
    old = tmp_path / "old.json"  # before medianMs existed
    old.write_text(json.dumps([{"count": 4}, {"name": "a", "timeMs": 0.8, "averageMs": 0.2, "percentage": 100.0}]))
    assert load_profile(old) == pytest.approx({"a": 0.2})


def test_load_profile_bad_files(tmp_path: Path) -> None:
    cases = {
        "notjson.json": ("{count: 3}", "is not JSON"),
        "nocount.json": (json.dumps([{"name": "a", "averageMs": 1.0}]),
                         r"must be a JSON list starting with \{\"count\": N\}"),
        "times.json": (json.dumps([_times_record(0.0, 1.0)]), "must be a JSON list starting with"),
        "noname.json": (json.dumps([{"count": 1}, {"averageMs": 1.0}]), r"record 1 needs a 'name'"),
        "noms.json": (json.dumps([{"count": 1}, {"name": "a", "timeMs": 1.0}]), "numeric 'medianMs' or 'averageMs'"),
        "nolayers.json": (json.dumps([{"count": 1}]), "holds no layer records"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=msg) as e:
            load_profile(tmp_path / name)
        assert name in str(e.value)


# --- on a GPU with tensorrt ------------------------------------------------------------------------


def test_tensorrt_runs_like_torch_times_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ok, why = BACKENDS.get("tensorrt").available()
    if not ok:
        pytest.skip(why)
    from deploy_prune.export import onnx_bytes
    from deploy_prune.models import build_model

    monkeypatch.setenv("DEPLOY_PRUNE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = build_model("tiny-cnn", 10, 1).eval()
    proto = onnx_bytes(model, (1, 16, 16), 1)
    backend = get_backend("tensorrt")
    sess = backend.load(proto, _target(), per_layer=True)
    name, shape = sess.inputs[0]
    assert shape == [1, 1, 16, 16]
    x = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    out = sess.run({name: x})[0]
    np.testing.assert_allclose(out, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-3, atol=1e-4)
    assert 0 < sess.time_once({name: x}) < 1000
    layers = sess.layer_ms({name: x}, runs=5)  # type: ignore[attr-defined]
    assert layers and all(v >= 0 for v in layers.values()) and sum(layers.values()) > 0
    assert "fp32" in backend.device_string(_target()) and backend.versions()["tensorrt"]

    engines = list((tmp_path / "tensorrt").glob("*.engine"))
    assert len(engines) == 1
    again = backend.load(proto, _target(), per_layer=True)  # from the cache
    np.testing.assert_allclose(again.run({name: x})[0], out, rtol=1e-6, atol=1e-6)
    engines[0].write_bytes(b"corrupt")  # rebuilt, not fatal
    rebuilt = backend.load(proto, _target(), per_layer=True)
    np.testing.assert_allclose(rebuilt.run({name: x})[0], out, rtol=1e-6, atol=1e-6)
    assert engines[0].stat().st_size > len(b"corrupt")
    assert len(list((tmp_path / "tensorrt").iterdir())) == 1  # no temporary files left behind

    fp16 = backend.load(proto, _target(precision="fp16"))
    np.testing.assert_allclose(fp16.run({name: x})[0], out, rtol=5e-2, atol=5e-2)
    with pytest.raises(UserError, match="tensorrt .*cannot parse the model"):
        backend.load(b"not an onnx model", _target())


def test_trtexec_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deploy_prune.cli import app

    times, prof = tmp_path / "times.json", tmp_path / "profile.json"
    times.write_text(json.dumps([_times_record(2.0 * i, c) for i, c in enumerate([1.0, 1.2, 0.9, 1.1])]))
    prof.write_text(json.dumps([{"count": 4}, {"name": "conv", "timeMs": 2.0, "averageMs": 0.5, "medianMs": 0.4, "percentage": 80},
                                {"name": "fc", "timeMs": 0.5, "averageMs": 0.1, "medianMs": 0.1, "percentage": 20}]))
    r = CliRunner().invoke(app, ["trtexec", str(times), "--profile", str(prof), "--rounds", "2", "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 0, r.output
    assert "GPU compute median 1.050 ms" in r.output and "2 layers, sum of medians 0.500 ms" in r.output
    rec = json.loads((tmp_path / "o.json").read_text())
    assert rec["source"] == "trtexec" and rec["latency_ms"]["rounds"] == 2 and rec["layers_ms"] == {"conv": 0.4, "fc": 0.1}
    r = CliRunner().invoke(app, ["trtexec", str(tmp_path / "nope.json")])
    assert r.exit_code == 2 and "not found" in r.output
