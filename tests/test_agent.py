"""The remote agent: a real `deploy-prune agent serve` subprocess, driven over HTTP."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.latency.benchmark import benchmark
from deploy_prune.latency.measure import LocalMeasurer, measurer_for
from deploy_prune.latency.remote import AgentMeasurer
from deploy_prune.target import target_from_dict

TOKEN_ENV = "DP_TEST_AGENT_TOKEN"
TOKEN = "test-token-0123456789abcdef-not-secret"
FAST = Protocol(warmup=2, repeats=20, rounds=2, min_time_s=0.05)
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Agent:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    return _open(req, timeout)


def _post(url: str, body: bytes, token: str | None = TOKEN, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    return _open(req, 30.0)


def _open(req: urllib.request.Request, timeout: float) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    port = _free_port()
    log = tmp_path_factory.mktemp("agent") / "agent.log"
    env = {**os.environ, TOKEN_ENV: TOKEN, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deploy_prune.cli", "agent", "serve", "--port", str(port),
           "--token-env", TOKEN_ENV, "--max-body-mb", "1"]
    with open(log, "wb") as err:  # a file, not a pipe: an unread pipe would block the agent
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"agent exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if _get(url + "/info", TOKEN, timeout=1.0)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"agent not ready after 30 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield Agent(url, port, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


def _target(url: str, backend: str = "onnxruntime", **agent: Any) -> Target:
    return target_from_dict(
        {"name": "remote", "backend": backend, "threads": 1, "agent": {"url": url, "token_env": TOKEN_ENV, **agent},
         "warmup": FAST.warmup, "repeats": FAST.repeats, "rounds": FAST.rounds, "min_time_s": FAST.min_time_s},
        source="targets/remote.yaml",
    )


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conv 8->8 3x3 (pad 1) on 1x8x16x16, then Relu."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "conv.onnx"
    onnx.save(model, path)
    return path


def test_info_needs_the_right_token(agent: Agent) -> None:
    status, info = _get(agent.url + "/info", TOKEN)
    assert status == 200
    assert info["backend"] == "onnxruntime" and info["backend_versions"]["onnxruntime"]
    assert info["cpu_count"] >= 1 and info["tool_version"] and info["hostname"] and info["device"]
    for token in (None, "wrong-token", TOKEN + "x", ""):
        status, answer = _get(agent.url + "/info", token)
        assert status == 401 and "token" in answer["error"]
    assert _get(agent.url + "/nowhere", None)[0] == 401  # auth comes before routing
    assert _get(agent.url + "/nowhere", TOKEN)[0] == 404


def test_measurer_reports_a_rejected_token(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "not-the-agent-token")
    with pytest.raises(UserError, match=rf"agent at {agent.url} rejected the token \(HTTP 401\); set \${TOKEN_ENV}"):
        AgentMeasurer(_target(agent.url)).info()


def test_garbage_model_is_refused(agent: Agent, token: str) -> None:
    m = AgentMeasurer(_target(agent.url))
    with pytest.raises(UserError, match="model junk is not a valid ONNX model"):
        m.time({"junk": b"this is not an onnx model at all"}, FAST)


def test_body_over_the_limit(agent: Agent, token: str, conv_onnx: Path) -> None:
    big = conv_onnx.read_bytes() + b"\0" * (1024 * 1024)
    with pytest.raises(UserError, match="too large.*--max-body-mb"):  # refused before the upload
        AgentMeasurer(_target(agent.url)).time({"big": big}, FAST)
    m = AgentMeasurer(_target(agent.url))
    m.agent_info().pop("max_body_mb")  # as if the agent did not announce its limit: it uploads
    with pytest.raises(UserError, match=r"too large \(HTTP 413: .*limit of 1 MiB.*\); restart the agent with a larger --max-body-mb"):
        m.time({"big": big}, FAST)
    # The agent refuses on Content-Length alone, and its answer still reaches a client that
    # sends the whole body first (urllib does).
    status, answer = _post(agent.url + "/time", b"x" * (1024 * 1024 + 10))
    assert status == 413 and "limit of 1 MiB" in answer["error"] and "--max-body-mb" in answer["error"]


def test_bad_requests(agent: Agent, conv_onnx: Path) -> None:
    import base64

    status, answer = _post(agent.url + "/time", b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer = _post(agent.url + "/time", b'{"target": {"name": "t", "backend": "onnxruntime"}}')
    assert status == 400 and "protocol" in answer["error"] and "models" in answer["error"]
    body = {"target": {"name": "t", "backend": "openvino", "device": "cpu", "threads": 1},
            "protocol": FAST.__dict__, "models": {"m": base64.b64encode(conv_onnx.read_bytes()).decode()}}
    status, answer = _post(agent.url + "/time", json.dumps(body).encode())
    assert status == 400 and "serves backend 'onnxruntime', not 'openvino'" in answer["error"]
    body["target"] = {"name": "t", "backend": "onnxruntime", "device": "gpu"}
    status, answer = _post(agent.url + "/time", json.dumps(body).encode())
    assert status == 400 and "not 'gpu'" in answer["error"]  # the backend's UserError, passed on
    assert _get(agent.url + "/time", TOKEN)[0] == 405
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=5)  # no Content-Length
    conn.putrequest("POST", "/time")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()


def test_wrong_backend_is_caught_by_the_client(agent: Agent, token: str, conv_onnx: Path) -> None:
    with pytest.raises(UserError, match="serves backend 'onnxruntime', but target file 'targets/remote.yaml' asks for 'tensorrt'"):
        AgentMeasurer(_target(agent.url, backend="tensorrt")).time({"m": conv_onnx}, FAST)


def test_unreachable_agent_fails_fast(token: str) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"agent at {url} is unreachable \(.*\); start `deploy-prune agent serve`.*targets/remote.yaml"):
        AgentMeasurer(_target(url)).info()
    assert time.monotonic() - t0 < 5


def test_agent_config_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(UserError, match=rf"targets/remote.yaml.*\${TOKEN_ENV} is not set; export {TOKEN_ENV}="):
        AgentMeasurer(_target("http://127.0.0.1:1"))
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(UserError, match="targets/remote.yaml.*agent.url: field required"):
        measurer_for(target_from_dict({"name": "r", "backend": "onnxruntime", "agent": {"token_env": TOKEN_ENV}},
                                      source="targets/remote.yaml"))
    with pytest.raises(UserError, match="must be an http:// or https:// URL"):
        AgentMeasurer(_target("ftp://device:8765"))
    with pytest.raises(UserError, match="agent.timeout_s: input should be greater than 0, got 0"):
        AgentMeasurer(_target("http://device:8765", timeout_s=0))
    with pytest.raises(UserError, match="unknown key .agent.tokn."):
        AgentMeasurer(_target("http://device:8765", tokn="x"))


def test_the_agent_times_with_the_local_protocol(agent: Agent, token: str, conv_onnx: Path) -> None:
    target = _target(agent.url)
    remote = measurer_for(target)
    assert isinstance(remote, AgentMeasurer)
    rounds: list[int] = []
    r = remote.time({"conv": conv_onnx}, FAST, on_round=rounds.append)["conv"]
    local = Target(name="local", backend="onnxruntime", threads=1)
    lo = LocalMeasurer(local).time({"conv": conv_onnx}, FAST)["conv"]
    assert rounds == [FAST.rounds] and r.rounds == FAST.rounds
    assert r.n >= 20 and lo.n >= 20 and r.rounds == lo.rounds  # one protocol; timings of two processes are not compared
    assert 0 < r.min <= r.median <= r.max
    assert remote.shapes == {"conv": [1, 8, 16, 16]}
    info = remote.info()
    assert info["where"] == agent.url and info["threads"] == 1 and info["backend"] == "onnxruntime"


def test_benchmark_through_the_agent(agent: Agent, token: str, conv_onnx: Path) -> None:
    res = benchmark({"conv": str(conv_onnx)}, [_target(agent.url)])
    (row,) = res["results"]
    assert row["where"] == agent.url and row["target"] == "remote"
    assert row["input_shape"] == [1, 8, 16, 16] and row["backend_versions"]["onnxruntime"]
    assert row["latency_ms"]["n"] >= 20 and row["latency_ms"]["median"] > 0


def test_log_has_one_line_per_request_and_no_token(agent: Agent, token: str) -> None:
    _get(agent.url + "/info", TOKEN)
    _get(agent.url + "/info", "wrong-token")
    time.sleep(0.2)
    text = agent.log.read_text()
    assert f"serving onnxruntime on http://127.0.0.1:{agent.port} (token from ${TOKEN_ENV})" in text
    assert "GET /info 200" in text and "GET /info 401" in text
    assert TOKEN not in text and "wrong-token" not in text


def test_profile_through_the_agent_matches_local(agent: Agent, token: str, tmp_path: Path) -> None:
    """The same LUT profiled through the agent and locally: same configurations, and timings
    that agree within the noise of a shared machine (entry totals and the whole model within 3x)."""
    import numpy as np
    import torch

    from deploy_prune.latency.profile import ProfileSpec, run_profile
    from deploy_prune.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny-cnn", 10, 1)
    remote_t = _target(agent.url)
    remote_t.channel_multiple = 8
    local_t = Target(name="remote", backend="onnxruntime", threads=1, channel_multiple=8, protocol=remote_t.protocol)
    _, remote = run_profile(ProfileSpec(model, "tiny-cnn", (1, 16, 16), remote_t), tmp_path / "r", calibrate=(0.5,))
    _, local = run_profile(ProfileSpec(model, "tiny-cnn", (1, 16, 16), local_t), tmp_path / "l", calibrate=(0.5,))
    assert remote["measurer"]["where"] == agent.url and local["measurer"]["where"] == "local"
    assert remote["fingerprint"] == local["fingerprint"] and set(remote["entries"]) == set(local["entries"])
    keys = sorted(local["entries"])
    r = np.array([remote["entries"][k]["median_ms"] for k in keys])
    lo = np.array([local["entries"][k]["median_ms"] for k in keys])
    # Entries of a tiny model sit near the fixed cost of a run, so compare totals, not ranks;
    # the two profiles run one after the other on a shared 2-core machine: allow 3x.
    assert 1 / 3 < r.sum() / lo.sum() < 3, (r.sum(), lo.sum())
    ratio = remote["full_model"]["latency_ms"]["median"] / local["full_model"]["latency_ms"]["median"]
    assert 1 / 3 < ratio < 3


def test_models_over_the_limit_together_go_in_several_requests(agent: Agent, token: str) -> None:
    from deploy_prune.latency import lut

    fam = lut.Family("conv", (3, 3), (1, 1), (1, 1), (1, 1), 1, False, (4, 4))
    models = {f"m{i}": lut.layer_graph(fam, 96, 128, seed=i) for i in range(2)}  # ~0.6 MiB encoded each
    before = agent.log.read_text().count("POST /time 200")
    stats = AgentMeasurer(_target(agent.url)).time(models, FAST)
    time.sleep(0.2)
    assert set(stats) == {"m0", "m1"} and all(s.n >= 20 for s in stats.values())
    assert agent.log.read_text().count("POST /time 200") - before == 2


def test_per_node_counters_through_the_agent(agent: Agent, token: str, conv_onnx: Path) -> None:
    import base64

    remote = AgentMeasurer(_target(agent.url)).layer_times({"conv": conv_onnx}, runs=3)["conv"]
    local = LocalMeasurer(Target(name="local", backend="onnxruntime", threads=1)).layer_times({"conv": conv_onnx}, runs=3)["conv"]
    assert set(remote) == set(local) and sum(remote.values()) > 0
    body = {"target": {"name": "t", "backend": "onnxruntime", "threads": 1}, "protocol": FAST.__dict__,
            "models": {"m": base64.b64encode(conv_onnx.read_bytes()).decode()}, "layer_runs": -1}
    status, answer = _post(agent.url + "/time", json.dumps(body).encode())
    assert status == 400 and "layer_runs must be an integer" in answer["error"]
