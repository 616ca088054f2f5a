"""Targets: YAML files naming a backend, device, threads and the measurement protocol.

A target file is validated in one place, ``TargetFile`` (a pydantic model of the YAML: every
key's type and range, unknown keys refused), before a ``Target`` is built from it; the first
problem found becomes one ``UserError`` line naming the file, the key and what it must be.

Parsing here is pure: ``deploy_prune.target`` is the door callers use, which resolves what
only the backend can say (``channel_multiple: auto``).

Lookup order for ``--target NAME``: a path to a ``.yaml`` file; ``$DEPLOY_PRUNE_TARGETS``
(colon-separated directories); ``./targets``; the ``targets/`` folder shipped beside the package.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy_prune.checks import check_number
from deploy_prune.errors import UserError
from deploy_prune.widths import WidthSpace, auto_narrow

PACKAGE_TARGETS = Path(__file__).resolve().parent.parent / "targets"


# Ranges a measurement protocol may take: beyond them a run would take hours, not seconds.
PROTOCOL_MAX = {"warmup": 100_000, "repeats": 10_000_000, "rounds": 10_000, "min_time_s": 600.0}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass
class Protocol:
    """How latency is measured: warm-up runs, then ``repeats`` timed runs split over ``rounds``.

    Rounds interleave the variants being compared (A B C A B C ...) so that drift in machine
    load hits all of them alike; each round re-warms briefly after the others ran.

    Fast models are repeated beyond ``repeats`` until each variant has been timed for at least
    ``min_time_s`` in total, so that sub-millisecond medians rest on enough samples.
    """

    warmup: int = 50
    repeats: int = 300
    rounds: int = 5
    min_time_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("warmup", "repeats", "rounds"):
            check_number(f"protocol {name}", getattr(self, name), integer=True, lo=0, hi=PROTOCOL_MAX[name])
        check_number("protocol min_time_s", self.min_time_s, lo=0, hi=PROTOCOL_MAX["min_time_s"])
        if self.warmup < 0 or self.repeats < 1 or self.rounds < 1 or self.repeats < self.rounds or self.min_time_s < 0:
            raise UserError(
                f"bad measurement protocol (warmup={self.warmup}, repeats={self.repeats}, rounds={self.rounds}, "
                f"min_time_s={self.min_time_s}); need warmup >= 0, repeats >= rounds >= 1, min_time_s >= 0"
            )


@dataclass
class Target:
    """Where and how a model is measured."""

    name: str
    backend: str
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 0  # 0 = every core this process may use
    batch: int = 1
    input_shape: list[int] | None = None  # C,H,W; None = the model's own
    channel_multiple: int = 1
    # Where channel_multiple came from: "" when the YAML gives a number, "auto" until
    # ``target.resolve`` asks the backend, then what ``auto`` resolved to on this machine (the
    # backend's blocked channel layout; backends.channel_block).
    channel_multiple_from: str = ""
    # Widths below channel_multiple a group may also keep (``widths``): None is ``auto``
    # (``widths.auto_narrow``: 4, 8 and 12 below a block of 16), [] none.
    narrow_widths: list[int] | None = None
    # How a LUT entry's layer time is taken: "wall" (the standalone graph's median minus the
    # backend's fixed cost of a run), "counters" (the backend's own per-node times of the
    # layer's nodes in that graph, leaving out the layout reorders at its boundary) or "auto"
    # (both are timed; the profile keeps the one whose calibration fits the whole-model
    # measurements better: latency.profile.choose_entries).
    layer_timing: str = "wall"
    # Cache a model's weights must fit in to stay resident between runs (KiB, per thread); None:
    # this machine's L2 when a CPU is measured locally (latency.lut, the weight-streaming term).
    cache_kib: int | None = None
    description: str = ""
    protocol: Protocol = field(default_factory=Protocol)
    agent: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific settings
    # How a precision: int8 target calibrates activation ranges: {method, samples} (quantize.Calibration).
    calibration: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def resolved_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    def width_space(self) -> WidthSpace:
        """The widths a group may keep on this target: multiples of its channel multiple and its
        narrow widths (the profile measures both; the allocator takes what pays)."""
        m = self.channel_multiple
        return WidthSpace(m, auto_narrow(m) if self.narrow_widths is None else tuple(self.narrow_widths))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["threads_resolved"] = self.resolved_threads()
        return d


LAYER_TIMINGS = ("wall", "counters", "auto")
AUTO = "auto"  # channel_multiple_from of a parsed target whose channel multiple the backend has not yet given
_TARGET_KEYS = {f.name for f in dataclasses.fields(Target)} - {"protocol", "source", "channel_multiple_from"}
_PROTOCOL_KEYS = {"warmup", "repeats", "rounds", "min_time_s"}


def target_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("DEPLOY_PRUNE_TARGETS", "").split(":") if p]
    dirs += [Path.cwd() / "targets", PACKAGE_TARGETS]
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and d.is_dir():
            seen.add(r)
            out.append(d)
    return out


def list_targets() -> dict[str, Path]:
    """Every target name found on the lookup path (first one wins)."""
    found: dict[str, Path] = {}
    for d in target_dirs():
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def parse_target(name_or_path: str) -> Target:
    """Find and validate a target (no backend is asked anything: ``target.load_target`` resolves
    what only the backend can say); errors name the file, the key and the fix."""
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        targets = list_targets()
        if name_or_path not in targets:
            valid = ", ".join(sorted(targets)) or "(none found)"
            raise UserError(f"unknown target {name_or_path!r}; valid targets: {valid} (or a path to a .yaml file)")
        p = targets[name_or_path]
    try:
        raw = yaml.load(p.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKey as e:
        raise UserError(f"target file {str(p)!r}: {e}; keep one of them") from None
    except yaml.YAMLError as e:
        raise UserError(f"target file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:  # the YAML composer recurses once per level of nesting
        raise UserError(f"target file {str(p)!r} nests too deeply to be a target; fix the file") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise UserError(f"target file {str(p)!r} is not a readable target ({str(e).split(':')[0]}); fix the file") from None
    return parse_target_dict(raw, source=str(p))


class DuplicateKey(yaml.YAMLError):
    """A mapping names the same key twice (YAML keeps the last silently)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (``DuplicateKey``, naming
    the key and both lines) instead of keeping the last. Keys merged in with ``<<`` may be
    overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if first is not None:
                where = f"on line {line}" if first == line else f"on lines {first} and {line}"
                raise DuplicateKey(f"key {key!r} appears twice {where}")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-untyped-call,no-any-return]


class _AgentFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str
    token_env: str = Field("DEPLOY_PRUNE_AGENT_TOKEN", min_length=1)
    timeout_s: float = Field(600.0, gt=0, le=86_400, allow_inf_nan=False)


class _CalibrationFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(128, ge=1, le=100_000)


class TargetFile(BaseModel):
    """The target YAML's schema: what each key may hold (``Target`` documents what it means)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)
    backend: str = Field(min_length=1)
    device: str = "cpu"
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    threads: int = Field(0, ge=0, le=4096)
    batch: int = Field(1, ge=1, le=65_536)
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1, max_length=4)
    channel_multiple: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1
    narrow_widths: list[Annotated[int, Field(ge=1, le=1024)]] | Literal["auto"] = "auto"
    layer_timing: Literal["wall", "counters", "auto"] = "wall"
    cache_kib: int | None = Field(None, ge=1)
    description: str = ""
    agent: _AgentFile | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    calibration: _CalibrationFile | None = None
    warmup: int = Field(50, ge=0, le=PROTOCOL_MAX["warmup"])
    repeats: int = Field(300, ge=1, le=PROTOCOL_MAX["repeats"])
    rounds: int = Field(5, ge=1, le=PROTOCOL_MAX["rounds"])
    min_time_s: float = Field(2.0, ge=0, le=PROTOCOL_MAX["min_time_s"], allow_inf_nan=False)


def _first_problem(e: ValidationError) -> str:
    """A pydantic error as one line: ``key: what it must be, got VALUE``."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x.startswith("function"))))
    key = loc.split(".")[0]
    if key == "channel_multiple":  # a union: pydantic lists one complaint per branch
        return f"channel_multiple must be an integer from 1 to 1024 or auto, got {e.errors()[0]['input']!r}"
    if key == "narrow_widths":
        return f"narrow_widths must be a list of channel counts (e.g. [4, 8, 12]), [] for none, or auto, got {e.errors()[0]['input']!r}"
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    return f"{loc}: {err['msg'][0].lower()}{err['msg'][1:]}, got {err.get('input')!r}"


def parse_target_dict(raw: Any, source: str = "<dict>") -> Target:
    """Validate a target mapping (``TargetFile``) and build the ``Target``. ``channel_multiple:
    auto`` is left for ``target.resolve`` (``channel_multiple_from == "auto"``)."""
    if not isinstance(raw, dict):
        raise UserError(f"target {source!r} must be a YAML mapping")
    unknown = set(raw) - _TARGET_KEYS - _PROTOCOL_KEYS
    if unknown:
        raise UserError(f"target {source!r}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(_TARGET_KEYS | _PROTOCOL_KEYS)}")
    for key in ("name", "backend"):
        if key not in raw:
            raise UserError(f"target {source!r} lacks the required key {key!r}")
    try:
        TargetFile.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"target {source!r}: {_first_problem(e)}; fix the YAML") from None
    fields = {k: v for k, v in raw.items() if k in _TARGET_KEYS}
    if fields.get("narrow_widths") == "auto":
        fields["narrow_widths"] = None
    auto = fields.get("channel_multiple") == "auto"
    if auto:
        if raw.get("agent"):
            raise UserError(f"target {source!r}: channel_multiple: auto asks this machine's runtime, but the target is measured "
                            "through an agent on another device; give the device's number (e.g. 8)")
        fields["channel_multiple"] = 1  # until target.resolve asks the backend
        fields["channel_multiple_from"] = AUTO
    proto = {k: raw[k] for k in _PROTOCOL_KEYS if k in raw}
    return Target(**fields, protocol=Protocol(**proto), source=source)
