"""One run at a time on a folder: a lock file that names its holder (pid, host, run id, since).

A second run is refused with the holder's name. A lock whose holder is gone (its pid no
longer runs on this host, or runs another program since) is stale: the next run takes it
over and says so. A holder on another host cannot be checked from here, so its lock is
honoured until it is removed by hand. Taking and checking the lock happen under a short
`flock` on a guard file beside it, so two runs that find the same stale lock cannot both
take it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from jobs.errors import UserError


class LockBusy(UserError):
    """Another run holds the lock."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    run_id: str
    since: str
    started: str | None = None  # the process's start time (/proc), against pid reuse

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, run {self.run_id}, since {self.since}"


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot; None when it does not run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _gone(h: Holder) -> bool:
    """True only when we can tell from here that the holder no longer runs."""
    if h.host != socket.gethostname():
        return False
    try:
        os.kill(h.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # runs, as another user
    now = _started(h.pid)
    return h.started is not None and now is not None and now != h.started


def _read(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # cut short by a crash: nobody can be named
        return Holder(pid=-1, host=socket.gethostname(), run_id="?", since="?")


def _write(path: Path, h: Holder) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(h)))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


@contextmanager
def _guarded(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".guard"), "a") as g:
        fcntl.flock(g, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(g, fcntl.LOCK_UN)


def acquire(path: Path, run_id: str, what: str) -> Holder:
    """Take the lock at `path` for `run_id`, or raise LockBusy naming the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    me = Holder(pid, socket.gethostname(), run_id,
                datetime.now(UTC).isoformat(timespec="seconds"), _started(pid))  # fmt: skip
    with _guarded(path):
        old = _read(path)
        if old is not None and not _gone(old) and old.pid != -1:
            raise LockBusy(
                f"{what} is already running ({old.describe()}); wait for it to end, or "
                f"stop it (a lock of a process that is gone is taken over: {path})"
            )
        if old is not None:
            print(f"esm3: note: took over the lock of {what} from a run that is gone "
                  f"({old.describe()})", file=sys.stderr)  # fmt: skip
        _write(path, me)
    return me


def release(path: Path, me: Holder) -> None:
    """Remove the lock if it is still ours."""
    with _guarded(path):
        if _read(path) == me:
            path.unlink(missing_ok=True)


@contextmanager
def held(path: Path, run_id: str, what: str) -> Iterator[Holder]:
    me = acquire(path, run_id, what)
    try:
        yield me
    finally:
        release(path, me)
