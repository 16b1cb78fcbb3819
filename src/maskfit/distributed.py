"""Many processes, one run: the process group, DDP / FSDP2 wrapping, rank-independent random draws,
reductions at log lines and rank-aware checkpoint state (``train.parallel``; start with torchrun).

Everything here is PyTorch's own engine: ``torch.distributed`` (the process group from torchrun's
environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), ``DistributedDataParallel`` and FSDP2
(``torch.distributed.fsdp.fully_shard`` with a ``MixedPrecisionPolicy``). The training loop only sees a
:class:`Parallel` (rank, world size, a few collectives); :func:`parallelize` wraps the model from outside,
in torchtitan's spirit.

What makes W ranks with B images each train the same model as one process with W x B images:
- data: rank r of each global batch takes its r-th slice (maskfit.data.loader.ResumableBatchSampler);
  masks are drawn per image from (seed, epoch, index), never from the position in a batch;
- random draws of a step (label dropout, t, noise): every rank draws the GLOBAL step's numbers from the
  same seeded generator and keeps its own slice (:func:`rank_draws`); the slice offsets come from one
  small all-gather of each rank's (segments, tokens, images) on a CPU (gloo) group, so no GPU sync;
- loss: each rank's loss is the mean over its images, weighted by W x (its images / the step's images);
  DDP and FSDP average gradients over ranks, so the gradient is the mean over all the step's images.
  With image batching every rank has B images and the weight is exactly 1.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

PARALLEL_MODES = ("none", "ddp", "fsdp")


# ----------------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------------


@dataclass
class Parallel:
    """Who this process is in the run, and the few collectives the loop needs (no-ops on one process)."""

    mode: str = "none"  # train.parallel
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    cpu_group: object = None  # a gloo group for host-side integers (no GPU sync); None on one process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (host ints), rank order; one CPU all-gather, no GPU sync."""
        if self.world_size == 1:
            return [list(values)]
        local = torch.tensor(list(values), dtype=torch.int64)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local, group=self.cpu_group)
        return [o.tolist() for o in out]

    def mean_(self, t: Tensor) -> Tensor:
        """In-place mean over ranks of a device tensor (log lines only: NCCL's all_reduce is asynchronous)."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(self.world_size)
        return t

    def all_finite(self, finite: Tensor) -> Tensor:
        """The step's finite flag, True only where every rank's is: a rank skipping alone would leave its
        weights apart from the others'. One scalar all-reduce on the device, no host sync."""
        if self.world_size == 1:
            return finite
        flag = finite.to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.reshape(()) > 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    def gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj`` (checkpoints only)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out


def init_parallel(mode: str, device_name: str = "auto") -> Parallel:
    """The run's :class:`Parallel`; with ``mode`` "ddp" / "fsdp" the process group from torchrun's environment.

    NCCL on CUDA, gloo on the CPU; each process takes the GPU of its LOCAL_RANK.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.parallel={mode!r} is not one of {PARALLEL_MODES}")
    if mode == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                f"this process was started with WORLD_SIZE={os.environ['WORLD_SIZE']} (torchrun) but train.parallel="
                "'none': every rank would train the whole run on its own; set train.parallel='ddp' or 'fsdp'"
            )
        return Parallel()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"train.parallel={mode!r} needs the process group torchrun sets up; start with `torchrun "
            "--nproc-per-node N -m maskfit.cli train CONFIG` (N=1 on one GPU), or set train.parallel='none'"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    cpu_group = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return Parallel(mode, rank, world, local_rank, cpu_group)


def rank_device(parallel: Parallel, device: torch.device) -> torch.device:
    """``cuda`` means this rank's GPU (LOCAL_RANK) under torchrun."""
    if device.type == "cuda" and parallel.distributed and device.index is None:
        return torch.device("cuda", parallel.local_rank)
    return device


def shutdown(parallel: Parallel) -> None:
    if parallel.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Wrapping (from outside the model)
# ----------------------------------------------------------------------------------------------------


def parallelize(model: torch.nn.Module, parallel: Parallel, device: torch.device, bf16: bool,
                shard_only: bool = False, ddp_bucket_mb: int = 100) -> torch.nn.Module:
    """The module the step calls: ``model`` itself, DDP around it, or ``model`` sharded in place (FSDP2).

    FSDP2 shards every transformer block and then the root (the blocks' all-gathers overlap compute);
    with ``bf16`` its MixedPrecisionPolicy computes in bf16 and reduces gradients in fp32.
    shard_only: shard (FSDP) but never wrap in DDP, for the EMA copy, which is never trained.
    ddp_bucket_mb: DDP's all-reduce bucket size (train.ddp_bucket_mb says why it is not PyTorch's 25).
    """
    if parallel.mode == "none":
        return model
    if parallel.mode == "ddp":
        if shard_only:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # Gradients live in DDP's all-reduce buckets instead of beside them: one copy of the gradients fewer
        # (7.4 GiB for FiT-B/2 at batch 256 on the H200, BENCHMARKS.md) and no copy into the buckets per step.
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                       bucket_cap_mb=ddp_bucket_mb)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    blocks = [block for name in ("mixer_blocks", "blocks", "decoder_blocks") for block in getattr(model, name, None) or ()]
    for i, block in enumerate(blocks):
        # The last module of the forward is the first of the backward: freeing its gathered weights only to
        # gather them again at once saves no memory (torchtitan's default policy does the same).
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)  # the root's few weights: keep them gathered
    return model


def unwrap(forward) -> torch.nn.Module:
    """The FiT under torch.compile (``_orig_mod``) and DDP (``module``) wrappers."""
    seen = forward
    while True:
        if hasattr(seen, "_orig_mod"):
            seen = seen._orig_mod
        elif isinstance(seen, torch.nn.parallel.DistributedDataParallel):
            seen = seen.module
        else:
            return seen


def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2 parameters), any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# ----------------------------------------------------------------------------------------------------
# Rank-independent random draws
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepShares:
    """Each rank's (segments, tokens, real images) this step, rank order, and this rank's index."""

    rank: int
    sizes: tuple  # ((segments, tokens, images), ...) per rank

    def offset(self, kind: int) -> tuple[int, int, int]:
        """(start, count, total) of this rank's rows of a kind: 0 segments, 1 tokens."""
        counts = [s[kind] for s in self.sizes]
        return sum(counts[: self.rank]), counts[self.rank], sum(counts)

    @property
    def images(self) -> int:
        return sum(s[2] for s in self.sizes)

    def loss_weight(self) -> float:
        """W x (this rank's images / the step's images): DDP's average of the weighted losses is then the
        mean over every image of the step (exactly 1 with image batching)."""
        mine, total = self.sizes[self.rank][2], self.images
        return len(self.sizes) * mine / total if total else 1.0


_SHARES: contextvars.ContextVar[Optional[StepShares]] = contextvars.ContextVar("maskfit_step_shares", default=None)


@contextlib.contextmanager
def rank_draws(shares: Optional[StepShares]):
    """Inside, :func:`draw` makes each rank draw the global step's numbers and keep its slice."""
    token = _SHARES.set(shares)
    try:
        yield
    finally:
        _SHARES.reset(token)


def draw(fn, shape: Sequence[int], per: str, **kwargs) -> Tensor:
    """``fn(shape, **kwargs)`` (torch.rand / randn / randint's size form), rank-independent under :func:`rank_draws`.

    per: what dim 0 counts, "segments" (one number per image segment) or "tokens" (one per stream token).
    One process with W x B images draws the same numbers as W ranks with B each, and no two ranks share one.
    """
    shares = _SHARES.get()
    shape = tuple(shape)
    if shares is None or len(shares.sizes) == 1:
        return fn(shape, **kwargs)
    start, count, total = shares.offset(0 if per == "segments" else 1)
    if shape[0] != count:
        raise RuntimeError(f"a {per} draw of {shape[0]} rows on a rank whose step has {count} {per} (a bug: report it)")
    return fn((total, *shape[1:]), **kwargs)[start : start + count]


# ----------------------------------------------------------------------------------------------------
# Checkpoint state: the single-process files (gathered) or torch.distributed.checkpoint shards; any world
# size resumes either
# ----------------------------------------------------------------------------------------------------


def writes_sharded(checkpoint_format: str, parallel: Parallel) -> bool:
    """train.checkpoint_format resolved: "auto" is sharded under FSDP only."""
    return checkpoint_format == "sharded" or (checkpoint_format == "auto" and parallel.mode == "fsdp")


def sharded_states(model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """This rank's {"model", "ema", "optimizer"} tensors, keyed by parameter name (DTensor shards under FSDP,
    whole tensors otherwise), for ckpt_io.save_sharded_checkpoint; and the optimizer's param groups (plain
    values: they go to state.pt, which is read with weights_only, not into the shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = get_optimizer_state_dict(model, optimizer)
    return ({"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
             "optimizer": {"state": optim["state"]}}, optim["param_groups"])


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path,
                           parallel: Parallel) -> None:
    """The optimizer state of a sharded checkpoint folder (its tensors from the shards, its param groups from
    state.pt), resharded onto this run's wrapping and world size.

    The template is this run's own (name-keyed) optimizer state, so torch.distributed.checkpoint reads just
    the pieces each rank holds; every rank must call it (a collective where there is a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from maskfit.checkpoint import SHARDED_DIR, load_state, one_process_quietly, sharded_metadata

    sharded_metadata(checkpoint)  # refuses what torch would unpickle unrestricted
    template = get_optimizer_state_dict(model, optimizer)
    tensors = {"optimizer": {"state": template["state"]}}
    # Loads the tensors in place (the template's tensors are the optimizer's own state, or its shards); setting
    # the state afterwards restores the param groups' hyperparameters too.
    with one_process_quietly():
        dcp.load(tensors, checkpoint_id=str(Path(checkpoint) / SHARDED_DIR), no_dist=not dist.is_initialized())
    param_groups = load_state(checkpoint)["optimizer_param_groups"]
    set_optimizer_state_dict(model, optimizer, {"state": tensors["optimizer"]["state"], "param_groups": param_groups})


def full_model_state(module: torch.nn.Module, parallel: Parallel) -> dict[str, Tensor]:
    """The whole fp32 state dict (FSDP: gathered onto rank 0's CPU, empty elsewhere; every rank must call it)."""
    if parallel.mode != "fsdp":
        return {k: v.detach() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the ids of a plain ``state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, parallel: Parallel) -> dict:
    """``optimizer.state_dict()`` of the unsharded model (FSDP: gathered and re-keyed by parameter index)."""
    if parallel.mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not named:  # full_state_dict with cpu_offload: rank 0 gets the state, the others nothing
        return {}
    index = {n: i for i, n in enumerate(param_names(model, optimizer))}
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, named["param_groups"]):
        n = len(group["params"])
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": list(range(start, start + n))})
        start += n
    return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, parallel: Parallel) -> None:
    """Load a plain (index-keyed, full) optimizer state into any wrapping."""
    if parallel.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = param_names(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    named = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
