"""Safe output folders: atomic, durable writes; one writer at a time; nothing of the user's deleted.

* Every folder diffprune writes carries a marker file (:data:`MARKER`). ``--overwrite`` replaces only an empty
  folder or one with that marker, and never a folder that is, or contains, an input of the same command or the
  current directory (:func:`check_output_dir`).
* A writer holds a lock beside its output folder (:func:`output_lock`, ``fcntl.flock``: released by the kernel when
  the process dies, so a killed run leaves no stale lock); a second writer gets an error naming the holder's pid.
* Files are written to a temporary name, flushed and fsynced, then renamed; the folder is fsynced after the rename
  (:func:`atomic_write_bytes`, :func:`atomic_dir`, :func:`staged_dir`, :func:`fsync_tree`), so a crash or power
  loss leaves either the old or the new file, never a torn one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import DiffPruneError, require

MARKER = ".diffprune"  # JSON {"written_by": "diffprune", "kind": ..., "version": ...}
_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: locks this process holds (re-entrant)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- durability ----------------------------------------------------------------------------------------------

def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to disk (folders: not on Windows, which cannot)."""
    path = Path(path)
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder below ``root`` (deepest first), then ``root`` itself."""
    root = Path(root)
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


def _tmp_prefix(name: str) -> str:
    """Temporaries are named ``.NAME.tmp-PID-…``: :func:`clean_stale_temporaries` removes those of dead processes."""
    return f".{name}.tmp-{os.getpid()}-"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename; fsync the folder after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` as a safetensors file, atomically (a temporary beside it, fsynced, renamed), streamed by
    safetensors (the file is never built in memory) and with the mode of any new file (safetensors makes 0600)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        fsync_path(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 (whatever the locale's encoding), atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- leftovers of killed processes -----------------------------------------------------------------------------

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)(-.*)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove ``.NAME.tmp-PID-…`` temporaries of dead processes in ``folder``, and recover an interrupted swap: a
    ``.NAME.old-PID`` folder of a dead process goes back to ``NAME`` when ``NAME`` is missing (the kill fell between
    the two renames of :func:`atomic_dir`), else it is removed. Returns what was done, one line each."""
    folder = Path(folder)
    done = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _LEFTOVER.match(p.name)
        if m is None or _alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["what"] == "old" and not target.exists():
            os.replace(p, target)
            done.append(f"recovered {str(target)!r} from an interrupted replacement")
        else:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            done.append(f"removed the leftover {str(p)!r}")
    return done


# --- local path or hub id -------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` can only mean a Hugging Face hub id ``owner/name``, not a local path.

    A name that looks local is never sent to the network: one that starts with ``.``, ``/`` or ``~``, has another
    separator or more than one ``/``, or whose first part exists here as a folder (``runs/typo``).
    """
    s = str(name)
    return bool(_HUB_ID.match(s)) and not s.startswith(".") and not Path(s).parent.exists()


def missing_path_message(what: str, name: str | os.PathLike) -> str:
    """The one-line error for a local-looking path that does not exist (names the nearest existing parent)."""
    p = Path(name).expanduser()
    parent = next((q for q in p.parents if q.exists()), None)
    where = f" (the nearest existing folder is {str(parent)!r})" if parent is not None and str(parent) != "." else ""
    return f"{what} {str(name)!r} not found: no such file or folder{where}; check the path"


# --- whose folder is it ----------------------------------------------------------------------------------------

def mark_output(folder: str | os.PathLike, kind: str, *, files: list[str] | None = None) -> None:
    """Mark ``folder`` as written by diffprune (what lets ``--overwrite`` replace it later); ``files``: every file
    diffprune put there, when the folder is written whole (``--overwrite`` then refuses a folder holding others)."""
    from . import __version__

    atomic_write_json(Path(folder) / MARKER, {"written_by": "diffprune", "kind": kind, "version": __version__,
                                              **({"files": files} if files is not None else {})})


def _files_below(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _foreign_file(folder: Path) -> str | None:
    """The first file in ``folder`` that its marker's file list does not name (None without a list)."""
    try:
        listed = read_json(folder / MARKER).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(listed, list):
        return None
    known = set(listed) | {MARKER}
    return next((f for f in _files_below(folder) if f not in known), None)


def is_diffprune_output(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def input_paths(values: Iterable) -> list[Path]:
    """The local files and folders among a command's inputs (names and hub ids are skipped), resolved."""
    from .assets import shipped_model_path

    out = []
    for v in values:
        if v is None or str(v) == "":
            continue
        p = shipped_model_path(str(v)) or Path(v)
        if p.exists():
            out.append(p.resolve())
    return out


def check_output_dir(out: str | os.PathLike, overwrite: bool, inputs: Iterable = (), *,
                     resumable: bool = False) -> Path:
    """Refuse an output folder that would destroy something; return it as a Path.

    Refused always: an existing file; the folder (or a parent) of an input of the command; the current directory or
    one of its parents. Refused unless ``overwrite``: a non-empty folder. Refused even with ``overwrite``: a
    non-empty folder that diffprune did not write (no :data:`MARKER`).
    """
    from .assets import SHIPPED_MODELS

    require(str(out).strip() != "", "--out is empty; pass the path of a new folder, e.g. --out runs/pruned")
    require(str(out) not in SHIPPED_MODELS, f"--out {str(out)!r} is the name of a shipped model, which that name "
                                            f"would keep meaning; write ./{out} to mean a folder here, or another name")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DiffPruneError(f"--out {str(out)!r} is an existing file; pass a folder path")
    here = out.resolve()
    for inp in input_paths(inputs):
        if _within(inp, here):
            raise DiffPruneError(f"--out {str(out)!r} is or contains the input {str(inp)!r} of this command; "
                                 "write the result to another folder")
    if _within(Path.cwd().resolve(), here):
        raise DiffPruneError(f"--out {str(out)!r} is the current directory or one of its parents; pass a new "
                             "folder, e.g. --out runs/result")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    require(overwrite, f"--out {str(out)!r} exists and is not empty; "
                       + ("pass --resume to continue it, " if resumable else "")
                       + "choose a new folder or pass --overwrite to replace it")
    require(is_diffprune_output(out),
            f"--out {str(out)!r} was not written by diffprune (no {MARKER} marker), so --overwrite will not delete "
            "it; choose a new folder, or remove it yourself")
    foreign = _foreign_file(out)
    require(foreign is None, f"--out {str(out)!r} holds {foreign!r}, which diffprune did not write, so --overwrite "
                             "will not delete the folder; move that file out first, or choose another folder")
    return out


# --- one writer at a time --------------------------------------------------------------------------------------

def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


def _try_lock(fd: int, path: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)  # nothing of ours stays behind
        raise DiffPruneError(
            f"cannot lock {str(path)!r}: this file system has no file locks "
            f"({e.strerror}); write --out on a local disk, or set DIFFPRUNE_NO_LOCK=1 to run unlocked at your own risk "
            "(then never run two diffprune commands on one folder)") from None


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of output folder ``out`` (re-entrant within a process); a second process gets an error."""
    path = lock_path(out)
    key = str(path)
    if os.environ.get("DIFFPRUNE_NO_LOCK") == "1":  # a file system without locks, at the user's risk
        yield
        return
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd, path):
            holder = "unknown"
            with contextlib.suppress(OSError):
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DiffPruneError(f"--out {str(out)!r} is being written by another diffprune process (pid {holder}, "
                                 f"lock {str(path)!r}); wait for it to finish or choose another folder")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released (and removed) the file between our open and lock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, *, kind: str = "output",
               inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by renames, on error it is removed.

    Checks ``out`` with :func:`check_output_dir`, holds its lock, marks the result as diffprune's and fsyncs it
    before the rename that publishes it.
    """
    out = check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        clean_stale_temporaries(out.parent)
        out = check_output_dir(out, overwrite, inputs)  # a recovered folder is checked like any other
        with staged_dir(out) as tmp:
            yield tmp
            mark_output(tmp, kind, files=_files_below(tmp))


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, *, merge: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder for what folder ``target`` is to hold; publish it when the block succeeds.

    The temporary is named by :func:`_tmp_prefix` (so :func:`clean_stale_temporaries` removes it if this process is
    killed) and removed on an error. On success it is fsynced whole, then replaces ``target`` by :func:`swap_in`;
    with ``merge`` it is made inside ``target`` and each of its entries replaces the entry of that name (a file by
    one rename, a folder by :func:`swap_in`), while ``target``'s other entries stay: for a folder that holds more
    than what is written (a training run's checkpoints and logs beside its final model). No lock is taken.
    """
    target = Path(target)
    home = target if merge else target.parent
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target.name), dir=home))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not merge:
        swap_in(tmp, target)
        return
    for entry in sorted(tmp.iterdir()):
        if entry.is_dir():
            swap_in(entry, target / entry.name)
        else:
            os.replace(entry, target / entry.name)
    tmp.rmdir()
    fsync_path(target)


def swap_in(new: Path, out: Path) -> None:
    """Replace folder ``out`` by folder ``new`` (same parent) with two renames; the old one is removed after. A kill
    between the renames leaves ``.OUT.old-PID``, which :func:`clean_stale_temporaries` puts back."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(new, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
