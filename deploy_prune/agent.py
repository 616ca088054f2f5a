"""The remote profiling agent: measure latency on a device, drive everything else from a workstation.

``deploy-prune agent serve`` runs on the device (a Jetson, a phone dev board, a bare server)
and times ONNX models with one local backend; ``latency.remote.AgentMeasurer`` is its client, picked by
``measurer_for`` when a target YAML has an ``agent:`` block::

    agent:
      url: http://127.0.0.1:8765          # where the agent listens (often an SSH tunnel)
      token_env: DEPLOY_PRUNE_AGENT_TOKEN  # variable holding the shared token (this is the default)
      timeout_s: 900                       # read time-out of one measurement request

Protocol (HTTP/1.0, JSON bodies, one request per connection):

``GET /info``
    ``{"tool_version", "backend", "backend_versions", "device", "cpu", "hostname", "platform",
    "cpu_count", "max_body_mb", "max_request_s"}``.
``POST /time``
    Body ``{"target": {name, backend, device, precision, threads, batch, input_shape, options, ...},
    "protocol": {"warmup", "repeats", "rounds", "min_time_s"}, "models": {key: base64 ONNX}}``.
    ``options`` may hold only ``options.<the agent's backend>``, and in it only the options of
    ``_BACKEND_OPTIONS`` (scheduling and precision settings; none that names a file or directory,
    such as OpenVINO's ``CACHE_DIR``), with values of the kind listed there.
    Answer ``{"stats": {key: Stats.as_dict()}, "shapes": {key: first input shape}, "info": {...}}``.
    With ``"layer_runs": N`` in the body the answer adds ``"layers": {key: {node: ms}}``, the
    backend's own per-node times (interquartile mean of N runs), as ``LocalMeasurer.layer_times`` gives them.
    The agent times the models with exactly the code a local run uses
    (``LocalMeasurer`` and ``deploy_prune.latency.timing.measure``), one request at a time, so
    that two clients never disturb each other's timings. Before each model is loaded and each
    run of a model, the work stops once it has run ``MAX_REQUEST_S`` (answered with a 400 saying
    so) or once the client has closed its connection, which is also looked at while the request
    waits for its turn (nothing is answered; the log shows status 499). A client that closes
    only its sending side counts as gone. Per-layer counters (``layer_runs``) stop between
    models only.

Errors are JSON ``{"error": message}`` with 400 (bad request, bad model, wrong backend, any
``UserError``; also a body shorter than its Content-Length, a model with external data, bad JSON
including bare ``NaN``/``Infinity``, a protocol number out of range, a backend option not allowed,
a model input that is not float32 (or uint8/int8), a model whose inputs would hold more than
``MAX_INPUT_ELEMENTS`` elements once ``batch`` and ``input_shape`` are applied, and work past
``MAX_REQUEST_S``), 401 (token), 404, 405, 411 (no Content-Length), 413 (over ``--max-body-mb``),
503 (over ``MAX_CONNECTIONS`` open connections; retry shortly) or 500 (unexpected failure:
exception type and first line). The client turns each into one ``UserError`` line naming the URL
and the fix.

Security model: the agent runs models it is sent, so only holders of the shared token may talk
to it. The token lives in an environment variable on both ends (never on a command line, where
``ps`` would show it, and never in the target YAML, which gets committed), and must be at least
``MIN_TOKEN_CHARS`` long. Every request, even to an unknown path, must carry
``Authorization: Bearer <token>``; it is compared in constant time (``hmac.compare_digest``)
before anything else is looked at. Request size is checked from ``Content-Length`` before the
body is read, so an oversized upload is refused without being buffered; the body is read with a
``BODY_TIMEOUT_S`` stall limit, so a client that sends less than it announced gets a quick 400
instead of holding a thread. At most ``MAX_CONNECTIONS`` connections are served at once (one
thread each); the accepting thread answers any beyond that with 503 itself. Every number of the
protocol is checked against a range (``_PROTOCOL_LIMITS``), every model must parse, keep its
weights inside (external data would make the backend open files on the device, relative to the
agent's working directory) and pass ``onnx.checker`` before a backend sees it, and every answer is
strict JSON (no ``NaN``). Backend options come from an allow-list (``_BACKEND_OPTIONS``), so a
request cannot point the backend at files or directories of the device. The memory a request
makes the agent allocate is bounded by ``MAX_INPUT_ELEMENTS`` per model, and the time it keeps
the agent busy by ``MAX_REQUEST_S`` and by its client staying connected. The log names method,
path, status and duration, never headers or the token; the path and any traceback are logged
with control characters escaped (``_printable``). Plain HTTP carries the token and the models
unencrypted, so the agent listens on 127.0.0.1 by default; across a network, forward the port
through SSH (``ssh -N -L 8765:127.0.0.1:8765 device``) rather than binding to a public address,
or put it behind a TLS-terminating proxy (``https://`` URLs work).

This is one module, over the usual length, because it is the agent's whole surface: the request
handler, the checks every request and model passes, and the server's connection and size limits
are what a remote client can reach, and they are kept together so that the security model above
can be read off one file.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import ipaddress
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from deploy_prune import __version__
from deploy_prune.config import PROTOCOL_MAX, Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.io import cpu_model
from deploy_prune.latency.remote import (
    _CLIENT_ONLY_KEYS,
    _MIB,
    _PROTOCOL_FIELDS,
    _dumps,
    _first_line,
    _loads,
)
from deploy_prune.target import target_from_dict

MIN_TOKEN_CHARS = 16  # shorter shared tokens are refused at start
REQUEST_TIMEOUT_S = 30.0  # per socket operation for the request line, headers and answer
BODY_TIMEOUT_S = 5.0  # per read of the body: a client that stalls this long gets a 400
MAX_CONNECTIONS = 32  # connections (threads) served at once; more get a 503 from the accepting thread
REFUSE_TIMEOUT_S = 0.5  # bound on each socket operation while answering such a 503
# Valid ranges of the request's numbers: (int or float, lowest, highest). Beyond them a request
# would run for hours or overflow a conversion, so it is refused with a 400 naming the range.
# The same ranges as a target file's (config.PROTOCOL_MAX), so what is valid locally is valid here.
_PROTOCOL_LIMITS: dict[str, tuple[type, float, float]] = {
    "warmup": (int, 0, PROTOCOL_MAX["warmup"]), "repeats": (int, 1, PROTOCOL_MAX["repeats"]),
    "rounds": (int, 1, PROTOCOL_MAX["rounds"]), "min_time_s": (float, 0, PROTOCOL_MAX["min_time_s"]),
}
_TARGET_LIMITS: dict[str, tuple[type, float, float]] = {"threads": (int, 0, 4096), "batch": (int, 1, 65536)}
_MAX_DIM = 65536  # largest entry of input_shape
# Elements of all the inputs one model is fed (batch and input_shape resolved as ``feed_for``
# does): 2**26, 256 MiB of float32, over 20 images of 3x1024x1024.
MAX_INPUT_ELEMENTS = 1 << 26
# Seconds of work one POST /time may take once it holds the measurement lock (loading, warm-up,
# timing); past it the work stops and the client gets a 400. Twice the longest read time-out a
# bundled target sets (jetson-orin-nano: 1800 s, for TensorRT engine builds), so that work a
# client still waits for is not cut; a client that gives up sooner stops the work by closing.
MAX_REQUEST_S = 3600.0
CLIENT_POLL_S = 0.25  # how often running work checks that its client is still connected


@dataclasses.dataclass(frozen=True)
class _Option:
    """One backend option a request may set: what its value must be (shown in errors) and the test."""

    what: str
    ok: Callable[[Any], bool]


def _one_of(*values: str) -> _Option:
    return _Option("one of " + ", ".join(values), lambda v: isinstance(v, str) and v in values)


def _int_in(lo: int, hi: int, *words: str) -> _Option:
    what = f"an integer in [{lo}, {hi}]" + "".join(f" or {w}" for w in words)
    return _Option(what, lambda v: (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi)
                   or (isinstance(v, str) and v in words))


_FLAG = _Option("true, false, YES or NO", lambda v: isinstance(v, bool) or v in ("YES", "NO"))
_BOOL = _Option("true or false", lambda v: isinstance(v, bool))
# The backend options (``target.options.<backend>``) a request may set: settings of how the
# backend schedules and computes, none that names a file or directory (OpenVINO's CACHE_DIR or
# WEIGHTS_PATH would make the agent write or read paths the client picks). The onnxruntime
# backend reads no options; torch's and tensorrt's are those their backends take.
_BACKEND_OPTIONS: dict[str, dict[str, _Option]] = {
    "onnxruntime": {},
    "openvino": {
        "PERFORMANCE_HINT": _one_of("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"),
        "PERFORMANCE_HINT_NUM_REQUESTS": _int_in(0, 1024),
        "NUM_STREAMS": _int_in(0, 4096, "AUTO"),
        "INFERENCE_NUM_THREADS": _int_in(0, 4096),
        "INFERENCE_PRECISION_HINT": _one_of("f32", "bf16", "f16"),
        "EXECUTION_MODE_HINT": _one_of("PERFORMANCE", "ACCURACY"),
        "ENABLE_CPU_PINNING": _FLAG,
        "ENABLE_HYPER_THREADING": _FLAG,
        "SCHEDULING_CORE_TYPE": _one_of("ANY_CORE", "PCORE_ONLY", "ECORE_ONLY"),
        "CPU_DENORMALS_OPTIMIZATION": _FLAG,
    },
    "torch": {
        "compile": _BOOL,
        "compile_mode": _one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        "cudnn_benchmark": _BOOL,
    },
    "tensorrt": {
        "workspace_mb": _int_in(1, 1 << 20),
        "builder_optimization_level": _int_in(0, 5),
        "tf32": _BOOL,
        "cache": _BOOL,  # engines go to the agent's own cache directory (backends.tensorrt.cache_dir)
    },
}


def _show(value: Any, limit: int = 40) -> str:
    """``repr`` cut short: a refused value is echoed in the error, but never a whole upload."""
    try:
        text = repr(value)
    except ValueError:  # an int over Python's digit limit
        text = f"an integer of about {value.bit_length() * 0.30103:.0f} digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_LOG_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _printable(text: str) -> str:
    """``text`` for a log line, escaped as a Python string literal would be (backslash, ``\\n``,
    ``\\r``, ``\\t``, ``\\xNN``, ``\\uNNNN``) wherever it is not printable, so that a request can
    neither start log lines nor send terminal escapes through the log."""
    out = []
    for ch in text:
        if ch in _LOG_ESCAPES:
            out.append(_LOG_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1] if ord(ch) > 0xFF else f"\\x{ord(ch):02x}")
    return "".join(out)








def _check_number(where: str, value: Any, kind: type, lo: float, hi: float) -> Any:
    """``value`` if it is a finite ``kind`` (int, or any number for float) in [lo, hi], else a 400 naming the range."""
    span = "[" + ", ".join(str(int(x)) if float(x).is_integer() else f"{x:g}" for x in (lo, hi)) + "]"
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        what = f"an integer in {span}"
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and lo <= value <= hi)
        what = f"a number in {span}"
    if not ok:
        raise _HTTPError(400, f"{where} must be {what}, got {_show(value)}")
    return value


def _log_traceback(e: BaseException) -> None:
    """``e``'s traceback on stderr, its message escaped whole (``_printable``): a message may quote
    what a request sent (a model's node names), and none of it may start a log line of its own."""
    te = traceback.TracebackException.from_exception(e)
    stack = "".join(te.stack.format()).rstrip("\n").split("\n")
    message = "".join(te.format_exception_only()).rstrip("\n")
    print("Traceback (most recent call last):", *(_printable(line) for line in stack), _printable(message),
          sep="\n", file=sys.stderr, flush=True)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The client closed its connection: nobody waits for the work's result."""


class _OverTime(Exception):
    """The work ran past ``MAX_REQUEST_S``."""


def _client_gone(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` (or reset it): a non-blocking peek finds the end of the
    stream. A client that has sent its request and waits for the answer sends nothing more."""
    timeout = sock.gettimeout()
    try:
        sock.settimeout(0.0)
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:  # nothing to read: still there
        return False
    except OSError:  # reset, or closed here
        return True
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass


class _Watch:
    """Stops a request's work, between two runs of a model: past ``MAX_REQUEST_S`` from
    ``start`` (``_OverTime``) or once the client has closed its connection (``_ClientGone``,
    looked at every ``CLIENT_POLL_S``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = math.inf
        self.next_poll = 0.0

    def start(self) -> None:
        self.deadline = time.monotonic() + MAX_REQUEST_S

    def check(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise _OverTime
        if now >= self.next_poll:
            self.next_poll = now + CLIENT_POLL_S
            if _client_gone(self.sock):
                raise _ClientGone


def _watched_measurer(target: Target, watch: _Watch) -> Any:
    """A ``LocalMeasurer`` for ``target`` whose every run of a model, and every model loaded,
    first passes ``watch.check()`` (outside the timed span: ``time_once`` times itself)."""
    from deploy_prune.latency.measure import LocalMeasurer, ModelSource

    class Watched(LocalMeasurer):
        def timer(self, key: str, model: ModelSource) -> Callable[[], float]:
            watch.check()
            run = super().timer(key, model)
            check = watch.check

            def timed() -> float:
                check()
                return run()

            return timed

        def layer_times(self, models: Mapping[str, ModelSource], runs: int = 20) -> dict[str, dict[str, float]]:
            out: dict[str, dict[str, float]] = {}
            for key, src in models.items():  # a model's own counter runs have no stop in between
                watch.check()
                out.update(super().layer_times({key: src}, runs))
            return out

    return Watched(target)


class _AgentServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never blocks shutdown
    allow_reuse_address = True

    backend_name: str
    token: bytes
    max_body: int
    info: dict[str, Any]
    lock: threading.Lock
    max_connections: int
    slots: threading.BoundedSemaphore  # one per connection being served (MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on a thread if a slot is free, else answer 503 here.

        ``ThreadingHTTPServer`` would start one thread per connection without limit; the slot
        is given back when the thread ends (``process_request_thread``).
        """
        if not self.slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: it will not release the slot
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse(self, request: Any, client_address: Any) -> None:
        """Answer 503 on the accepting thread, spending about a second at most and no thread.

        The answer goes out before the request is read (HTTP clients accept that); what the
        client sends is then read and dropped for a moment, so that closing does not reset the
        connection and hide the answer from it.
        """
        message = (f"too many connections: this agent serves at most {self.max_connections} at once; "
                   "retry shortly")
        body = _dumps({"error": message})
        head = ("HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode("ascii")
        try:
            request.settimeout(REFUSE_TIMEOUT_S)
            request.sendall(head + body)
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + REFUSE_TIMEOUT_S
            while time.monotonic() < deadline and request.recv(1 << 16):
                pass
        except OSError:
            pass
        self.shutdown_request(request)
        print(f"agent: {client_address[0]} - - 503 0.000s (too many connections)", file=sys.stderr, flush=True)


class _AgentServer6(_AgentServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _AgentServer
    server_version = f"deploy-prune-agent/{__version__}"

    def setup(self) -> None:
        # Seconds per socket operation, read here (not at import) so that tests can shorten it:
        # a client that stalls in its request line or headers releases its thread.
        super().setup()
        self.connection.settimeout(REQUEST_TIMEOUT_S)

    # The default access log prints the request line to stderr; we log our own line instead.
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        t0 = time.perf_counter()
        path = self.path.split("?", 1)[0]
        self._body_read = False
        note = ""
        try:
            self._check_token()
            routes: dict[str, dict[str, Callable[[], dict[str, Any]]]] = {
                "/info": {"GET": lambda: self.server.info},
                "/time": {"POST": self._time},
            }
            if path not in routes:
                raise _HTTPError(404, f"no such endpoint {path!r}; the agent serves GET /info and POST /time")
            if method not in routes[path]:
                raise _HTTPError(405, f"{path} takes {', '.join(routes[path])}, not {method}")
            status, answer = 200, routes[path][method]()
        except _ClientGone:
            status, answer, note = 499, None, " (client closed the connection; its work was stopped)"
        except _HTTPError as e:
            status, answer = e.status, {"error": e.message}
        except UserError as e:
            status, answer = 400, {"error": str(e)}
        except Exception as e:  # reported to the client; the agent keeps serving
            _log_traceback(e)
            status, answer = 500, {"error": f"{type(e).__name__}: {_first_line(e)}"}
        if answer is not None:
            try:
                data = _dumps(answer)
            except ValueError as e:  # a NaN or infinity in the answer: strict JSON has no token for it
                status, data = 500, _dumps({"error": f"the agent's answer holds a non-finite number ({_first_line(e)})"})
            try:
                self._reply(status, data)
            except OSError:  # the client went away
                pass
        print(f"agent: {self.client_address[0]} {method} {_printable(path)} {status} "
              f"{time.perf_counter() - t0:.3f}s{note}", file=sys.stderr, flush=True)

    def _check_token(self) -> None:
        got = self.headers.get("Authorization", "")
        scheme, _, value = got.partition(" ")
        ok = hmac.compare_digest(value.strip().encode("utf-8"), self.server.token)
        if scheme.lower() != "bearer" or not ok:
            raise _HTTPError(401, "missing or wrong token; send 'Authorization: Bearer <token>' with the agent's token")

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers or self.headers.get("Content-Length") is None:
            raise _HTTPError(411, "send the body with a Content-Length header")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if length < 0:
            raise _HTTPError(400, f"bad Content-Length {self.headers['Content-Length']!r}")
        if length > self.server.max_body:
            limit = self.server.max_body / _MIB
            raise _HTTPError(413, f"request body is {length / _MIB:.1f} MiB, over this agent's limit of {limit:g} MiB "
                                  "(restart the agent with a larger --max-body-mb)")
        return self._read_exactly(length)

    def _read_exactly(self, length: int) -> bytes:
        """The body's ``length`` bytes, or a 400 as soon as the client closes or stalls for ``BODY_TIMEOUT_S``."""
        self._body_read = True  # whatever happens next, there is nothing left to drain
        chunks: list[bytes] = []
        got = 0
        stalled = False
        self.connection.settimeout(BODY_TIMEOUT_S)
        try:
            while got < length:
                chunk = self.rfile.read1(min(length - got, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except TimeoutError:
            stalled = True
        except OSError:  # reset by the client: the answer will not reach it anyway
            pass
        finally:
            self.connection.settimeout(REQUEST_TIMEOUT_S)
        if got < length:
            why = f"; nothing arrived for {BODY_TIMEOUT_S:g} s" if stalled else ""
            raise _HTTPError(400, f"the body ended before its Content-Length ({got} of {length} bytes){why}")
        return b"".join(chunks)

    def _time(self) -> dict[str, Any]:
        body = self._read_body()
        try:
            req = _loads(body)
        except (ValueError, RecursionError) as e:  # also bare NaN, over-long integers, deep nesting
            raise _HTTPError(400, f"body is not valid JSON: {_first_line(e)}") from None
        if not isinstance(req, dict):
            raise _HTTPError(400, "body must be a JSON object with target, protocol and models")
        missing = [k for k in ("target", "protocol", "models") if k not in req]
        if missing:
            raise _HTTPError(400, f"body lacks {', '.join(missing)}; send target, protocol and models")
        target = _target_from_request(req["target"])
        if target.backend != self.server.backend_name:
            raise _HTTPError(400, f"this agent serves backend {self.server.backend_name!r}, not {target.backend!r}; "
                                  f"start one with --backend {target.backend} or use a {self.server.backend_name} target")
        _check_options(target.options, target.backend)
        protocol = _protocol_from_request(req["protocol"])
        models = _models_from_request(req["models"], target)
        layer_runs = _check_number("layer_runs", req.get("layer_runs", 0), int, 0, 10000)
        watch = _Watch(self.connection)
        # One measurement at a time: concurrent runs would skew each other. A client that leaves
        # while waiting gives up its turn.
        while not self.server.lock.acquire(timeout=CLIENT_POLL_S):
            watch.check()
        try:
            watch.start()
            m = _watched_measurer(dataclasses.replace(target, agent=None), watch)
            stats = m.time(models, protocol)
            layers = m.layer_times(models, layer_runs) if layer_runs else None
        except _OverTime:
            raise _HTTPError(400, f"the request ran past this agent's limit of {MAX_REQUEST_S:g} s of work per request "
                                  "and was stopped; ask for less per request (fewer models, repeats or rounds, "
                                  "a smaller min_time_s or layer_runs)") from None
        finally:
            self.server.lock.release()
        answer = {"stats": {k: s.as_dict() for k, s in stats.items()}, "shapes": m.shapes, "info": self.server.info}
        if layers is not None:
            answer["layers"] = layers
        return answer

    def _reply(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="deploy-prune agent"')
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        if not self._body_read:
            self._drain()

    def _drain(self) -> None:
        """Read and discard an unread request body (bounded), so the client gets our answer.

        A client such as ``urllib`` sends its whole body before reading the answer; closing the
        socket with unread data would reset the connection and hide a 401 or 413 from it.
        """
        try:
            left = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        left = min(left, 2 * self.server.max_body + 16 * _MIB)
        deadline = time.monotonic() + 30.0
        try:
            self.connection.settimeout(5.0)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass


def _target_from_request(raw: Any) -> Target:
    """The target sent, its numbers checked first: ``target_from_dict`` trusts YAML-sized values."""
    if not isinstance(raw, dict):
        raise _HTTPError(400, "target must be a JSON object with the fields of a target YAML")
    for k, (kind, lo, hi) in (_TARGET_LIMITS | _PROTOCOL_LIMITS).items():
        if k in raw:
            _check_number(f"target.{k}", raw[k], kind, lo, hi)
    shape = raw.get("input_shape")
    if shape is not None:
        if not isinstance(shape, list) or not 1 <= len(shape) <= 8:
            raise _HTTPError(400, f"target.input_shape must be a list of 1 to 8 integers (C,H,W), got {_show(shape)}")
        for d in shape:
            _check_number("target.input_shape entries", d, int, 1, _MAX_DIM)
    # The request's protocol is the one used: protocol keys in the target are checked, then dropped.
    fields = {k: v for k, v in raw.items() if k not in _CLIENT_ONLY_KEYS and k not in _PROTOCOL_LIMITS}
    return target_from_dict(fields, source="sent to the agent")


def _key(name: str) -> str:
    """An option's name as it goes into a dotted path in an error: as is when it is a plain word, else quoted (``_show``)."""
    return name if name.replace("_", "").isalnum() and name.isascii() and len(name) <= 40 else _show(name)


def _check_options(options: dict[str, Any], backend: str) -> None:
    """A 400 unless ``options`` holds only ``options.<backend>`` with keys and values of ``_BACKEND_OPTIONS``."""
    allowed = _BACKEND_OPTIONS.get(backend, {})
    listed = ", ".join(allowed) if allowed else f"none (backend {backend} here takes no options)"
    for name, sub in options.items():
        if name != backend:
            raise _HTTPError(400, f"target.options.{_key(name)} is not for backend {backend}, which this agent serves; "
                                  f"options go under target.options.{backend} (allowed: {listed})")
        if sub is not None and not isinstance(sub, dict):
            raise _HTTPError(400, f"target.options.{backend} must be a mapping of options; allowed: {listed}")
        for key, value in (sub or {}).items():
            option = allowed.get(key)
            if option is None:
                raise _HTTPError(400, f"target.options.{backend}.{_key(key)} is not an option this agent accepts; "
                                      f"allowed: {listed}")
            if not option.ok(value):
                raise _HTTPError(400, f"target.options.{backend}.{key} must be {option.what}, got {_show(value)}")


def _check_inputs(key: str, graph: Any, target: Target) -> None:
    """A 400 for an input the agent cannot feed: an element type ``feed_for`` does not make
    (``backends.FEED_DTYPES``), or more than ``MAX_INPUT_ELEMENTS`` elements in all (dims resolved as
    ``feed_for`` resolves them: ``batch`` for a dynamic first dim, ``input_shape`` for the rest
    of the first input's; a dim still unknown is left to ``feed_for``'s error)."""
    from deploy_prune.backends import FEED_DTYPES, onnx_dtype_name

    weights = {t.name for t in graph.initializer}
    total, shown = 0, []
    for i, vi in enumerate(v for v in graph.input if v.name not in weights):
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            raise _HTTPError(400, f"model {key} input {_show(vi.name)} is a {kind or 'value of no type'}, not a tensor; "
                                  "the agent feeds float32 tensors (uint8/int8 for a quantized layer's input)")
        name = onnx_dtype_name(vi)
        if name not in FEED_DTYPES:
            raise _HTTPError(400, f"model {key} input {_show(vi.name)} is {name}; the agent feeds float inputs "
                                  "(float32, or uint8/int8 for a quantized layer's input): export the model with a "
                                  "float32 input")
        if not vi.type.tensor_type.HasField("shape"):
            continue
        dims: list[int | None] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                  for d in vi.type.tensor_type.shape.dim]
        if i == 0 and dims and dims[0] is None:
            dims[0] = target.batch
        if i == 0 and target.input_shape and any(d is None for d in dims[1:]):
            dims = [dims[0], *target.input_shape]
        if any(d is None for d in dims):
            continue
        total += math.prod(d for d in dims if d is not None)
        shown.append(f"{_show(vi.name)} {'x'.join(str(d) for d in dims)}")
    if total > MAX_INPUT_ELEMENTS:
        gib = total * 4 / (1024 * _MIB)
        raise _HTTPError(400, f"model {key} would be fed {total} input elements ({', '.join(shown[:3])}; {gib:.1f} GiB "
                              f"as float32), over this agent's cap of {MAX_INPUT_ELEMENTS} "
                              f"({MAX_INPUT_ELEMENTS * 4 // _MIB} MiB); ask for a smaller target.input_shape or batch")


def _protocol_from_request(raw: Any) -> Protocol:
    if not isinstance(raw, dict):
        raise _HTTPError(400, f"protocol must be a JSON object with {', '.join(_PROTOCOL_FIELDS)}")
    missing = [k for k in _PROTOCOL_FIELDS if k not in raw]
    if missing:
        raise _HTTPError(400, f"protocol lacks {', '.join(missing)}")
    vals = {k: _check_number(f"protocol.{k}", raw[k], *_PROTOCOL_LIMITS[k]) for k in _PROTOCOL_FIELDS}
    return Protocol(warmup=vals["warmup"], repeats=vals["repeats"], rounds=vals["rounds"],
                    min_time_s=float(vals["min_time_s"]))


def _models_from_request(raw: Any, target: Target) -> dict[str, bytes]:
    import onnx

    if not isinstance(raw, dict) or not raw:
        raise _HTTPError(400, "models must be a non-empty JSON object {key: base64 ONNX bytes}")
    out: dict[str, bytes] = {}
    for key, b64 in raw.items():
        if not isinstance(b64, str):
            raise _HTTPError(400, f"model {key} must be a base64 string")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _HTTPError(400, f"model {key} is not valid base64: {_first_line(e)}") from None
        try:
            model = onnx.load_from_string(data)
        except Exception as e:  # protobuf DecodeError, ...
            raise _HTTPError(400, f"model {key} is not a valid ONNX model: {_first_line(e)}") from None
        # Before the checker and any backend: both would resolve the locations on this machine.
        external = _external_locations(model)
        if external:
            shown = ", ".join(_show(loc) for loc in external[:3]) + (", ..." if len(external) > 3 else "")
            raise _HTTPError(400, f"model {key} refers to external data files ({shown}); "
                                  "send a model with its weights inside")
        try:
            onnx.checker.check_model(model)
        except Exception as e:  # onnx ValidationError, ...
            raise _HTTPError(400, f"model {key} is not a valid ONNX model: {_first_line(e)}") from None
        _check_inputs(key, model.graph, target)
        out[key] = data
    return out


def _external_locations(model: Any) -> list[str]:
    """The ``location`` of every tensor kept outside ``model`` (sorted, unique).

    Looks at initializers, sparse initializers, tensor attributes (``Constant``) and, through
    graph attributes (``If``, ``Loop``, ``Scan``) and functions, at every subgraph.
    """
    import onnx

    found: set[str] = set()

    def tensor(t: Any) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            found.add(next((e.value for e in t.external_data if e.key == "location"), "(no location)"))

    def sparse(s: Any) -> None:
        tensor(s.values)
        tensor(s.indices)

    def nodes(ns: Any) -> None:
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                if a.HasField("sparse_tensor"):
                    sparse(a.sparse_tensor)
                if a.HasField("g"):
                    graph(a.g)
                for t in a.tensors:
                    tensor(t)
                for s in a.sparse_tensors:
                    sparse(s)
                for g in a.graphs:
                    graph(g)

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            sparse(s)
        nodes(g.node)

    graph(model.graph)
    for f in model.functions:
        nodes(f.node)
    return sorted(found)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(backend: str, host: str, port: int, token_env: str, max_body_mb: float) -> _AgentServer:
    """The agent's server, bound and configured but not serving yet (``serve`` runs it; tests
    run ``serve_forever`` on a thread and stop it with ``shutdown``)."""
    from deploy_prune.backends import get_backend

    token = os.environ.get(token_env, "").strip()
    make_one = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if not token:
        raise UserError(f"${token_env} is not set; export {token_env}=<a long random token> "
                        f"(e.g. {make_one}) and set the same variable on the machine that sends models")
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"${token_env} holds a {len(token)}-character token; the agent needs at least "
                        f"{MIN_TOKEN_CHARS} characters: make one with {make_one} and set it on both machines")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port!r}")
    if (isinstance(max_body_mb, bool) or not isinstance(max_body_mb, (int, float)) or not math.isfinite(max_body_mb)
            or max_body_mb <= 0):
        raise UserError(f"--max-body-mb must be a finite number > 0, got {max_body_mb!r}")
    b = get_backend(backend)
    info = {
        "tool_version": __version__,
        "backend": b.name,
        "backend_versions": b.versions(),
        "device": b.device_string(Target(name="agent", backend=b.name)),
        "cpu": cpu_model(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": _cpu_count(),
        "max_body_mb": max_body_mb,
        "max_request_s": MAX_REQUEST_S,
    }
    server_cls: type[_AgentServer] = _AgentServer6 if ":" in host else _AgentServer  # ":" = an IPv6 address
    try:
        httpd = server_cls((host, port), _Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None
    httpd.backend_name = b.name
    httpd.token = token.encode("utf-8")
    httpd.max_body = int(max_body_mb * _MIB)
    httpd.info = info
    httpd.lock = threading.Lock()
    httpd.max_connections = MAX_CONNECTIONS
    httpd.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    return httpd


def serve(backend: str, host: str, port: int, token_env: str, max_body_mb: float) -> None:
    """Serve ``GET /info`` and ``POST /time`` for ``backend`` until interrupted (see the module doc)."""
    httpd = make_server(backend, host, port, token_env, max_body_mb)
    port = httpd.server_address[1]  # the one chosen when --port is 0
    name = httpd.backend_name
    shown = f"[{host}]" if ":" in host else host
    print(f"agent: serving {name} on http://{shown}:{port} (token from ${token_env})", file=sys.stderr, flush=True)
    if not _is_loopback(host):
        print(f"agent: warning: listening on {host}, not loopback; the token and the models travel unencrypted "
              f"over HTTP. Prefer --host 127.0.0.1 and an SSH tunnel: ssh -N -L {port}:127.0.0.1:{port} <device>",
              file=sys.stderr, flush=True)

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _stop)  # `kill` stops it as cleanly as Ctrl-C
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("agent: stopped", file=sys.stderr, flush=True)
    finally:
        httpd.server_close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)


