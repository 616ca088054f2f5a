"""Hardening of `deploy-prune agent serve`: external data, short tokens, short bodies, the
connection cap and the numbers of a request. The agent runs in this process on a thread
(``make_server`` + ``serve_forever``) so that its module constants can be monkeypatched."""

from __future__ import annotations

import base64
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import deploy_prune.agent as agent_mod
from deploy_prune.agent import make_server
from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.latency.remote import AgentMeasurer

TOKEN_ENV = "DP_TEST_HARDENING_TOKEN"
TOKEN = "hardening-token-0123456789abcdef-not-secret"
TINY = {"warmup": 1, "repeats": 2, "rounds": 1, "min_time_s": 0.0}
TINY_PROTO = Protocol(warmup=1, repeats=2, rounds=1, min_time_s=0.0)


@dataclass
class Agent:
    url: str
    port: int


@contextmanager
def _running(monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    httpd = make_server("onnxruntime", "127.0.0.1", 0, TOKEN_ENV, 1.0)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = int(httpd.server_address[1])
        yield Agent(f"http://127.0.0.1:{port}", port)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    with _running(monkeypatch) as a:
        yield a


@pytest.fixture(scope="module")
def shared_agent() -> Iterator[Agent]:
    """One agent for the many bad-number requests (none of them changes its state)."""
    with pytest.MonkeyPatch.context() as mp, _running(mp) as a:
        yield a


def _open(req: urllib.request.Request, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url + "/time", data=body, method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    return _open(req)


def _info(url: str) -> int:
    return _open(urllib.request.Request(url + "/info", headers={"Authorization": f"Bearer {TOKEN}"}), 5.0)[0]


def _raw(port: int, data: bytes, shut: bool = False, timeout: float = 60.0) -> tuple[int, dict[str, Any], bytes]:
    """Send ``data`` as is, read the answer to the end: (status, JSON body, header bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(1 << 16):
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head


def _log_has(capsys: pytest.CaptureFixture[str], text: str, wait_s: float = 5.0) -> str:
    """The agent's stderr so far, once it holds ``text`` (its log line follows the answer)."""
    seen = ""
    deadline = time.monotonic() + wait_s
    while True:
        seen += capsys.readouterr().err
        if text in seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)


def _model(initializer: Any = None, nodes: list[Any] | None = None) -> Any:
    """y = x + w on 4 floats (w given, or inline), optionally with other nodes before the Add."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = initializer if initializer is not None else numpy_helper.from_array(np.ones(4, np.float32), "w")
    graph = helper.make_graph(
        [*(nodes or []), helper.make_node("Add", ["x", "w"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[w] if nodes is None else [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _external(name: str, location: str) -> Any:
    """A 4-float tensor whose data lives in the file ``location`` (relative to whoever loads it)."""
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _body(model: Any, **over: Any) -> dict[str, Any]:
    body = {"target": {"name": "t", "backend": "onnxruntime", "threads": 1}, "protocol": dict(TINY),
            "models": {"m": base64.b64encode(model.SerializeToString()).decode()}}
    body.update(over)
    return body


# -- 1. external data -------------------------------------------------------------------------


def _external_models() -> dict[str, Any]:
    from onnx import TensorProto, helper

    cond = helper.make_tensor("c", TensorProto.BOOL, [], vals=[True])
    branch = helper.make_graph([helper.make_node("Identity", ["wx"], ["w_out"])], "branch", [],
                               [helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [4])],
                               initializer=[_external("wx", "secret.bin")])
    return {
        "initializer": _model(_external("w", "secret.bin")),
        "initializer in a subfolder": _model(_external("w", "base/model.pt")),
        "Constant node": _model(nodes=[helper.make_node("Constant", [], ["w"], value=_external("wc", "secret.bin"))]),
        "If subgraph": _model(nodes=[helper.make_node("Constant", [], ["cond"], value=cond),
                                     helper.make_node("If", ["cond"], ["w"], then_branch=branch, else_branch=branch)]),
    }


@pytest.mark.parametrize("where", list(_external_models()))
def test_model_with_external_data_is_refused(agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             where: str) -> None:
    import onnx

    secret = b"TOPSECRET-" * 1234 + b"x"  # 12341 bytes, beside the agent's working directory
    (tmp_path / "secret.bin").write_bytes(secret)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.pt").write_bytes(secret)
    monkeypatch.chdir(tmp_path)  # the agent runs in this process: this is its cwd
    model = _external_models()[where]
    onnx.checker.check_model(model)  # the checker alone lets it through
    status, answer = _post(agent.url, json.dumps(_body(model)).encode())
    assert status == 400, answer
    msg = answer["error"]
    loc = "'base/model.pt'" if "subfolder" in where else "'secret.bin'"
    assert msg == f"model m refers to external data files ({loc}); send a model with its weights inside"
    assert str(len(secret)) not in msg and "TOPSECRET" not in msg


def test_model_with_inline_weights_is_still_timed(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    target = Target(name="r", backend="onnxruntime", threads=1, agent={"url": agent.url, "token_env": TOKEN_ENV})
    stats = AgentMeasurer(target).time({"m": _model().SerializeToString()}, TINY_PROTO)
    assert stats["m"].n >= 2 and stats["m"].median > 0


# -- 2. short tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["short", "fifteen-chars-x", "   0123456789abcd   "])
def test_short_token_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    assert len(token.strip()) < 16
    monkeypatch.setenv(TOKEN_ENV, token)
    with pytest.raises(UserError) as e:
        make_server("onnxruntime", "127.0.0.1", 0, TOKEN_ENV, 1.0)
    msg = str(e.value)
    assert "at least 16 characters" in msg and f"${TOKEN_ENV}" in msg
    assert "python -c 'import secrets; print(secrets.token_urlsafe(32))'" in msg
    assert token.strip() not in msg  # the token itself is never echoed


def test_token_of_16_characters_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "0123456789abcdef")
    make_server("onnxruntime", "127.0.0.1", 0, TOKEN_ENV, 1.0).server_close()


# -- 3. a body shorter than its Content-Length ------------------------------------------------


def _short_body_request() -> bytes:
    return (f"POST /time HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n").encode() + b'{"target":'


def test_stalled_body_gets_a_quick_400(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_mod, "BODY_TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    status, answer, _ = _raw(agent.port, _short_body_request())  # sends 10 of 1000 bytes, then waits
    elapsed = time.monotonic() - t0
    assert status == 400, answer
    assert answer["error"].startswith("the body ended before its Content-Length (10 of 1000 bytes)")
    assert elapsed < 30, elapsed
    assert _info(agent.url) == 200  # the agent still serves


def test_body_closed_early_gets_a_400_at_once(agent: Agent) -> None:
    t0 = time.monotonic()
    status, answer, _ = _raw(agent.port, _short_body_request(), shut=True)  # default BODY_TIMEOUT_S
    assert status == 400 and answer["error"] == "the body ended before its Content-Length (10 of 1000 bytes)"
    assert time.monotonic() - t0 < agent_mod.BODY_TIMEOUT_S


# -- 4. the connection cap ---------------------------------------------------------------------


def test_connections_over_the_cap_get_503(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(agent_mod, "MAX_CONNECTIONS", 2)
    with _running(monkeypatch) as a:
        idle = [socket.create_connection(("127.0.0.1", a.port), timeout=10) for _ in range(2)]  # hold both slots
        try:
            t0 = time.monotonic()
            status, answer, head = _raw(a.port, f"GET /info HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
            assert status == 503 and "too many connections" in answer["error"] and "at most 2" in answer["error"]
            assert b"Retry-After: 1" in head and time.monotonic() - t0 < 5
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 10  # closing them gives the slots back
        while _info(a.url) != 200:
            assert time.monotonic() < deadline, "slots not released"
            time.sleep(0.05)
    assert "- - 503 0.000s (too many connections)" in _log_has(capsys, "too many connections")


def test_stalled_client_gives_its_slot_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_mod, "MAX_CONNECTIONS", 1)
    monkeypatch.setattr(agent_mod, "REQUEST_TIMEOUT_S", 1.5)
    with _running(monkeypatch) as a, socket.create_connection(("127.0.0.1", a.port), timeout=10):  # sends nothing
        time.sleep(0.1)
        assert _info(a.url) == 503
        time.sleep(2.5)  # past REQUEST_TIMEOUT_S: the agent dropped the silent connection
        assert _info(a.url) == 200


# -- 5. numbers where they enter -------------------------------------------------------------

# (field path in the body, raw JSON text put there, what the error must name)
BAD_NUMBERS = [
    ("protocol.warmup", "-1", "protocol.warmup must be an integer in [0, 100000]"),
    ("protocol.warmup", "true", "protocol.warmup must be an integer in [0, 100000]"),
    ("protocol.warmup", '"5"', "protocol.warmup must be an integer in [0, 100000]"),
    ("protocol.warmup", "1.5", "protocol.warmup must be an integer in [0, 100000]"),
    ("protocol.warmup", "1e999", "protocol.warmup must be an integer in [0, 100000], got inf"),
    ("protocol.warmup", "100001", "protocol.warmup must be an integer in [0, 100000]"),
    ("protocol.warmup", "null", "protocol.warmup must be an integer in [0, 100000]"),
    ("protocol.repeats", "0", "protocol.repeats must be an integer in [1, 10000000]"),
    ("protocol.repeats", "10000001", "protocol.repeats must be an integer in [1, 10000000]"),
    ("protocol.repeats", "-1e999", "protocol.repeats must be an integer in [1, 10000000], got -inf"),
    ("protocol.repeats", "2.0", "protocol.repeats must be an integer in [1, 10000000]"),
    ("protocol.repeats", '"many"', "protocol.repeats must be an integer in [1, 10000000]"),
    ("protocol.rounds", "0", "protocol.rounds must be an integer in [1, 10000]"),
    ("protocol.rounds", "10001", "protocol.rounds must be an integer in [1, 10000]"),
    ("protocol.rounds", "false", "protocol.rounds must be an integer in [1, 10000]"),
    ("protocol.rounds", "[1]", "protocol.rounds must be an integer in [1, 10000]"),
    ("protocol.min_time_s", "-0.5", "protocol.min_time_s must be a number in [0, 600]"),
    ("protocol.min_time_s", "600.5", "protocol.min_time_s must be a number in [0, 600]"),
    ("protocol.min_time_s", "1e308", "protocol.min_time_s must be a number in [0, 600]"),
    ("protocol.min_time_s", "1e999", "protocol.min_time_s must be a number in [0, 600], got inf"),
    ("protocol.min_time_s", "true", "protocol.min_time_s must be a number in [0, 600]"),
    ("protocol.min_time_s", '"1"', "protocol.min_time_s must be a number in [0, 600]"),
    ("protocol.min_time_s", "NaN", "body is not valid JSON: NaN is not a JSON number"),
    ("protocol.min_time_s", "Infinity", "body is not valid JSON: Infinity is not a JSON number"),
    ("protocol.warmup", "-Infinity", "body is not valid JSON: -Infinity is not a JSON number"),
    ("target.options", '{"x": NaN}', "body is not valid JSON: NaN is not a JSON number"),
    ("protocol.repeats", "9" * 5000, "body is not valid JSON"),  # over Python's int-digit limit
    ("layer_runs", "1e999", "layer_runs must be an integer in [0, 10000], got inf"),
    ("layer_runs", "true", "layer_runs must be an integer in [0, 10000]"),
    ("target.threads", "1" + "0" * 30, "target.threads must be an integer in [0, 4096]"),
    ("target.threads", "1e999", "target.threads must be an integer in [0, 4096]"),
    ("target.batch", "100000", "target.batch must be an integer in [1, 65536]"),
    ("target.warmup", "1e999", "target.warmup must be an integer in [0, 100000], got inf"),
    ("target.input_shape", "[3, 1e999]", "target.input_shape entries must be an integer in [1, 65536]"),
    ("target.input_shape", "[1" + "0" * 30 + "]", "target.input_shape entries must be an integer in [1, 65536]"),
    ("target.input_shape", '"3x16x16"', "target.input_shape must be a list of 1 to 8 integers"),
]


def _with_raw(body: dict[str, Any], path: str, raw: str) -> bytes:
    """``body`` as JSON with the value at ``path`` (a.b) replaced by the raw JSON text ``raw``."""
    *parents, last = path.split(".")
    node = body
    for p in parents:
        node = node[p]
    node[last] = "@@RAW@@"
    return json.dumps(body).replace('"@@RAW@@"', raw).encode()


@pytest.mark.parametrize(("path", "raw", "expect"), BAD_NUMBERS, ids=[f"{p}={r[:12]}" for p, r, _ in BAD_NUMBERS])
def test_bad_numbers_get_a_400_naming_the_field(shared_agent: Agent, capsys: pytest.CaptureFixture[str],
                                                path: str, raw: str, expect: str) -> None:
    status, answer = _post(shared_agent.url, _with_raw(_body(_model()), path, raw))
    assert status == 400, answer
    msg = answer["error"]
    assert msg.startswith(expect), msg
    assert "\n" not in msg and len(msg) < 300
    err = _log_has(capsys, "POST /time 400")
    assert "Traceback" not in err and "POST /time 400" in err


def test_deeply_nested_json_is_bad_json(shared_agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    status, answer = _post(shared_agent.url, b"[" * 200_000 + b"]" * 200_000)
    assert status == 400 and answer["error"].startswith("body is not valid JSON")
    err = _log_has(capsys, "POST /time 400")
    assert "Traceback" not in err and "POST /time 400" in err


def test_answer_is_strict_json(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN in the timings becomes a 500 with a message, never a bare NaN token on the wire."""
    from deploy_prune.latency.measure import LocalMeasurer
    from deploy_prune.latency.timing import Stats

    nan = math.nan
    fake = Stats(nan, nan, nan, nan, nan, nan, nan, 2, 1, [1.0], 0.0)
    monkeypatch.setattr(LocalMeasurer, "time", lambda self, models, protocol=None, on_round=None: {"m": fake})
    req = urllib.request.Request(agent.url + "/time", data=json.dumps(_body(_model())).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 500
    answer = agent_mod._loads(e.value.read())  # strict: would raise on a NaN token
    assert "non-finite number" in answer["error"]


def test_client_refuses_to_send_nan(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    target = Target(name="r", backend="onnxruntime", threads=1, options={"x": math.nan},
                    agent={"url": agent.url, "token_env": TOKEN_ENV})
    with pytest.raises(UserError, match="NaN or infinite"):
        AgentMeasurer(target).time({"m": _model().SerializeToString()}, TINY_PROTO)


@pytest.mark.parametrize("port", [99999, 65536, -1])
def test_port_out_of_range_is_a_user_error(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(UserError, match=rf"--port must be in 0\.\.65535, got {port}"):
        agent_mod.serve("onnxruntime", "127.0.0.1", port, TOKEN_ENV, 1.0)


@pytest.mark.parametrize("mb", [0.0, -1.0, math.nan, math.inf])
def test_max_body_mb_must_be_finite_and_positive(monkeypatch: pytest.MonkeyPatch, mb: float) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(UserError, match=r"--max-body-mb must be a finite number > 0"):
        make_server("onnxruntime", "127.0.0.1", 0, TOKEN_ENV, mb)


def test_refused_values_are_echoed_short() -> None:
    assert agent_mod._show("x" * 10_000).endswith("...") and len(agent_mod._show("x" * 10_000)) == 40
    assert "digits" in agent_mod._show(10 ** 10_000)  # repr itself would raise on the digit limit
