from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.io import write_text
from deploy_prune.latency.benchmark import benchmark
from deploy_prune.latency.timing import measure, pool_sittings, quiet_estimate, quiet_of, split_protocol, summarize
from deploy_prune.target import load_target, target_from_dict


def test_summarize_known_sample() -> None:
    s = summarize([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]])
    assert s.median == 5.5 and s.n == 10 and s.rounds == 2
    assert s.round_medians == [3.0, 8.0]
    assert s.p90 == pytest.approx(9.1) and s.iqr == pytest.approx(4.5)
    assert s.mad == 2.5


def test_quiet_estimate_drops_contended_rounds() -> None:
    # Two rounds slowed by another tenant (+40 %): the estimate is the quiet rounds' median,
    # where the overall median of round medians would land in the slow state.
    rounds = [0.80, 0.57, 0.58, 0.79, 0.82, 0.56]
    assert quiet_estimate(rounds) == pytest.approx(0.57)
    assert float(np.median(rounds)) > 0.65
    # A quiet machine: every round is within the band, so it is the median of the round medians.
    assert quiet_estimate([1.00, 1.02, 0.99, 1.01, 1.03]) == pytest.approx(1.01)
    s = summarize([[0.8, 0.8, 0.8], [0.5, 0.5, 0.5], [0.52, 0.52, 0.52]])
    d = s.as_dict()
    assert s.quiet == pytest.approx(0.51) and d["quiet"] == pytest.approx(0.51) and d["quiet_rounds"] == 2
    assert s.median == pytest.approx(0.52)  # the overall figure is still reported as measured
    assert quiet_of({"median": 0.7}) == 0.7  # a report written before rounds were stored
    # One round in ten far faster than the rest is not a state the machine holds: the quiet
    # figure comes from the fastest 30 % of the rounds, not from that round alone.
    lone = [0.137, 0.215, 0.214, 0.218, 0.219, 0.220, 0.213, 0.216, 0.214, 0.217]
    assert quiet_estimate(lone) == pytest.approx(0.213)


def test_sittings_split_the_protocol_and_pool_their_rounds() -> None:
    a, b = split_protocol(Protocol(warmup=50, repeats=300, rounds=10, min_time_s=2.0))
    assert (a.rounds + b.rounds, a.repeats + b.repeats, a.min_time_s + b.min_time_s) == (10, 300, 2.0)
    # The first sitting fell wholly into a contention episode; the quiet figure comes from the second.
    slow = summarize([[1.30, 1.31], [1.29, 1.30]])
    quiet = summarize([[1.00, 1.01], [1.02, 1.03]])
    pooled = pool_sittings([slow, quiet])
    assert pooled["quiet"] == pytest.approx(1.015) and pooled["quiet_rounds"] == 2 and pooled["rounds"] == 4
    assert quiet_of(pooled) == pooled["quiet"] and len(pooled["sittings"]) == 2  # type: ignore[arg-type]


def test_measure_interleaves_variants() -> None:
    calls: list[str] = []

    def timer(name: str):  # noqa: ANN202
        return lambda: calls.append(name) or 1.0

    proto = Protocol(warmup=0, repeats=4, rounds=2, min_time_s=0.0)
    stats = measure({"a": timer("a"), "b": timer("b")}, proto)
    timed = calls[2:]  # after one estimate run each
    assert timed == ["a", "a", "b", "b", "a", "a", "b", "b"]
    assert stats["a"].n == 4 and stats["a"].median == 1.0


def test_min_time_extends_fast_variants() -> None:
    proto = Protocol(warmup=1, repeats=2, rounds=1, min_time_s=0.05)
    stats = measure({"fast": lambda: 0.001}, proto)
    assert stats["fast"].n >= 50_000 * 0.05 / 0.05 - 1  # 50 ms / 0.001 ms per run


def test_shipped_targets_parse() -> None:
    for name in ("cpu-ort", "cpu-ort-1t"):
        t = load_target(name)
        assert t.backend == "onnxruntime" and t.protocol.repeats >= 100
    assert load_target("cpu-ort-1t").resolved_threads() == 1


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_channel_multiple_auto_is_the_cpus_block() -> None:
    """ORT's NCHWc block comes from MLAS's kernels: 16 with AVX-512, 8 with AVX2 (x86 Linux;
    elsewhere only the shape of the answer is checked)."""
    flags = _cpu_flags()
    for name in ("cpu-ort", "cpu-ort-1t"):
        t = load_target(name)
        assert t.channel_multiple_from.startswith(f"auto: {t.channel_multiple} ")
        if "avx512f" in flags:
            assert t.channel_multiple == 16
        elif "avx2" in flags:
            assert t.channel_multiple == 8
        else:
            assert t.channel_multiple in (1, 4, 8, 16, 32)
    assert t.as_dict()["channel_multiple_from"]  # recorded with the target in every profile and report
    torch_t = target_from_dict({"name": "x", "backend": "torch", "channel_multiple": "auto"})
    assert (torch_t.channel_multiple, torch_t.channel_multiple_from) == (1, "auto: 1 (torch has no channel-blocked layout)")
    # a number is taken as given
    fixed = target_from_dict({"name": "x", "backend": "onnxruntime", "channel_multiple": 8})
    assert (fixed.channel_multiple, fixed.channel_multiple_from) == (8, "")


def test_channel_multiple_auto_bad_input() -> None:
    with pytest.raises(UserError, match="through an agent on another device; give the device's number"):
        target_from_dict({"name": "x", "backend": "onnxruntime", "channel_multiple": "auto",
                          "agent": {"url": "http://127.0.0.1:1", "token_env": "T"}})
    with pytest.raises(UserError, match="channel_multiple must be an integer from 1 to 1024 or auto, got 'eight'"):
        target_from_dict({"name": "x", "backend": "onnxruntime", "channel_multiple": "eight"})
    with pytest.raises(UserError, match="unknown key"):
        target_from_dict({"name": "x", "backend": "onnxruntime", "channel_multiple_from": "me"})


def test_bad_targets(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="valid targets: .*cpu-ort"):
        load_target("jetson-xavier-nx-9000")
    with pytest.raises(UserError, match="unknown key"):
        target_from_dict({"name": "x", "backend": "onnxruntime", "thread": 2})
    write_text(tmp_path / "bad.yaml", "name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_target(str(tmp_path / "bad.yaml"))
    with pytest.raises(UserError, match="bad measurement protocol"):
        target_from_dict({"name": "x", "backend": "onnxruntime", "repeats": 2, "rounds": 5})
    with pytest.raises(UserError, match="cache_kib: input should be a valid integer, got '2M'"):
        target_from_dict({"name": "x", "backend": "onnxruntime", "cache_kib": "2M"})
    assert target_from_dict({"name": "x", "backend": "onnxruntime", "cache_kib": 2048}).cache_kib == 2048
    assert target_from_dict({"name": "x", "backend": "onnxruntime", "cache_kib": None}).cache_kib is None


def test_benchmark_real_onnxruntime(tiny_onnx: Path, quick_target: Target) -> None:
    res = benchmark({"tiny": tiny_onnx}, [quick_target])
    row = res["results"][0]
    s = row["latency_ms"]
    assert 0 < s["min"] <= s["median"] <= s["p90"] <= s["max"]
    assert s["n"] >= 10 and row["threads"] == 1 and row["input_shape"] == [1, 1, 32, 32]
    assert row["backend_versions"]["onnxruntime"]
    assert res["provenance"]["cpu"] and res["provenance"]["date"]


def test_benchmark_unknown_backend(tiny_onnx: Path) -> None:
    with pytest.raises(UserError, match="unknown backend"):
        benchmark({"tiny": tiny_onnx}, [Target(name="x", backend="coreml")])


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    from deploy_prune.io import atomic_write

    def boom(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.json", boom)
    assert list(tmp_path.iterdir()) == []


def test_feed_resolves_dynamic_dims_from_target(quick_target: Target) -> None:
    from deploy_prune.latency.measure import feed_for

    class Dyn:
        inputs = [("x", ["N", "C", "H", "W"])]

    quick_target.input_shape = [1, 32, 32]
    quick_target.batch = 2
    feed = feed_for(Dyn(), quick_target)  # type: ignore[arg-type]
    assert feed["x"].shape == (2, 1, 32, 32) and feed["x"].dtype == np.float32
    with pytest.raises(UserError, match="input_shape"):
        feed_for(Dyn(), Target(name="t", backend="onnxruntime"))  # type: ignore[arg-type]
