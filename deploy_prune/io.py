"""Atomic file writes, the run-directory lock, the old run an ``--overwrite`` sets aside until
the new one finishes, the checks that keep an output off an input or off a file of another kind,
JSON reading, and provenance records: shared by every output the tool writes."""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; run directories are not locked there
    fcntl = None  # type: ignore[assignment]

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


LOCK_NAME = ".deploy-prune.lock"


class RunLock:
    """An exclusive ``fcntl.flock`` on ``DIR/.deploy-prune.lock``, held while this process writes
    the run directory ``DIR``: a second writer (another process, or another open of it here)
    gets a ``UserError`` naming the holder (pid, host, start time, command) instead of mixing
    two runs in one directory. The kernel drops the lock when the holder dies, however it dies;
    ``release`` also removes the lock file, and a file a killed holder left behind is taken
    over. Where ``fcntl`` is missing (Windows) nothing is locked.

    >>> with RunLock(run_dir):      # doctest: +SKIP
    ...     write_the_run()
    """

    def __init__(self, directory: str | os.PathLike[str], command: str | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.command = command if command is not None else " ".join(
            [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *map(shlex.quote, sys.argv[1:])])
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (``DIR`` is made if missing), or raise ``UserError`` naming its holder."""
        if fcntl is None or self._fd is not None:
            return self
        ensure_dir(self.directory)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_fd(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise UserError(f"{str(self.directory)!r} is being written by another process ({_holder(holder)}); "
                                "wait for it to finish, or choose another --out") from None
            try:  # the holder before us may have removed the file between our open and our flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": platform.node(),
                "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": self.command}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except OSError:  # a full disk: the lock holds without its record
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and remove its file (removed first, so no one locks a file about to go)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""


def _holder(text: str) -> str:
    """The lock holder's record as words (what is known of it)."""
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, TypeError, KeyError):
        return "it has not recorded itself yet"


ASIDE = ".replaced-run"  # DIR/.replaced-run: the run an --overwrite replaces, until the new one finishes


class SetAside:
    """The run in directory ``out`` that an ``--overwrite`` replaces: its files (``names`` in
    ``out``, files or directories, and those matching ``patterns``) move into ``out/.replaced-run/``
    once the new run's inputs are good (``set_aside``), are deleted when the new run finishes
    (``finish``) and are put back when it fails with an exception (``fail``). A killed run leaves
    them aside; the next run in ``out`` must then continue it or start it again (``interrupted``).
    ``command`` (compress, train) is recorded with them, so another command's run is never taken
    for one's own. The caller holds ``out``'s ``RunLock`` throughout."""

    OWNER = ".command"  # in .replaced-run/: the command whose run it is

    def __init__(self, out: Path, command: str, names: Iterable[str], patterns: Iterable[str] = ()) -> None:
        self.out, self.command = out, command
        self.aside = out / ASIDE
        self.names, self.patterns = tuple(names), tuple(patterns)
        self.replacing = False  # this run moved (or keeps) the old run aside, and puts it back if it fails
        self.ending = False  # this run ends an interrupted replacement: finishing deletes the old run

    def interrupted(self, resume: bool, overwrite: bool, resumable: bool) -> bool:
        """Whether an interrupted ``--overwrite`` left the run it replaces aside. This run may then
        continue the new run (``resume``, where it got as far as ``resumable`` says) or start it
        again (``overwrite``); anything else is a ``UserError`` saying so."""
        if not self.aside.is_dir():
            return False
        try:
            owner = (self.aside / self.OWNER).read_text().strip() or self.command
        except OSError:  # none recorded: a run set aside by this command before it recorded itself
            owner = self.command
        if owner != self.command:
            raise UserError(f"{str(self.aside)!r} holds the {owner} run that an interrupted {owner} --overwrite is replacing; "
                            f"continue it with deploy-prune {owner} --resume, start it again with --overwrite, or "
                            f"choose another --out")
        hint = (f"{str(self.out)!r} holds a run an interrupted --overwrite was making (the run it replaces is kept in "
                f"{str(self.aside)!r})")
        back = f"or move the files in {str(self.aside)!r} back into {str(self.out)!r}"
        if resume and not resumable:
            raise UserError(f"nothing to resume: {hint} that stopped before its first checkpoint; pass --overwrite "
                            f"to start it again, {back}")
        if not (resume or overwrite):
            raise UserError(f"{hint}; pass --resume to continue it, --overwrite to start it again, {back}")
        self.replacing, self.ending = overwrite, resume
        return True

    def set_aside(self) -> None:
        """Move the old run's files into ``out/.replaced-run/``; a partial run left by an earlier
        interrupted replacement (the old run is aside already) is deleted instead."""
        self.replacing = True
        if self.aside.is_dir():
            self._remove_run_files()
            return
        self.aside.mkdir()
        try:
            (self.aside / self.OWNER).write_text(self.command + "\n")
            for p in self._run_files():
                os.replace(p, self.aside / p.name)
        except BaseException:  # the old run stays whole: what was moved goes back
            self._put_back()
            raise

    def finish(self) -> None:
        """The new run is complete: the one it replaces goes."""
        if self.replacing or self.ending:
            shutil.rmtree(self.aside, ignore_errors=True)
        self.replacing = self.ending = False

    def fail(self) -> bool:
        """The new run failed: its files go and the old run comes back. True if there was one to restore."""
        if not self.replacing or not self.aside.is_dir():
            return False
        self._remove_run_files()
        self._put_back()
        self.replacing = False
        return True

    @staticmethod
    def restored(message: str, out: Path) -> str:
        """``message`` of a run in ``out`` that failed, saying the run it was replacing is back (``fail``)."""
        return f"{message} (the previous run in {str(out)!r} is restored as it was)"

    def _put_back(self) -> None:
        (self.aside / self.OWNER).unlink(missing_ok=True)
        for p in sorted(self.aside.iterdir()):
            os.replace(p, self.out / p.name)
        self.aside.rmdir()

    def _run_files(self) -> list[Path]:
        found = [self.out / n for n in self.names if (self.out / n).exists()]
        return [*found, *sorted(q for pat in self.patterns for q in self.out.glob(pat))]

    def _remove_run_files(self) -> None:
        for p in self._run_files():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def input_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a command reads it, resolved (links, ``..``): a run directory stands for its ``model.pt``."""
    p = Path(path)
    return (p / "model.pt" if p.is_dir() else p).resolve()


def refuse_input_as_output(flag: str, out: str | os.PathLike[str], writes: Iterable[str | os.PathLike[str]],
                           inputs: Iterable[tuple[str, str | os.PathLike[str] | None]]) -> None:
    """One line (``UserError``) when a path the command writes (``writes``: files, or directories
    it writes below) is one of its ``inputs`` ((flag, path as given) pairs, read as
    ``input_file`` reads them; a link to it too) or holds it: an output never replaces the file
    it is made from."""
    written = [Path(w).resolve() for w in writes]
    for in_flag, given in inputs:
        if given is None or str(given) == "":
            continue
        src = input_file(given)
        for w in written:
            if src == w or w in src.parents or (w.is_file() and src.is_file() and os.path.samefile(w, src)):
                shown = "" if Path(given).resolve() == src else f" ({src})"
                raise UserError(f"{flag} {str(out)!r} would overwrite {in_flag} {str(given)!r}{shown}, an input of this "
                                f"command; choose another {flag}")


def file_kind(path: str | os.PathLike[str]) -> str:
    """What an existing file holds, judged by its first bytes: "a checkpoint" (a torch zip archive
    or pickle), "an ONNX model", "JSON", "an image", "HTML", "an empty file" or "other data"."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return "other data"
    text = head.lstrip()
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "a checkpoint"
    if head[:1] == b"\x08" and len(head) > 1 and head[1] < 0x80:  # ModelProto: ir_version (field 1, varint) first
        return "an ONNX model"
    if text[:1] in (b"{", b"["):
        return "JSON"
    if head.startswith((b"\x89PNG", b"%PDF", b"GIF8", b"\xff\xd8")):
        return "an image"
    if text[:1] == b"<":
        return "HTML"
    return "other data"


def json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None where the file is not one (small files only)."""
    p = Path(path)
    try:
        if p.stat().st_size > (64 << 20):
            return None
        obj = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def check_replaceable(flag: str, path: str | os.PathLike[str], what: str, ours: Callable[[Path], bool]) -> None:
    """An output file may replace what is there only when it is ``what`` (an earlier output of the
    same command, which ``ours`` recognises); a directory, or a file of another kind (a
    checkpoint, a model, a report), is one line (``UserError``) and stays as it is."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {str(p)!r} is a directory; give a file name")
    if p.exists() and not ours(p):
        raise UserError(f"{flag} {str(p)!r} already exists and is not {what} (it holds {file_kind(p)}); "
                        f"choose another {flag}, or remove the file yourself")


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> Path:
    """Write via ``writer(tmp_path)`` then rename over ``path``, so readers never see half a file.
    A full disk is an ``OSError`` with errno ``ENOSPC`` naming ``path``, whatever the writer
    raised (torch's checkpoint writer raises a ``RuntimeError``)."""
    dest = Path(path)
    ensure_dir(dest.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(dest) from e
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp_path, dest)
    except Exception as e:
        full = is_disk_full(e) or (not isinstance(e, OSError) and _no_space_left(dest.parent))
        tmp_path.unlink(missing_ok=True)
        if full:
            raise disk_full(dest) from e
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return dest


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a write refused for want of space (``ENOSPC``, or a quota's ``EDQUOT``)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full(path: str | os.PathLike[str]) -> OSError:
    """The ``ENOSPC`` error of a write to ``path``."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


def _no_space_left(directory: Path) -> bool:
    """Whether the file system holding ``directory`` has (almost) no space left for this user."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


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


def read_json(path: str | os.PathLike[str], what: str = "JSON file", fix: str = "regenerate it") -> Any:
    """The JSON value in ``path``. A file that is missing, unreadable (a directory, bytes that are
    not text), not JSON, nested deeper than Python's parser recurses, or holding an integer of more
    digits than Python converts is one ``UserError`` line naming the file, as a ``what`` (a
    "deploy-prune report"), and ``fix``."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"file not found: {str(p)!r}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{str(p)!r} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise UserError(f"{str(p)!r} nests too deeply to be a {what}; {fix}") from None
    except (OSError, ValueError) as e:  # a directory, bytes that are not text, an integer of 5000 digits
        why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e).split(":")[0]
        raise UserError(f"{str(p)!r} is not a readable {what} ({why}); {fix}") from None


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

