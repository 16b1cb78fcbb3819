"""Where one thread of this process spends its wall time: a sampling profiler of Python stacks.

The real training loop loses time on the host between GPU steps (BENCHMARKS.md, the real path): its main process
waits for batches, plans token-batching bins, receives and pins what the workers send, and launches the step.
The loop's own counters split the window only into "waiting for a batch" and "running train_step". This samples
the main thread's Python stack from a daemon thread every ``interval`` seconds (``sys._current_frames``) and says,
for a chosen time window, which functions the samples fall in:

- ``innermost``: the frame executing when sampled (``Condition.wait``, ``_plan``, a compiled graph's call, ...);
- ``maskfit``: the innermost frame in this package, i.e. which of our calls the time is under;
- ``threads``: every other Python thread's innermost frame, by thread name (the DataLoader's pin-memory thread
  takes each batch from the workers and pins it in this process, competing with the main thread for the GIL).

Sampling adds no work to the sampled thread itself, but the sampler holds the GIL while it reads the stacks: 69 us
a sample on this project's 2-core CPU (2026-12-02) with 13 threads 100 frames deep (the worst case: no maskfit
frame to stop the walk), so at the default 5 ms interval it takes at most ~1.4 % of the interpreter from the
sampled threads, and a 2-second window still gets ~400 samples. Wall time, not CPU time: a thread blocked in a queue read shows up in
the read.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _label(frame) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{code.co_name}"


def _innermost_in_package(frame) -> Optional[str]:
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            return _label(frame)
        frame = frame.f_back
    return None


@dataclass(frozen=True)
class HostProfile:
    """Shares of a window's samples: ``innermost`` and ``maskfit`` map a label to its fraction, largest first;
    ``threads`` maps another thread's name to the same for its innermost frame (shares of the samples the thread
    was alive in)."""

    samples: int
    seconds: float
    innermost: dict
    maskfit: dict
    threads: dict

    def lines(self, top: int = 12) -> list[str]:
        """Human-readable summary: the ``top`` labels of each kind with their share of the window."""
        out = [f"host profile: {self.samples} samples over {self.seconds:.2f} s of the main thread"]
        for name, shares in (("innermost frame", self.innermost), ("innermost maskfit frame", self.maskfit)):
            out.append(f"  by {name}:")
            out.extend(f"    {share:6.1%}  {label}" for label, share in list(shares.items())[:top])
        for name, shares in self.threads.items():
            out.append(f"  thread {name!r}, by innermost frame:")
            out.extend(f"    {share:6.1%}  {label}" for label, share in list(shares.items())[:top])
        return out


class StackSampler:
    """Samples thread ``thread_id``'s stack (default: the thread that creates the sampler) every ``interval`` s.

    Use as a context manager; :meth:`profile` then summarises the samples taken between two ``time.perf_counter``
    readings (the whole run by default).
    """

    def __init__(self, thread_id: Optional[int] = None, interval: float = 0.005):
        if interval <= 0:
            raise ValueError(f"interval={interval} must be a positive number of seconds (e.g. 0.005)")
        self.thread_id = threading.get_ident() if thread_id is None else thread_id
        self.interval = interval
        # (time, innermost, innermost in maskfit, ((other thread's name, its innermost), ...))
        self._samples: list[tuple[float, str, Optional[str], tuple]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "StackSampler":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="maskfit-stack-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        names: dict[int, str] = {}
        while not self._stop.wait(self.interval):
            frames = sys._current_frames()
            frame = frames.pop(self.thread_id, None)
            if frame is None:  # the thread has ended
                return
            frames.pop(me, None)
            if any(tid not in names for tid in frames):
                names = {t.ident: t.name for t in threading.enumerate()}
            others = tuple((names.get(tid, str(tid)), _label(f)) for tid, f in frames.items())
            self._samples.append((time.perf_counter(), _label(frame), _innermost_in_package(frame), others))
            # Drop the frames before sleeping: a frame object keeps its function's locals alive after the function
            # returns, which would hold the sampled thread's tensors (under CUDA graphs, cudagraph trees then fail
            # with "tensor(s) in the cudagraph pool not tracked as outputs") until the next sample.
            del frames, frame

    def profile(self, start: float = float("-inf"), end: float = float("inf")) -> HostProfile:
        """The samples taken in [start, end] (``time.perf_counter`` seconds), as shares."""
        window = [s for s in self._samples if start <= s[0] <= end]
        if not window:
            raise ValueError(
                f"no samples in the window [{start}, {end}] ({len(self._samples)} in all); sample over the window "
                "(enter the sampler before it starts) or lengthen it"
            )

        def shares(labels) -> dict:
            counts = collections.Counter(labels)
            return {label: n / len(window) for label, n in counts.most_common()}

        by_thread: dict[str, list[str]] = collections.defaultdict(list)
        for s in window:
            for name, label in s[3]:
                by_thread[name].append(label)
        threads = {}
        for name, labels in sorted(by_thread.items(), key=lambda kv: -len(kv[1])):
            counts = collections.Counter(labels)
            threads[name] = {label: n / len(labels) for label, n in counts.most_common()}
        seconds = window[-1][0] - window[0][0]
        return HostProfile(len(window), seconds, shares(s[1] for s in window),
                           shares(s[2] or "(outside maskfit)" for s in window), threads)
