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


def import_triton():
    """(triton, triton.language), or (None, None) where triton is not installed. Without CUDA, Triton's interpreter
    is switched on first, so the probes' kernels run (slowly) on the CPU for their checks."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None, None
    return triton, tl


def check_then_time(forms, run, x0, checked, what: str) -> None:
    """For probes that set other forms of a layer beside the model's (``forms``: name -> its layers, "model"
    first): each form in ``checked`` must give the model's output and gradients (loss: mean square of the
    output; bf16 autocast on CUDA, fp32 on the CPU); then, on CUDA only, every form's compiled forward + backward
    is timed (median of 20) and printed, one line each. ``run(name, x)`` runs form ``name``'s layers on x."""
    cuda = x0.is_cuda

    def grads(name):
        x = x0.clone().requires_grad_()
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=cuda):
            out = run(name, x)
        out.float().square().mean().backward()
        return [out.detach().float(), x.grad] + [p.grad for p in forms[name].parameters()]

    reference = grads("model")
    tol = 3e-2 if cuda else 1e-5
    for name in checked:
        for got, want in zip(grads(name), reference):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        print(f"{name} equals model, output and gradients ({x0.device.type})", flush=True)
    if not cuda:
        return
    for name in forms:
        compiled = torch.compile(lambda x, name=name: run(name, x))
        x = x0.clone().requires_grad_()

        def step():
            x.grad = None
            for p in forms[name].parameters():
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = compiled(x)
            out.float().square().mean().backward()

        print(f"{name:10s} {median_cuda_ms(step):8.3f} ms ({what}, forward + backward, compiled, bf16)", flush=True)


def kernel_checked(triton, check):
    """``triton`` after a probe's kernel ``check()`` passed, or None: a kernel that fails (one that does not compile
    on this machine, say) is reported and leaves the probe's Triton form out, not the other forms' numbers."""
    if triton is None:
        return None
    try:
        check()
    except Exception as exc:
        print(f"triton_bwd left out: {type(exc).__name__}: {exc}", flush=True)
        return None
    return triton
