"""Probe: forward + backward time of RoPE on q and k, compiled, for FiT-B/2's packed step (issue 14 item 3).

    PYTHONPATH=src python3 tools/probes/rope_variants.py [TOKENS] [HEADS] [HEAD_DIM]

The profile of 2026-12-01 (BENCHMARKS.md) put RoPE at 4.2 ms (backward) + 1.3 ms (forward) of a 92.8 ms
FiT-B/2-dit step, about 3x what its bytes need. Variants of the pair rotation (x0, x1) -> (-x1, x0), each
checked equal to the model's ``apply_rope`` and timed on (T, H, D_h) bf16 q and k with fp32 tables:

- ``stack``: the model's form (unflatten, stack of -x1 and x0, flatten);
- ``flip``: the pairs flipped (an index change) times a (-1, +1) sign;
- ``signed_sin``: the sign folded into the sin table once per forward, so each layer does x*cos + flip(x)*sin';
- ``bf16_tables``: the model's form with the tables cast to bf16 once per forward.

Prints one line per variant: ms for 12 layers' forward + backward (CUDA events, median of 20 after warm-up).
"""
import sys

import torch

from maskfit.models.rope import RopeTables, apply_rope

from cuda_timing import median_cuda_ms  # tools/probes/, the script's own folder


def rotate_flip(x):
    sign = torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device)
    return (x.unflatten(-1, (-1, 2)).flip(-1) * sign).flatten(-2)


def rope_flip(x, t):
    return x * t.cos[:, None].to(x.dtype) + rotate_flip(x) * t.sin[:, None].to(x.dtype)


def rope_signed(x, t):  # t.sin already carries the (-1, +1) sign
    return x * t.cos[:, None].to(x.dtype) + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * t.sin[:, None].to(x.dtype)


def signed(t):
    sign = torch.tensor([-1.0, 1.0], device=t.sin.device).repeat(t.sin.shape[-1] // 2)
    return RopeTables(t.cos, t.sin * sign)


def main():
    given = [int(a) for a in sys.argv[1:4]]
    T, H, D = given + [61762, 12, 64][len(given):]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    ang = torch.rand(T, D, device=dev, generator=g) * 20
    tables = RopeTables(ang.cos(), ang.sin())
    variants = {
        "stack": (apply_rope, lambda t: t),
        "flip": (rope_flip, lambda t: t),
        "signed_sin": (rope_signed, signed),
        "bf16_tables": (apply_rope, lambda t: RopeTables(t.cos.bfloat16(), t.sin.bfloat16())),
    }
    q0 = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    reference = apply_rope(q0.float(), tables)
    for name, (fn, prepare) in variants.items():
        def layers(q, k, tab):
            out = 0
            for _ in range(12):  # 12 blocks share one table, as in the model
                out = out + (fn(q, tab) * fn(k, tab)).sum(dtype=torch.float32)
            return out

        compiled = torch.compile(layers)
        q = q0.clone().requires_grad_()
        k = q0.flip(0).clone().requires_grad_()
        torch.testing.assert_close(fn(q0, prepare(tables)).float(), reference, atol=0.05, rtol=0.02)

        def step():
            q.grad = k.grad = None
            compiled(q, k, prepare(tables)).backward()

        print(f"{name:12s} {median_cuda_ms(step):7.3f} ms (12 layers, q and k, forward + backward)", flush=True)


if __name__ == "__main__":
    main()
