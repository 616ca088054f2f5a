"""Atomic file writes and provenance records shared by every output the tool writes."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy_prune import __version__
from deploy_prune.errors import UserError


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents); a clear error if it cannot be written."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"cannot write to directory {str(p)!r} ({e.strerror}); choose another --out") from None
    return p


def remove_if_empty(path: str | os.PathLike[str]) -> bool:
    """Remove directory ``path`` when it holds no file at any depth (what a command that failed
    before writing anything leaves behind); True if it was removed."""
    p = Path(path)
    if not p.is_dir() or any(not q.is_dir() for q in p.rglob("*")):
        return False
    shutil.rmtree(p, ignore_errors=True)
    return not p.exists()


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> Path:
    """Write via ``writer(tmp_path)`` then rename over ``path``, so readers never see half a file."""
    dest = Path(path)
    ensure_dir(dest.parent)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Strict JSON (no bare NaN or Infinity, which other readers reject), written atomically."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"
    except ValueError as e:  # a non-finite number reached an output: a bug upstream, never written
        raise ValueError(f"not writing {os.fspath(path)!r}: {e}") from None
    return atomic_write(path, lambda p: p.write_text(text))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"file not found: {str(p)!r}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{str(p)!r} is not valid JSON ({e.msg} at line {e.lineno}); regenerate it") from None


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo; platform fallback elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux /proc/cpuinfo ``flags`` on x86, ``Features`` on Arm:
    ``avx2``, ``avx512_vnni``, ``asimddp`` ...); None where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


# The vector extensions that decide which kernels a backend runs (and so a layer's latency).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "asimd", "asimddp", "i8mm", "sve")


def cpu_isa() -> str:
    """The CPU's vector extensions among ``ISA_FLAGS``, space-separated ("" where unknown)."""
    flags = cpu_flags() or set()
    return " ".join(f for f in ISA_FLAGS if f in flags)


def cpu_id() -> str:
    """The CPU as a latency table must match it: its name and its vector extensions. Cloud VMs
    often report a bare family name ("AMD EPYC") for chips from AVX2-only to AVX-512 with VNNI,
    whose kernels, channel blocks and per-layer times differ."""
    isa = cpu_isa()
    return f"{cpu_model()} [{isa}]" if isa else cpu_model()


def cpu_cache_bytes(level: int = 2) -> int | None:
    """Size of one core's data (or unified) cache at ``level``, from Linux sysfs; None elsewhere."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for d in sorted(root.glob("index*")):
            if int((d / "level").read_text()) == level and (d / "type").read_text().strip() in ("Data", "Unified"):
                text = (d / "size").read_text().strip().upper()
                units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
                return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        pass
    return None


def git_commit() -> str | None:
    """The commit of the deploy-prune checkout, if it is one (None for a wheel install)."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def provenance(**extra: Any) -> dict[str, Any]:
    """Where, when and with what a result was produced; every profile and report embeds it."""
    import torch

    rec: dict[str, Any] = {
        "tool": "deploy-prune",
        "tool_version": __version__,
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    rec.update(extra)
    return rec


def provenance_line(p: dict[str, Any]) -> str:
    """One sentence for a benchmark's Markdown: when, on what, with which tool version."""
    isa = f", {p['cpu_isa']}" if p.get("cpu_isa") else ""
    return f"Measured {p['date']} on {p['cpu']} ({p['cpu_count']} cores{isa}), deploy-prune {p['tool_version']} ({p['git_commit']})."

