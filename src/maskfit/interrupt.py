"""SIGTERM (a preempted job) and SIGINT (Ctrl-C) stop training at the next step boundary, after a checkpoint.

The first signal only sets a flag that the loop reads after each step (a Python attribute: no device
sync); the loop then writes a checkpoint and returns, and ``maskfit train`` exits with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT): the run is not finished, so schedulers and ``a && b`` scripts
must not take it for a finished one. A second signal gets the handler that was there before (Ctrl-C
twice: a KeyboardInterrupt at once; a partial checkpoint write is removed and cleaned up at the next
start).

DataLoader workers ignore both signals (:func:`ignore_stop_signals_in_worker`): Ctrl-C reaches the whole
foreground process group and SLURM signals every process of a job, and a worker that died of it would
make the main process fail on its next batch instead of saving. The workers still end with the main
process (torch's worker loop exits when its parent is gone). Because they ignore SIGTERM, an interpreter that
exits with an endless loader still open (a script that never finishes iterating) would hang in
multiprocessing's exit hook, which terminates its children and then joins them: :func:`close_at_exit`
registers such streams, and they are closed first (their workers get the loader's own shutdown).
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  its exit hook is registered on import: ours below then runs before it
import os
import signal
import threading
import weakref
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_ENDLESS_STREAMS: "weakref.WeakSet[Iterator]" = weakref.WeakSet()


def close_at_exit(stream: Iterator) -> Iterator:
    """Register a generator over a DataLoader whose workers ignore SIGTERM; it is closed at interpreter exit
    (closing it drops the DataLoader iterator, whose shutdown stops the workers). Returns ``stream``."""
    _ENDLESS_STREAMS.add(stream)
    return stream


@atexit.register
def _close_endless_streams() -> None:
    # atexit runs hooks last-registered first: this one before multiprocessing's (registered on its import).
    for stream in list(_ENDLESS_STREAMS):
        stream.close()


def ignore_stop_signals_in_worker(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the main process handles SIGINT/SIGTERM, the workers carry on."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signum` instead of killing the process.

    Installed only in the main thread of the main interpreter (Python allows handlers nowhere else);
    elsewhere it does nothing and the signals keep their usual effect.
    """

    def __init__(self, what: str = "maskfit train"):
        self.what = what
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> Optional[str]:
        return None if self.signum is None else signal.Signals(self.signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child that inherited the handler: not ours to act on
            return
        self.signum = signum
        self._restore()  # a second signal acts at once
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        # os.write, not print: the handler may run while the main thread is inside a print (tqdm).
        os.write(2, (f"\n{self.what}: {signal.Signals(signum).name} received; stopping after this step and "
                     f"writing a checkpoint ({again} stops at once without saving)\n").encode())
