"""The remote profiling agent: measure latency on a device, drive everything else from a workstation.

``deploy-prune agent serve`` runs on the device (a Jetson, a phone dev board, a bare server)
and times ONNX models with one local backend; ``AgentMeasurer`` is its client, picked by
``measurer_for`` when a target YAML has an ``agent:`` block::

    agent:
      url: http://127.0.0.1:8765          # where the agent listens (often an SSH tunnel)
      token_env: DEPLOY_PRUNE_AGENT_TOKEN  # variable holding the shared token (this is the default)
      timeout_s: 900                       # read time-out of one measurement request

Protocol (HTTP/1.0, JSON bodies, one request per connection):

``GET /info``
    ``{"tool_version", "backend", "backend_versions", "device", "cpu", "hostname", "platform",
    "cpu_count", "max_body_mb"}``.
``POST /time``
    Body ``{"target": {name, backend, device, precision, threads, batch, input_shape, options, ...},
    "protocol": {"warmup", "repeats", "rounds", "min_time_s"}, "models": {key: base64 ONNX}}``.
    Answer ``{"stats": {key: Stats.as_dict()}, "shapes": {key: first input shape}, "info": {...}}``.
    With ``"layer_runs": N`` in the body the answer adds ``"layers": {key: {node: ms}}``, the
    backend's own per-node times (interquartile mean of N runs), as ``LocalMeasurer.layer_times`` gives them.
    The agent times the models with exactly the code a local run uses
    (``LocalMeasurer`` and ``deploy_prune.latency.timing.measure``), one request at a time, so
    that two clients never disturb each other's timings.

Errors are JSON ``{"error": message}`` with 400 (bad request, bad model, wrong backend, any
``UserError``), 401 (token), 404, 405, 411 (no Content-Length), 413 (over ``--max-body-mb``)
or 500 (unexpected failure: exception type and first line). The client turns each into one
``UserError`` line naming the URL and the fix.

Security model: the agent runs models it is sent, so only holders of the shared token may talk
to it. The token lives in an environment variable on both ends (never on a command line, where
``ps`` would show it, and never in the target YAML, which gets committed). Every request, even
to an unknown path, must carry ``Authorization: Bearer <token>``; it is compared in constant time
(``hmac.compare_digest``) before anything else is looked at. Request size is checked from
``Content-Length`` before the body is read, so an oversized upload is refused without being
buffered, and every model must parse and pass ``onnx.checker`` before a backend sees it. The
log names method, path, status and duration, never headers or the token. Plain HTTP carries the
token and the models unencrypted, so the agent listens on 127.0.0.1 by default; across a network,
forward the port through SSH (``ssh -N -L 8765:127.0.0.1:8765 device``) rather than binding to
a public address, or put it behind a TLS-terminating proxy (``https://`` URLs work).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import http.client
import ipaddress
import json
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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deploy_prune import __version__
from deploy_prune.config import Protocol, Target, target_from_dict
from deploy_prune.errors import UserError
from deploy_prune.io import cpu_model
from deploy_prune.latency.timing import Stats

DEFAULT_TOKEN_ENV = "DEPLOY_PRUNE_AGENT_TOKEN"
DEFAULT_TIMEOUT_S = 900.0  # read time-out of a measurement request
CONNECT_TIMEOUT_S = 10.0  # connect time-out, and read time-out of short requests (/info)
_MIB = 1024 * 1024
_AGENT_KEYS = {"url", "token_env", "timeout_s"}
_PROTOCOL_FIELDS = ("warmup", "repeats", "rounds", "min_time_s")
# Target.as_dict() keys that describe the client, not the measurement.
_CLIENT_ONLY_KEYS = {"threads_resolved", "protocol", "source", "agent", "channel_multiple_from"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


class _AgentServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never blocks shutdown
    allow_reuse_address = True

    backend_name: str
    token: bytes
    max_body: int
    info: dict[str, Any]
    lock: threading.Lock


class _AgentServer6(_AgentServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _AgentServer
    timeout = 120  # seconds per socket operation: a stalled client releases its thread
    server_version = f"deploy-prune-agent/{__version__}"

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
        except _HTTPError as e:
            status, answer = e.status, {"error": e.message}
        except UserError as e:
            status, answer = 400, {"error": str(e)}
        except Exception as e:  # reported to the client; the agent keeps serving
            traceback.print_exc(file=sys.stderr)
            status, answer = 500, {"error": f"{type(e).__name__}: {_first_line(e)}"}
        try:
            self._reply(status, answer)
        except OSError:  # the client went away
            pass
        print(f"agent: {self.client_address[0]} {method} {path} {status} {time.perf_counter() - t0:.3f}s",
              file=sys.stderr, flush=True)

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
        body = self.rfile.read(length)
        self._body_read = True
        if len(body) != length:
            raise _HTTPError(400, f"body ended after {len(body)} of {length} bytes")
        return body

    def _time(self) -> dict[str, Any]:
        body = self._read_body()
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
        protocol = _protocol_from_request(req["protocol"])
        models = _models_from_request(req["models"])

        from deploy_prune.latency.measure import LocalMeasurer

        layer_runs = req.get("layer_runs", 0)
        if not isinstance(layer_runs, int) or isinstance(layer_runs, bool) or not 0 <= layer_runs <= 10000:
            raise _HTTPError(400, f"layer_runs must be an integer in [0, 10000], got {layer_runs!r}")
        with self.server.lock:  # one measurement at a time: concurrent runs would skew each other
            m = LocalMeasurer(dataclasses.replace(target, agent=None))
            stats = m.time(models, protocol)
            layers = m.layer_times(models, layer_runs) if layer_runs else None
        answer = {"stats": {k: s.as_dict() for k, s in stats.items()}, "shapes": m.shapes, "info": self.server.info}
        if layers is not None:
            answer["layers"] = layers
        return answer

    def _reply(self, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode("utf-8")
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
    if not isinstance(raw, dict):
        raise _HTTPError(400, "target must be a JSON object with the fields of a target YAML")
    fields = {k: v for k, v in raw.items() if k not in _CLIENT_ONLY_KEYS}
    return target_from_dict(fields, source="sent to the agent")


def _protocol_from_request(raw: Any) -> Protocol:
    if not isinstance(raw, dict):
        raise _HTTPError(400, f"protocol must be a JSON object with {', '.join(_PROTOCOL_FIELDS)}")
    missing = [k for k in _PROTOCOL_FIELDS if k not in raw]
    if missing:
        raise _HTTPError(400, f"protocol lacks {', '.join(missing)}")
    vals = {k: raw[k] for k in _PROTOCOL_FIELDS}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals.values()):
        raise _HTTPError(400, f"protocol fields must be numbers, got {vals}")
    return Protocol(warmup=int(vals["warmup"]), repeats=int(vals["repeats"]), rounds=int(vals["rounds"]),
                    min_time_s=float(vals["min_time_s"]))


def _models_from_request(raw: Any) -> dict[str, bytes]:
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
            onnx.checker.check_model(onnx.load_from_string(data))
        except Exception as e:  # protobuf DecodeError, onnx ValidationError, ...
            raise _HTTPError(400, f"model {key} is not a valid ONNX model: {_first_line(e)}") from None
        out[key] = data
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(backend: str, host: str, port: int, token_env: str, max_body_mb: float) -> None:
    """Serve ``GET /info`` and ``POST /time`` for ``backend`` until interrupted (see the module doc)."""
    from deploy_prune.backends import get_backend

    token = os.environ.get(token_env, "")
    if not token.strip():
        raise UserError(f"${token_env} is not set; export {token_env}=<a long random token> "
                        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))') "
                        "and set the same variable on the machine that sends models")
    if max_body_mb <= 0:
        raise UserError(f"--max-body-mb must be positive, got {max_body_mb:g}")
    b = get_backend(backend)
    max_body = int(max_body_mb * _MIB)
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
    }
    server_cls: type[_AgentServer] = _AgentServer6 if ":" in host else _AgentServer  # ":" = an IPv6 address
    try:
        httpd = server_cls((host, port), _Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None
    httpd.backend_name = b.name
    httpd.token = token.strip().encode("utf-8")
    httpd.max_body = max_body
    httpd.info = info
    httpd.lock = threading.Lock()

    shown = f"[{host}]" if ":" in host else host
    print(f"agent: serving {b.name} on http://{shown}:{port} (token from ${token_env})", file=sys.stderr, flush=True)
    if not _is_loopback(host):
        print(f"agent: warning: listening on {host}, not loopback; the token and the models travel unencrypted "
              f"over HTTP. Prefer --host 127.0.0.1 and an SSH tunnel: ssh -N -L {port}:127.0.0.1:{port} <device>",
              file=sys.stderr, flush=True)
    if len(token.strip()) < 16:
        print("agent: warning: the token is shorter than 16 characters; use a long random one",
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


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


def _where(target: Target) -> str:
    if target.source and not target.source.startswith("<"):
        return f"target file {target.source!r}"
    return f"target {target.name!r}"


class AgentMeasurer:
    """Measures on a device through ``deploy-prune agent serve`` (the target's ``agent:`` block)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.shapes: dict[str, list[int]] = {}
        self._agent_info: dict[str, Any] | None = None
        where = self.where = _where(target)
        cfg = target.agent
        if not isinstance(cfg, dict):
            raise UserError(f"{where}: agent must be a mapping with url, and optionally token_env and timeout_s")
        unknown = set(cfg) - _AGENT_KEYS
        if unknown:
            raise UserError(f"{where}: unknown agent key(s) {sorted(unknown)}; valid keys: {sorted(_AGENT_KEYS)}")
        url = cfg.get("url")
        if not isinstance(url, str) or not url.strip():
            raise UserError(f"{where}: agent.url is missing; set it to the agent's address, e.g. http://127.0.0.1:8765")
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"{where}: agent.url {url!r} must be an http:// or https:// URL, e.g. http://127.0.0.1:8765")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise UserError(f"{where}: agent.url {url!r} has a bad port; e.g. http://127.0.0.1:8765") from None
        self.url = url.strip().rstrip("/")
        self._parts = parts
        token_env = cfg.get("token_env", DEFAULT_TOKEN_ENV)
        if not isinstance(token_env, str) or not token_env:
            raise UserError(f"{where}: agent.token_env must name an environment variable, e.g. {DEFAULT_TOKEN_ENV}")
        self.token_env = token_env
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise UserError(f"{where} measures through the agent at {self.url}, but ${token_env} is not set; "
                            f"export {token_env}=<the token the agent was started with>")
        self._token = token
        timeout = cfg.get("timeout_s", DEFAULT_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise UserError(f"{where}: agent.timeout_s must be a positive number of seconds, got {timeout!r}")
        self.timeout_s = float(timeout)

    # -- HTTP ------------------------------------------------------------------------------

    def _unreachable(self, reason: str) -> UserError:
        return UserError(f"agent at {self.url} is unreachable ({reason}); "
                         f"start `deploy-prune agent serve` on the device or fix agent.url in {self.where}")

    def _call(self, method: str, path: str, body: bytes | None = None, read_timeout: float = CONNECT_TIMEOUT_S) -> Any:
        p = self._parts
        cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = cls(p.hostname, p.port, timeout=CONNECT_TIMEOUT_S)  # type: ignore[arg-type]
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(read_timeout)
            conn.request(method, p.path.rstrip("/") + path, body=body, headers=headers)
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        except TimeoutError:  # socket.timeout
            if conn.sock is None:
                raise self._unreachable(f"no connection within {CONNECT_TIMEOUT_S:g} s") from None
            hint = "; a long measurement may need a larger agent.timeout_s" if body is not None else ""
            raise self._unreachable(f"no answer within {read_timeout:g} s{hint}") from None
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "strerror", None) or _first_line(e)
            raise self._unreachable(reason) from None
        finally:
            conn.close()
        try:
            answer = json.loads(data) if data else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            answer = None
        message = answer.get("error") if isinstance(answer, dict) else None
        if status == 401:
            raise UserError(f"agent at {self.url} rejected the token (HTTP 401); "
                            f"set ${self.token_env} to the token the agent was started with")
        if status == 413:
            raise UserError(f"request to agent at {self.url} is too large (HTTP 413: {message or 'body too large'}); "
                            "restart the agent with a larger --max-body-mb")
        if status != 200:
            detail = message or data[:200].decode("utf-8", "replace").strip() or "no details"
            raise UserError(f"agent at {self.url} answered HTTP {status}: {detail}")
        if not isinstance(answer, dict):
            raise UserError(f"agent at {self.url} sent an answer that is not a JSON object; is agent.url in {self.where} "
                            "really a deploy-prune agent?")
        return answer

    def agent_info(self) -> dict[str, Any]:
        """The agent's ``GET /info`` (fetched once)."""
        if self._agent_info is None:
            info = self._call("GET", "/info")
            missing = [k for k in ("backend", "backend_versions", "device", "cpu_count") if k not in info]
            if missing:
                raise UserError(f"agent at {self.url} sent /info without {', '.join(missing)}; "
                                "is it a deploy-prune agent of a matching version?")
            self._agent_info = info
        return self._agent_info

    # -- Measurer protocol -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        a = self.agent_info()
        return {
            "where": self.url, "backend": a["backend"], "backend_versions": a["backend_versions"],
            "device": a["device"], "threads": self.target.threads if self.target.threads > 0 else a["cpu_count"],
            "precision": self.target.precision,
        }

    def _payload_target(self) -> dict[str, Any]:
        d = self.target.as_dict()
        return {k: v for k, v in d.items() if k not in _CLIENT_ONLY_KEYS}

    def time(
        self, models: Mapping[str, bytes | str | Path], protocol: Protocol | None = None,
        on_round: Callable[[int], None] | None = None,
    ) -> dict[str, Stats]:
        return self._request(models, protocol or self.target.protocol, on_round)[0]

    def layer_times(self, models: Mapping[str, bytes | str | Path], runs: int = 20) -> dict[str, dict[str, float]]:
        # The agent times each model once in passing (a one-run protocol) and adds its counters.
        return self._request(models, Protocol(warmup=0, repeats=1, rounds=1, min_time_s=0.0), None, runs)[1]

    def _request(
        self, models: Mapping[str, bytes | str | Path], proto: Protocol, on_round: Callable[[int], None] | None,
        layer_runs: int = 0,
    ) -> tuple[dict[str, Stats], dict[str, dict[str, float]]]:
        a = self.agent_info()  # reachability and token are checked before a large upload
        if a["backend"] != self.target.backend:
            raise UserError(f"agent at {self.url} serves backend {a['backend']!r}, but {self.where} asks for "
                            f"{self.target.backend!r}; start the agent with --backend {self.target.backend}")
        encoded = {key: base64.b64encode(_model_bytes(src)).decode("ascii") for key, src in models.items()}
        limit = a.get("max_body_mb")
        budget = int(limit * _MIB) - 64 * 1024 if isinstance(limit, (int, float)) else None
        # Models that do not fit one request under the agent's limit go in several; each
        # request is interleaved within itself (a profile chunk rarely needs splitting).
        batches: list[dict[str, str]] = [{}]
        size = 0
        for key, text in encoded.items():
            if budget is not None and len(text) + 1024 > budget:
                raise UserError(f"request to agent at {self.url} is too large (model {key!r} is {len(text) / _MIB:.1f} MiB "
                                f"encoded; the agent accepts at most {limit:g} MiB); restart the agent with a larger --max-body-mb")
            if budget is not None and batches[-1] and size + len(text) + 1024 > budget:
                batches.append({})
                size = 0
            batches[-1][key] = text
            size += len(text) + len(key) + 8
        stats: dict[str, Stats] = {}
        shapes: dict[str, list[int]] = {}
        layers: dict[str, dict[str, float]] = {}
        names = [f.name for f in dataclasses.fields(Stats)]
        for batch in batches:
            body = json.dumps({
                "target": self._payload_target(),
                "protocol": {k: getattr(proto, k) for k in _PROTOCOL_FIELDS},
                "models": batch,
                **({"layer_runs": layer_runs} if layer_runs else {}),
            }).encode("utf-8")
            if budget is not None and isinstance(limit, (int, float)) and len(body) > limit * _MIB:
                raise UserError(f"request to agent at {self.url} is too large ({len(body) / _MIB:.1f} MiB; the agent accepts "
                                f"at most {limit:g} MiB); restart the agent with a larger --max-body-mb")
            answer = self._call("POST", "/time", body, read_timeout=self.timeout_s)
            try:
                stats.update({key: Stats(**{n: answer["stats"][key][n] for n in names}) for key in batch})
                shapes.update({key: [int(d) for d in answer["shapes"][key]] for key in batch})
                if layer_runs:
                    layers.update({key: {str(n): float(v) for n, v in answer["layers"][key].items()} for key in batch})
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"agent at {self.url} sent incomplete timings (missing {_first_line(e)}); "
                                "is it a deploy-prune agent of a matching version?") from None
        self.shapes.update(shapes)
        if on_round is not None:
            on_round(proto.rounds)
        return stats, layers


def _model_bytes(src: bytes | str | Path) -> bytes:
    if isinstance(src, bytes):
        return src
    p = Path(src)
    if not p.is_file():
        raise UserError(f"ONNX model {str(p)!r} not found")
    return p.read_bytes()
