"""Client of the remote profiling agent: ``AgentMeasurer`` measures on a device through
``deploy-prune agent serve`` (``deploy_prune.agent``, the server) when a target has an
``agent:`` block; ``measure.measurer_for`` picks it.

The wire format's shared pieces (strict JSON, the keys and time-outs) live here, and the server
imports them from here: the measurer and the agent depend one way.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deploy_prune.config import Protocol, Target
from deploy_prune.errors import UserError
from deploy_prune.latency.timing import Stats

DEFAULT_TOKEN_ENV = "DEPLOY_PRUNE_AGENT_TOKEN"
DEFAULT_TIMEOUT_S = 900.0  # read time-out of a measurement request
CONNECT_TIMEOUT_S = 10.0  # connect time-out, and read time-out of short requests (/info)
_MIB = 1024 * 1024
_AGENT_KEYS = {"url", "token_env", "timeout_s"}
_PROTOCOL_FIELDS = ("warmup", "repeats", "rounds", "min_time_s")
# Target.as_dict() keys that describe the client, not the measurement.
_CLIENT_ONLY_KEYS = {"threads_resolved", "protocol", "source", "agent", "channel_multiple_from", "narrow_widths"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _refuse_constant(name: str) -> Any:
    """``parse_constant`` for ``json.loads``: bare NaN, Infinity and -Infinity are not JSON."""
    raise ValueError(f"{name} is not a JSON number")


def _loads(data: bytes) -> Any:
    """Strict JSON: no bare NaN/Infinity (Python accepts them by default)."""
    return json.loads(data, parse_constant=_refuse_constant)


def _dumps(obj: Any) -> bytes:
    """Strict JSON: a NaN or infinity raises ValueError instead of writing a non-JSON token."""
    return json.dumps(obj, allow_nan=False).encode("utf-8")


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
            answer = _loads(data) if data else {}
        except (ValueError, RecursionError):  # also bare NaN/Infinity: not JSON
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
        # Fields with a default (the tail percentiles) are taken when the agent sends them.
        fields = dataclasses.fields(Stats)
        names = [f.name for f in fields if f.default is dataclasses.MISSING]
        optional = [f.name for f in fields if f.default is not dataclasses.MISSING]
        for batch in batches:
            try:
                body = _dumps({
                    "target": self._payload_target(),
                    "protocol": {k: getattr(proto, k) for k in _PROTOCOL_FIELDS},
                    "models": batch,
                    **({"layer_runs": layer_runs} if layer_runs else {}),
                })
            except ValueError:
                raise UserError(f"{self.where} holds a number that is NaN or infinite (in the protocol or options); "
                                "the agent takes finite numbers only") from None
            if budget is not None and isinstance(limit, (int, float)) and len(body) > limit * _MIB:
                raise UserError(f"request to agent at {self.url} is too large ({len(body) / _MIB:.1f} MiB; the agent accepts "
                                f"at most {limit:g} MiB); restart the agent with a larger --max-body-mb")
            answer = self._call("POST", "/time", body, read_timeout=self.timeout_s)
            try:
                stats.update({key: Stats(**{n: answer["stats"][key][n] for n in names},
                                         **{n: answer["stats"][key][n] for n in optional if n in answer["stats"][key]})
                              for key in batch})
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
