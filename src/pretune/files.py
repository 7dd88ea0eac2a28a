"""Atomic file and directory writes: a crash leaves the old version or the new one, never half."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

_UMASK: int | None = None

# The names of what is on its way in or out, beside its final name NAME: `.NAME.tmp-XXXXXXXX`
# (tempfile's 8 random characters: a file of atomic_write_bytes or a directory of atomic_dir) and
# `.NAME.old-PID` (the copy atomic_dir is replacing). checkpoint.sweep_debris and overwrite=true know
# pretune's own temporary files by exactly these names, never by a looser look-alike.
TEMP_RANDOM = "[a-z0-9_]{8}"
OLD_INFIX = ".old-"


def temp_prefix(name: str) -> str:
    """The prefix of a temporary file or directory that becomes `name`: `.NAME.tmp-`."""
    return f".{name}.tmp-"


def old_name(name: str) -> str:
    """Where atomic_dir keeps the copy it replaces while it renames the new one in."""
    return f".{name}{OLD_INFIX}{os.getpid()}"


def umask() -> int:
    """The process's umask, read once (Linux's /proc tells it without changing it; elsewhere it is
    set and put back at once)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                _UMASK = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            old = os.umask(0o022)
            os.umask(old)
            _UMASK = old
    return _UMASK


def _chmod_as_created(path: Path, directory: bool = False) -> None:
    """Give a temporary file (0600) or directory (0700) the mode a plain open()/mkdir() would have:
    0666/0777 less the umask, so other users read a run as they read any file the user writes."""
    try:
        os.chmod(path, (0o777 if directory else 0o666) & ~umask())
    except OSError:
        pass  # a file system without modes (some network or FAT mounts) keeps its own


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        _chmod_as_created(Path(tmp))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary directory; on success fsync it and its files and rename it to `final`.

    An existing `final` is first renamed to `.NAME.old-PID`, then the new copy takes its name. If the
    second rename fails the old copy gets its name back; a kill between the two renames leaves the old
    copy under `.NAME.old-PID`, which checkpoint.sweep_debris restores when `final` is missing."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), dir=final.parent))
    old = None
    try:
        _chmod_as_created(tmp, directory=True)
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        for d in [*(d for d in tmp.rglob("*") if d.is_dir()), tmp]:  # their entries too
            _fsync_dir(d)
        if final.exists():
            old = final.with_name(old_name(final.name))
            if old.exists():  # a superseded copy left by an earlier process with this pid
                shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        if old is not None and old.exists():
            if final.exists():  # the new copy is in place: the old one is not needed
                shutil.rmtree(old, ignore_errors=True)
            else:  # the new copy did not take the name: the old one gets it back
                try:
                    old.rename(final)
                except OSError:
                    pass  # left as .NAME.old-PID, which sweep_debris restores on resume
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# A directory that overwrite=true replaces is set aside, not deleted, until the new run has started
# training: a run that fails its set-up (a config check, missing data) gives the old one back.
_ASIDE: dict[str, Path] = {}


def set_aside(directory: Path) -> None:
    """Rename `directory` to `.NAME.replaced-PID` beside it; settle_aside decides its fate."""
    directory = Path(directory)
    aside = directory.with_name(f".{directory.name}.replaced-{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside)
    directory.rename(aside)
    _ASIDE[str(directory.absolute())] = aside


def settle_aside(directory: Path, restore: bool) -> bool:
    """What set_aside kept of `directory`: deleted once the new run has started (restore=False), or
    put back in place of what the new run wrote (restore=True). True when there was one."""
    aside = _ASIDE.pop(str(Path(directory).absolute()), None)
    if aside is None or not aside.exists():
        return False
    if restore:
        shutil.rmtree(directory, ignore_errors=True)
        aside.rename(directory)
    else:  # renamed first: a kill while it is deleted must not leave a part that looks whole
        gone = aside.with_name(aside.name.replace(".replaced-", ".discarded-"))
        aside.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def recover_set_aside(directory: Path, started: tuple[str, ...]) -> str | None:
    """Settle what a process killed between set_aside and settle_aside left beside `directory`. A
    `.NAME.discarded-PID` was being deleted: it goes. A `.NAME.replaced-PID` is the whole old run,
    and the new run had not started training (settle_aside renames it before it deletes it), so the
    old run takes the place of that set-up again, as it would have had the set-up failed; unless
    `directory` holds one of `started` (a run that trained), when it is left for the user. Returns a
    line saying what was done, or None."""
    directory = Path(directory)
    said = None
    for aside in sorted(directory.parent.glob(f".{glob.escape(directory.name)}.*-*")):
        kind, _, pid = aside.name[len(directory.name) + 2:].rpartition("-")
        if kind not in ("replaced", "discarded") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "discarded":
            shutil.rmtree(aside, ignore_errors=True)
        elif directory.is_dir() and any(next(directory.glob(p), None) is not None for p in started):
            said = (f"{aside} holds the run that an interrupted overwrite=true was replacing; "
                    f"{directory} has since trained, so it stays there: move it back or delete it")
        else:
            if directory.exists():
                shutil.rmtree(directory)
            aside.rename(directory)
            said = (f"the run that an interrupted overwrite=true had set aside ({aside.name}) is back in "
                    f"{directory}: the interrupted run had not started training")
    return said
