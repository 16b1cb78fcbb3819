"""Timing shared by the probes: the median of per-call CUDA-event times, after untimed warm-up calls.

A probe times one small piece (a few ms) many times, so the median of per-call times is what it reports; the
project's ``maskfit.bench.time_steps`` times a whole training loop end to end instead (throughput, peak memory).
"""
import torch


def median_cuda_ms(step, warmup: int = 5, reps: int = 20) -> float:
    """Milliseconds of one ``step()`` on the current CUDA device: median of ``reps`` timed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
