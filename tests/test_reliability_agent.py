"""Bad input to `deploy-prune agent serve`: backend options, input sizes and types, requests that
ask for too much time or whose client leaves, and what reaches the log. The agent runs in this
process on a thread, so that its module constants can be monkeypatched and its lock looked at."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_hardening_agent import TOKEN, TOKEN_ENV, _log_has, _model, _post, _raw

import deploy_prune.agent as agent_mod
from deploy_prune.agent import make_server

TINY = {"warmup": 1, "repeats": 2, "rounds": 1, "min_time_s": 0.0}
# Far more work than any test may wait for: every run until 600 s of runs are covered.
ENDLESS = {"warmup": 1, "repeats": 10_000_000, "rounds": 1, "min_time_s": 600.0}
OV_ALLOWED = ", ".join(agent_mod._BACKEND_OPTIONS["openvino"])


@dataclass
class Served:
    url: str
    port: int
    httpd: Any


@contextmanager
def _serve(backend: str) -> Iterator[Served]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        httpd = make_server(backend, "127.0.0.1", 0, TOKEN_ENV, 1.0)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = int(httpd.server_address[1])
        yield Served(f"http://127.0.0.1:{port}", port, httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def ort() -> Iterator[Served]:
    with _serve("onnxruntime") as s:
        yield s


@pytest.fixture(scope="module")
def ov() -> Iterator[Served]:
    pytest.importorskip("openvino")
    with _serve("openvino") as s:
        yield s


def _request(model: Any, backend: str = "onnxruntime", protocol: dict[str, Any] | None = None,
             **target: Any) -> bytes:
    body = {"target": {"name": "t", "backend": backend, "threads": 1, **target}, "protocol": protocol or TINY,
            "models": {"m": base64.b64encode(model.SerializeToString()).decode()}}
    return json.dumps(body).encode()


def _graph(inputs: list[tuple[str, int, list[Any]]], nodes: list[Any], output: tuple[str, list[Any]]) -> Any:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _relu(shape: list[Any]) -> Any:
    """y = relu(x), x float32 of ``shape`` (names are dynamic dims)."""
    from onnx import TensorProto, helper

    return _graph([("x", TensorProto.FLOAT, shape)], [helper.make_node("Relu", ["x"], ["y"])], ("y", shape))


def _cast_input(elem_type: int) -> Any:
    """y = float(ids) + x: a float input ``x`` and an input ``ids`` of ``elem_type``."""
    from onnx import TensorProto, helper

    return _graph([("x", TensorProto.FLOAT, [4]), ("ids", elem_type, [4])],
                  [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "f"], ["y"])],
                  ("y", [4]))


# -- 1. backend options -------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["CACHE_DIR", "WEIGHTS_PATH"])
def test_openvino_path_options_are_refused_and_nothing_is_written(ov: Served, tmp_path: Path, option: str) -> None:
    where = tmp_path / "chosen-by-the-client"
    status, answer = _post(ov.url, _request(_model(), "openvino", options={"openvino": {option: str(where)}}))
    assert status == 400, answer
    assert answer["error"] == (f"target.options.openvino.{option} is not an option this agent accepts; "
                               f"allowed: {OV_ALLOWED}")
    assert not where.exists()
    assert list(tmp_path.iterdir()) == []


def test_openvino_unknown_property_is_named(ov: Served) -> None:
    status, answer = _post(ov.url, _request(_model(), "openvino", options={"openvino": {"NOT_A_PROPERTY": 1}}))
    assert status == 400 and answer["error"].startswith("target.options.openvino.NOT_A_PROPERTY is not an option")


@pytest.mark.parametrize(("key", "value", "expect"), [
    ("PERFORMANCE_HINT", "FAST", "must be one of LATENCY, THROUGHPUT, CUMULATIVE_THROUGHPUT, got 'FAST'"),
    ("NUM_STREAMS", -1, "must be an integer in [0, 4096] or AUTO, got -1"),
    ("INFERENCE_NUM_THREADS", True, "must be an integer in [0, 4096], got True"),
    ("ENABLE_CPU_PINNING", "/tmp/x", "must be true, false, YES or NO, got '/tmp/x'"),
])
def test_openvino_bad_values_are_named(ov: Served, key: str, value: Any, expect: str) -> None:
    status, answer = _post(ov.url, _request(_model(), "openvino", options={"openvino": {key: value}}))
    assert status == 400 and answer["error"] == f"target.options.openvino.{key} {expect}", answer


def test_openvino_allowed_options_are_applied(ov: Served) -> None:
    opts = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 1, "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "f32", "SCHEDULING_CORE_TYPE": "ANY_CORE"}
    status, answer = _post(ov.url, _request(_model(), "openvino", options={"openvino": opts}))
    assert status == 200, answer
    assert answer["stats"]["m"]["n"] >= 2


@pytest.mark.parametrize(("options", "expect"), [
    ({"onnxruntime": {"graph_optimization_level": 99}},
     "target.options.onnxruntime.graph_optimization_level is not an option this agent accepts; "
     "allowed: none (backend onnxruntime here takes no options)"),
    ({"openvino": {"CACHE_DIR": "/tmp/x"}},
     "target.options.openvino is not for backend onnxruntime, which this agent serves; options go under "
     "target.options.onnxruntime (allowed: none (backend onnxruntime here takes no options))"),
    ({"onnxruntime": ["x"]}, "target.options.onnxruntime must be a mapping of options"),
    ({"onnxruntime": {"a.b\nc": 1}}, "target.options.onnxruntime.'a.b\\nc' is not an option"),
])
def test_onnxruntime_options_are_refused(ort: Served, options: dict[str, Any], expect: str) -> None:
    status, answer = _post(ort.url, _request(_model(), options=options))
    assert status == 400 and answer["error"].startswith(expect), answer


# -- 2. input size --------------------------------------------------------------------------------


def test_huge_input_shape_is_refused_before_allocating(ort: Served) -> None:
    status, answer = _post(ort.url, _request(_relu(["N", 3, "H", "W"]), input_shape=[3, 65536, 65536]))
    assert status == 400, answer
    cap = agent_mod.MAX_INPUT_ELEMENTS
    assert answer["error"] == (f"model m would be fed 12884901888 input elements ('x' 1x3x65536x65536; 48.0 GiB as "
                               f"float32), over this agent's cap of {cap} ({cap * 4 // 2**20} MiB); ask for a smaller "
                               "target.input_shape or batch")


def test_huge_static_input_is_refused(ort: Served) -> None:
    status, answer = _post(ort.url, _request(_relu([64, 3, 4096, 4096])))
    assert status == 400 and answer["error"].startswith("model m would be fed 3221225472 input elements ('x' 64x3x4096x4096;")


def test_input_cap_counts_batch_and_shape(ort: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_mod, "MAX_INPUT_ELEMENTS", 100)
    model = _relu(["N", 3, "H", "W"])
    status, answer = _post(ort.url, _request(model, input_shape=[3, 4, 4], batch=2))  # 96 elements
    assert status == 200 and answer["shapes"]["m"] == [2, 3, 4, 4], answer
    status, answer = _post(ort.url, _request(model, input_shape=[3, 4, 4], batch=3))  # 144
    assert status == 400 and "144 input elements ('x' 3x3x4x4;" in answer["error"] and "cap of 100" in answer["error"]


# -- 3. time cap and clients that leave -----------------------------------------------------------


def test_work_past_the_time_cap_is_stopped(ort: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_mod, "MAX_REQUEST_S", 0.5)
    status, answer = _post(ort.url, _request(_model(), protocol=ENDLESS))  # urllib gives up after 30 s
    assert status == 400, answer
    assert answer["error"].startswith("the request ran past this agent's limit of 0.5 s of work per request and was stopped")
    status, answer = _post(ort.url, _request(_model()))  # the agent is free again
    assert status == 200 and answer["stats"]["m"]["n"] >= 2


def _send_and_leave(port: int, body: bytes, until: Any) -> None:
    """Send a POST /time with ``body``, wait until ``until()`` holds, then close the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((f"POST /time HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n")
                  .encode() + body)
        deadline = time.monotonic() + 20
        while not until():
            assert time.monotonic() < deadline, "the agent never got to the request"
            time.sleep(0.02)


def test_client_that_leaves_mid_measurement_frees_the_agent(ort: Served, capsys: pytest.CaptureFixture[str]) -> None:
    lock = ort.httpd.lock
    _send_and_leave(ort.port, _request(_model(), protocol=ENDLESS), lock.locked)  # it is timing: 600 s of work asked
    status, answer = _post(ort.url, _request(_model()))  # served (urllib waits 30 s at most)
    assert status == 200 and answer["stats"]["m"]["n"] >= 2
    log = _log_has(capsys, "POST /time 200")
    log += "" if "POST /time 499" in log else _log_has(capsys, "POST /time 499")
    gone = [line for line in log.splitlines() if " POST /time 499 " in line]
    assert len(gone) == 1 and gone[0].endswith("(client closed the connection; its work was stopped)"), log


def test_client_that_leaves_while_waiting_gives_up_its_turn(ort: Served, capsys: pytest.CaptureFixture[str]) -> None:
    lock = ort.httpd.lock
    assert lock.acquire(timeout=30)  # as if another request were being timed
    try:
        _send_and_leave(ort.port, _request(_model()), lambda: True)  # sent in full, then closed
        log = _log_has(capsys, "POST /time 499")  # answered while the lock is still held
        assert " POST /time 499 " in log, log
    finally:
        lock.release()
    status, _ = _post(ort.url, _request(_model()))
    assert status == 200


# -- 4. the log -------------------------------------------------------------------------------------


def test_control_characters_in_the_path_are_escaped_in_the_log(ort: Served, capsys: pytest.CaptureFixture[str]) -> None:
    path = "/a\x1b[31mred\x07\x00\x7f\\b"
    status, answer, _ = _raw(ort.port, f"GET {path} HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode("latin-1"))
    assert status == 404
    log = _log_has(capsys, "404")
    line = next(line for line in log.splitlines() if " 404 " in line)
    assert " GET /a\\x1b[31mred\\x07\\x00\\x7f\\\\b 404 " in line, line
    assert not any(c in log for c in "\x1b\x07\x00\x7f")


def test_printable_escapes_newlines() -> None:
    assert agent_mod._printable("/x\ny\r\tz\u2028") == "/x\\ny\\r\\tz\\u2028"
    assert agent_mod._printable("/plain/é") == "/plain/é"


def test_traceback_of_a_500_is_escaped(ort: Served, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from deploy_prune.latency.measure import LocalMeasurer

    def boom(self: Any, models: Any, protocol: Any = None, on_round: Any = None) -> Any:
        raise RuntimeError("node \x1b[2Jname\nfake log line")

    monkeypatch.setattr(LocalMeasurer, "time", boom)
    status, answer = _post(ort.url, _request(_model()))
    assert status == 500 and answer["error"] == "RuntimeError: node \x1b[2Jname"  # JSON escapes it on the wire
    log = _log_has(capsys, "POST /time 500")
    assert "RuntimeError: node \\x1b[2Jname\\nfake log line" in log and "\x1b" not in log, log


# -- 5. input types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("elem_type", "name"), [(7, "int64"), (10, "float16"), (11, "float64"), (9, "bool")])
def test_non_float_input_is_a_400_naming_it(ort: Served, elem_type: int, name: str) -> None:
    import onnx

    model = _cast_input(elem_type)
    onnx.checker.check_model(model)
    status, answer = _post(ort.url, _request(model))
    assert status == 400, answer
    assert answer["error"] == (f"model m input 'ids' is {name}; the agent feeds float inputs (float32, or uint8/int8 "
                               "for a quantized layer's input): export the model with a float32 input")


def test_uint8_input_is_still_fed(ort: Served) -> None:
    from onnx import TensorProto

    status, answer = _post(ort.url, _request(_cast_input(TensorProto.UINT8)))
    assert status == 200 and answer["stats"]["m"]["n"] >= 2, answer
