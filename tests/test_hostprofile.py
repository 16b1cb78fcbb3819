"""maskfit.hostprofile: a sampling profiler of one thread's Python stack, read over a time window."""
import threading
import time

import pytest

from maskfit.hostprofile import StackSampler


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _wait(seconds: float) -> None:
    threading.Event().wait(seconds)


def test_samples_fall_in_the_function_running_and_the_window_selects_them():
    with StackSampler(interval=0.002) as sampler:
        t0 = time.perf_counter()
        _spin(0.25)
        t1 = time.perf_counter()
        _wait(0.25)
        t2 = time.perf_counter()
    spin = sampler.profile(t0, t1)
    wait = sampler.profile(t1, t2)
    assert spin.samples >= 20 and wait.samples >= 20
    assert spin.innermost.get("test_hostprofile.py:_spin", 0) > 0.9
    # a blocked thread shows up in the call it is blocked in (wall time, not CPU time)
    assert wait.innermost.get("threading.py:wait", 0) > 0.9
    # outside the package's own directory, so no maskfit frame
    assert wait.maskfit == {"(outside maskfit)": 1.0}
    whole = sampler.profile()
    assert whole.samples >= spin.samples + wait.samples
    assert abs(sum(whole.innermost.values()) - 1.0) < 1e-9
    assert "test_hostprofile.py:_spin" in "\n".join(whole.lines())


def test_maskfit_frames_name_the_package_call_the_time_is_under():
    from maskfit.packing import pick_next

    def busy():
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:
            pick_next([5, 3, 9, 2] * 200, 4)  # the best-fit scan: a loop inside maskfit

    with StackSampler(interval=0.002) as sampler:
        busy()
    found = sampler.profile()
    assert found.maskfit.get("packing.py:pick_next", 0) > 0.5


def test_other_threads_are_reported_by_name():
    stop = threading.Event()

    def helper():
        while not stop.is_set():
            _spin(0.01)

    t = threading.Thread(target=helper, name="busy-helper")
    t.start()
    try:
        with StackSampler(interval=0.002) as sampler:
            _wait(0.2)
    finally:
        stop.set()
        t.join()
    found = sampler.profile()
    assert found.innermost.get("threading.py:wait", 0) > 0.9  # the sampled (main) thread
    assert found.threads["busy-helper"].get("test_hostprofile.py:_spin", 0) > 0.8
    assert "thread 'busy-helper'" in "\n".join(found.lines())


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="interval=0"):
        StackSampler(interval=0)
    with StackSampler(interval=0.001) as sampler:
        _spin(0.02)
    with pytest.raises(ValueError, match="no samples in the window"):
        sampler.profile(0.0, 1.0)


def test_a_sampled_function_s_locals_are_freed_when_it_returns():
    # The sampler must not keep the frames it read alive between samples: a frame object holds its function's
    # locals after the function returns, and under CUDA graphs a tensor kept alive that way fails the run
    # ("tensor(s) in the cudagraph pool not tracked as outputs", seen on the H200 on 2026-12-02).
    import weakref

    class Payload:
        pass

    def hold(seconds: float) -> weakref.ref:
        payload = Payload()
        _spin(seconds)  # sampled here, many times
        return weakref.ref(payload)

    with StackSampler(interval=0.05) as sampler:
        ref = hold(0.3)
        alive_after_return = ref() is not None  # the next sample is up to 50 ms away
        _wait(0.1)
    assert sampler.profile().samples >= 3
    assert not alive_after_return
