"""Non-finite training steps: detected on the device, skipped, counted, and a run that keeps making them stopped.

A step is *bad* when its loss or the norm of the gradient the optimizer would apply (after clipping) is
not finite: ``optim.lr=1e30`` blows the weights up so the next forward overflows, ``optim.eps=0`` divides
0 by 0 for every weight whose gradient is 0 (adaLN-zero makes many), ``optim.grad_clip=NaN`` multiplies
every gradient by NaN. A bad step changes nothing: no weight, optimizer-state or EMA update (the
optimizer's step counter included), so one overflow in a long run costs one batch.

On CUDA the check never waits for the GPU: the flag stays a device tensor, fused AdamW skips its update
through the ``found_inf`` tensor it reads for GradScaler (torch/optim/adam.py ``_fused_adam``: the kernel
returns early where found_inf == 1 and the step counter is decremented again), the EMA moves with a
weight multiplied by the flag, and the counters below are device tensors read only where the loop
syncs anyway (log lines, checkpoints). So on CUDA a run stops at the first log line at or after the
``train.max_bad_steps``-th bad step in a row (at most ``train.log_every - 1`` steps late; the counter
remembers the longest streak between reads, so a streak that ends before the log line still stops it).
Off CUDA the counters are read after every step and the run stops at that step exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor


class DivergenceError(RuntimeError):
    """The run made ``train.max_bad_steps`` non-finite steps in a row (or its weights are not finite)."""


def clip_and_check(params: Iterable[torch.nn.Parameter], max_norm: float, loss: Tensor) -> tuple[Tensor, Tensor]:
    """Clip the gradients to ``max_norm`` in place (as ``clip_grad_norm_``); return (norm before clipping, finite).

    finite (a bool device tensor): the loss and the norm of the clipped gradient are finite. The clipped
    norm is ``total * scale``: an infinite total gives inf * 0 = NaN and a NaN ``max_norm`` a NaN scale,
    so every way the applied gradient can hold inf/NaN shows up in it. No host sync.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)  # ||g||_2 over every gradient (0-d, on the device)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s coefficient
    torch._foreach_mul_(grads, scale)
    if hasattr(total, "full_tensor"):  # FSDP2's sharded gradients: the norm of the whole gradient, every rank
        total, scale = total.full_tensor(), scale.full_tensor()
    finite = torch.isfinite(loss.detach().float()) & torch.isfinite(total * scale)
    return total, finite


@dataclass(frozen=True)
class BadStepCount:
    in_a_row: int  # bad steps ending at the last step (0: the last step was finite)
    longest: int  # the longest run of bad steps in a row since the previous read
    total: int  # bad (skipped) steps over the whole run, resumes included


class BadSteps:
    """Device-side counters of bad steps; :meth:`read` is the only place they come back to the host."""

    def __init__(self, device: torch.device, total: int = 0):
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.in_a_row, self.longest = zero.clone(), zero.clone()
        self.total = zero + total
        self.last_finite = torch.ones((), dtype=torch.bool, device=device)  # the last step's flag

    def record(self, finite: Tensor) -> None:
        self.last_finite = finite
        bad = (~finite).long()
        self.in_a_row.add_(1).mul_(bad)  # +1 on a bad step, back to 0 on a finite one
        torch.maximum(self.longest, self.in_a_row, out=self.longest)
        self.total.add_(bad)

    def read(self) -> BadStepCount:
        """The counters (one host sync); the longest streak restarts from the current one."""
        in_a_row, longest, total = torch.stack([self.in_a_row, self.longest, self.total]).tolist()
        self.longest.copy_(self.in_a_row)
        return BadStepCount(in_a_row, longest, total)


def divergence_message(count: BadStepCount, step: int, limit: int, optim, latest) -> str:
    """The error a run stopped for non-finite steps ends with: what happened, what is kept, what to change."""
    return (
        f"training diverged: {count.longest} steps in a row had a non-finite loss or gradient norm (by step "
        f"{step}; {count.total} such steps skipped in this run, none of which changed the weights, optimizer "
        f"state or EMA). No checkpoint was written after the last finite step; the newest checkpoint is "
        f"{latest if latest is not None else 'none (no checkpoint was written yet)'}. Lower optim.lr (now "
        f"{optim.lr}), check optim.eps (now {optim.eps}; it must be > 0) and optim.grad_clip (now "
        f"{optim.grad_clip}), then run again to resume from that checkpoint; or raise train.max_bad_steps "
        f"(now {limit}) to tolerate longer bursts"
    )
