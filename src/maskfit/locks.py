"""One process at a time per output folder (a run folder, a sample folder, a sweep folder).

Two `maskfit train` on one run folder would resume from each other's checkpoints and interleave their
logs; two `maskfit sample` into one folder would write each other's shards. The lock is an OS lock
(``fcntl.flock``) on ``<folder>/.maskfit.lock``: the kernel drops it when its holder exits, however it
exits (kill -9 and power loss included), so a crashed process never leaves a lock that blocks the next
one, and there is nothing to clean up by hand. The file stays (deleting it would race with a process
that has just opened it) and tells a refused process who holds the folder: pid, host, command, since.

flock locks are advisory and local: they do not stop a process that does not ask, and on some network
file systems they do not reach other hosts (the message still names the holder when it sees one).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Union

LOCK_NAME = ".maskfit.lock"
_held_fds: set[int] = set()  # lock files this process holds open


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock."""


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) inherits the descriptor, and flock's lock lives until every copy
    # is closed: a worker that outlived its parent would hold the folder. Closing the child's copy leaves the
    # parent's lock in place (only LOCK_UN on a copy, never done here, would drop it).
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "pid unknown"
    return f"pid {info['pid']} on host {info.get('host', '?')}, `{info.get('command', '?')}`, since {info.get('since', '?')}"


@contextlib.contextmanager
def folder_lock(folder: Union[str, os.PathLike], what: str) -> Iterator[Path]:
    """Hold ``folder``'s lock (creating the folder) for the ``with`` block, or raise FolderBusyError at once.

    what: what the folder is for the message, e.g. "run folder" (a second process is refused, never queued:
    waiting silently for a long training would look like a hang).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise FolderBusyError(
            f"{what} {folder} is in use by another maskfit process ({holder}); two processes writing one folder "
            f"would mix their files. Wait for it to finish or stop it, or use another folder"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    _held_fds.add(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield folder
    finally:
        _held_fds.discard(fd)
        os.close(fd)  # drops the lock


def locks_folder(folder_of: Callable[..., Union[str, os.PathLike]], what: str):
    """Decorator: hold ``folder_of(*args, **kwargs)``'s lock while the function runs (see folder_lock)."""

    def wrap(fn):
        @functools.wraps(fn)
        def locked(*args, **kwargs):
            with folder_lock(folder_of(*args, **kwargs), what):
                return fn(*args, **kwargs)

        return locked

    return wrap
