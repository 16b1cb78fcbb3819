"""One training loop for every path (padded FiT, packed, masked-and-packed), on one device or many.

Many GPUs (``train.parallel``, started with torchrun): the loop sees a :class:`maskfit.distributed.Parallel`
only (rank, a few collectives); the model is wrapped from outside (:func:`maskfit.distributed.parallelize`).

bf16 autocast on GPU and fp32 on CPU, AdamW, EMA, gradient clipping, tqdm, TensorBoard scalars (loss,
images/s, tokens/s, MFU, images seen, torch.compile graphs and seconds), atomic checkpoints and exact
resume (model, EMA, optimizer, data order, RNG, images seen).

Nothing lost: a step with a non-finite loss or gradient is skipped and counted, and a run that keeps
making them stops (maskfit.divergence); SIGTERM / Ctrl-C write a checkpoint at the next step boundary
(maskfit.interrupt); a fresh start never mixes with or deletes another run's checkpoints.

The step itself (:func:`train_step`) is shared with ``maskfit bench``, and the loader's workers build each
step's whole batch (masks included), so the loop here only moves pinned tensors to the device and runs it.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from maskfit import checkpoint as ckpt_io
from maskfit.config import RunConfig, to_dict
from maskfit.config_history import HISTORY_NAME, describe_changes, save_run_config
from maskfit.diffusion.guidance import drop_labels
from maskfit.distributed import (
    Parallel, StepShares, full_model_state, full_optimizer_state, init_parallel, local_tensor, rank_draws,
    sharded_states, shutdown, unwrap, writes_sharded,
)
from maskfit.divergence import BadSteps, DivergenceError, clip_and_check, divergence_message
from maskfit.interrupt import StopSignals
from maskfit.locks import folder_lock
from maskfit.models.transformer import count_parameters
# Building a run from its config (device, model config, diffusion, patch size, model, EMA, optimizer and
# parallel wrapping) lives in maskfit.runs; the names stay importable from here.
from maskfit.runs import (  # noqa: F401
    TrainingRun, autocast_for, build_diffusion, build_training_run, check_attention_device,
    load_model_from_checkpoint, resolve_device, resolved_model_config, run_patch_size,
)
from maskfit.throughput import FlopModel, compile_stats, peak_tflops
from maskfit.tokens import TokenBatch


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, finite: Optional[Tensor] = None) -> None:
    """ema = decay*ema + (1-decay)*p; with ``finite`` (a bool device tensor) the weight is 0 where it is False."""
    # local_tensor: under FSDP both are sharded alike, and each rank moves its own shard.
    ema_params = [local_tensor(p) for p in ema.parameters()]
    params = [local_tensor(p.detach()) for p in model.parameters()]
    if finite is None:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        return
    # lerp takes its weight as a host scalar (a tensor would be read back: a sync), so lerp's own formula
    # e + w (p - e) in three fused launches, w a device scalar; w = 0 leaves e bit for bit. The difference
    # is a temporary the size of the weights.
    weight = finite.float() * (1.0 - decay)
    delta = torch._foreach_sub(params, ema_params)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(ema_params, delta)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay of the update after optimisation step ``step`` (0-based); a Python float, so no host sync.

    With ``warmup`` (optim.ema_warmup) the decay is min(decay, (1 + step) / (10 + step)), and 0 at the first
    update (the EMA starts as a copy of the trained weights): diffusers' ``EMAModel.get_decay`` with
    ``use_ema_warmup=False`` (training_utils.py), after TensorFlow's ``tf.train.ExponentialMovingAverage``
    with ``num_updates``. A short run's EMA then averages over ~step/9 recent steps instead of keeping
    decay^step of its initial weights (0.9999^2000 = 82 %).
    """
    if not warmup:
        return decay
    if step <= 0:
        return 0.0
    return min(decay, (1 + step) / (10 + step))


def crossed_image_mark(marks, before: int, after: int) -> bool:
    """Whether a step that took images seen from ``before`` to ``after`` crossed one of ``marks``."""
    return any(before < m <= after for m in marks)


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


class TensorBoardLog:
    """TensorBoard scalars when tensorboard is installed; a JSON-lines log always."""

    def __init__(self, run_dir: Path):
        self.jsonl = open(run_dir / "log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------
# One step: the same code for `maskfit train` and `maskfit bench`
# ----------------------------------------------------------------------------------------------------


def step_sizes(run: TrainingRun, batch: TokenBatch, num_images: int) -> tuple[int, int, int]:
    """(segments, tokens the noise is drawn on, real images) of a batch: host shapes, no sync."""
    plain = batch.mask is not None and run.mcfg.mask_design == "plain"
    tokens = batch.mask.index.shape[0] if plain else batch.tokens.shape[0]
    return int(batch.y.shape[0]), int(tokens), int(num_images)


def train_step(run: TrainingRun, batch: TokenBatch, step: int,
               shares: Optional[StepShares] = None) -> tuple[Tensor, dict, Tensor]:
    """One optimisation step on a batch already on the device: (loss, loss terms, grad norm), all tensors.

    A step whose loss or clipped gradient norm is not finite changes nothing (no weight, optimizer-state
    or EMA update) and is counted in ``run.bad_steps`` (maskfit.divergence). No host sync with a fused
    optimizer (CUDA): the skip rides on device flags and nothing is read back (log lines read the loss
    every log_every steps). Other optimizers (the CPU's) have no device-side skip and check on the host.

    shares (many ranks): every rank's batch sizes this step (:func:`step_sizes`, gathered by the loop):
    the random draws are the global step's, sliced (maskfit.distributed.rank_draws), and the loss is
    weighted by W x this rank's share of the step's images, so the ranks' averaged gradient is the mean
    over every image of the step. The returned loss and terms carry that weight (their mean over ranks is
    the step's loss). The finite flag is the same on every rank (one all-reduce), so ranks skip together.
    """
    cfg = run.cfg
    if cfg.train.compile_mode == "reduce-overhead":  # the config allows it only under train.compile
        # A new iteration: the CUDA graphs may reuse the memory of the last step's outputs (all consumed by now).
        torch.compiler.cudagraph_mark_step_begin()
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps)
    with rank_draws(shares):
        y = drop_labels(batch.y, cfg.diffusion.label_dropout, run.mcfg.num_classes, generator=run.generator)
        with autocast_for(cfg.train.precision, run.device):
            loss, terms = training_loss(run.forward, run.diffusion, batch, y, cfg.mask.aux_loss_weight,
                                        run.generator, aux_target=cfg.mask.aux_target)
    weight = 1.0 if shares is None else shares.loss_weight()
    if weight != 1.0:  # token batching on many ranks: images per rank differ
        loss, terms = loss * weight, {k: v * weight for k, v in terms.items()}
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm, finite = clip_and_check(run.model.parameters(), cfg.optim.grad_clip, loss)
    finite = run.parallel.all_finite(finite)
    if run.optimizer.defaults.get("fused"):
        # Fused AdamW skips its whole update (moments and step count included) where found_inf is 1, the
        # attribute GradScaler sets on it (torch/optim/adam.py _fused_adam).
        run.optimizer.found_inf = (~finite).float()
        try:
            run.optimizer.step()
        finally:
            del run.optimizer.found_inf
        update_ema(run.ema, run.model, ema_decay_at(step, cfg.optim.ema_decay, cfg.optim.ema_warmup), finite)
    elif bool(finite):
        run.optimizer.step()
        update_ema(run.ema, run.model, ema_decay_at(step, cfg.optim.ema_decay, cfg.optim.ema_warmup))
    run.bad_steps.record(finite)
    return loss, terms, grad_norm


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float]
    images_per_s: float
    num_params: int
    images_seen: int = 0  # over the whole run, resumes included
    compile_graphs: int = 0  # graphs torch.compile built in this call (1 forward graph = no recompile)
    compile_seconds: float = 0.0
    measured: Optional[dict] = None  # the timed window asked for with measure_after (maskfit bench --data)
    skipped_steps: int = 0  # non-finite steps skipped over the whole run, resumes included
    checkpoint: Optional[Path] = None  # the newest checkpoint of the run when the call ended
    stop_signal: Optional[int] = None  # SIGTERM / SIGINT when a signal ended the call
    stop_message: str = ""  # what a signal stop saved and where


class RateWindow:
    """Images, tokens and useful FLOPs since the last log line, for per-window rates, and where the main
    process spent the window.

    Windows end at log lines, where the loss is read back (a device sync), so each window's wall time
    covers its steps' GPU work; rates over a window include everything the loop waited for (loader,
    recompiles, checkpoints), which is the point.

    Host time, per step: ``loader_wait`` = waiting for the next batch (the workers' queue and the pinned copy's
    launch), ``host_step`` = running ``train_step`` on the host. On CUDA, also each step's time on the GPU, from
    an event pair recorded around its launch (``gpu_step_ms``; read only after a sync, so it costs none).
    Reading them: a large loader_wait fraction means the loader sets the speed. host_step alone cannot tell a
    launch-bound host from a GPU-bound one (the host also blocks once the launch queue is full); the GPU time per
    step can: against the synthetic step's time (``maskfit bench --data``), a longer GPU step means the step
    itself is slower in the real loop (launches starved of CPU, or other shapes), an equal one with a longer wall
    step means the time is lost between steps.
    """

    COUNTERS = ("images", "tokens", "flops", "loader_wait", "host_step", "gpu_step_ms", "gpu_steps")

    def __init__(self, flop_model: FlopModel):
        self.flop_model = flop_model
        self.totals = dict.fromkeys(self.COUNTERS, 0)  # over the whole call, never reset
        self._pending: list = []  # (start, end) CUDA events of steps not yet folded in (settle)
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.t0 = now
        self.window = dict.fromkeys(self.COUNTERS, 0)  # since the last log line

    def _count(self, **values) -> None:
        for key, value in values.items():
            self.window[key] += value
            self.totals[key] += value

    @staticmethod
    def step_events(device: torch.device):
        """(start, end) timing events to record around one step's launch on CUDA; None elsewhere."""
        if device.type != "cuda":
            return None
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def add(self, info, loader_wait: float = 0.0, host_step: float = 0.0, events=None) -> None:
        flops = self.flop_model.step_flops(info.sums, info.masked)
        self._count(images=info.num_images, tokens=info.sums.kept, flops=flops, loader_wait=loader_wait,
                    host_step=host_step)
        if events is not None:
            self._pending.append(events)

    def settle(self) -> None:
        """Fold the recorded steps' GPU times in. Call only after the device has synced (a log line's loss read,
        a measurement's sync): every event is complete then, so reading them waits for nothing."""
        for start, end in self._pending:
            self._count(gpu_step_ms=start.elapsed_time(end), gpu_steps=1)
        self._pending.clear()

    def rates(self, now: float, peak: Optional[float]) -> dict[str, float]:
        """The window's rates; called at a log line, after the loss read synced the device."""
        self.settle()
        w, dt = self.window, max(now - self.t0, 1e-9)
        out = {"images_per_s": w["images"] / dt, "tokens_per_s": w["tokens"] / dt,
               "tflops_per_s": w["flops"] / dt / 1e12,
               "loader_wait_fraction": w["loader_wait"] / dt, "host_step_fraction": w["host_step"] / dt}
        if w["gpu_steps"]:
            out["gpu_ms_per_step"] = w["gpu_step_ms"] / w["gpu_steps"]
        if peak is not None:
            out["mfu"] = w["flops"] / dt / 1e12 / peak
        return out


def _checked_run_dir(cfg: RunConfig) -> Path:
    """The run folder, checked before the lock creates it (a file there is named, not a raw mkdir error)."""
    from maskfit.paths import check_output_dir

    return check_output_dir(cfg.train.out_dir, "train.out_dir", "run folder")


def train(
    cfg: RunConfig,
    resume: bool = True,
    progress: bool = True,
    stop_after: Optional[int] = None,
    max_seconds: Optional[float] = None,
    measure_after: Optional[int] = None,
    fresh_into_existing: bool = False,
) -> TrainResult:
    """Train (or resume) the run described by ``cfg`` in ``cfg.train.out_dir``.

    Stops at ``train.steps``, at ``train.max_images`` images seen, or after ``train.max_seconds`` (a
    checkpoint is written at every stop), and at SIGTERM / SIGINT (a checkpoint at the next step
    boundary; ``stop_signal`` and ``stop_message`` say so). ``train.max_bad_steps`` non-finite steps in a
    row raise :class:`DivergenceError` with every earlier checkpoint kept.
    resume=False in a folder that holds checkpoints is refused, unless ``fresh_into_existing``: then the
    old run's files move into ``out_dir/previous_run_<time>/`` (nothing is deleted) and training starts at 0.
    stop_after: stop after this many optimiser steps in this call (tests use it to simulate a crash).
    max_seconds: overrides ``train.max_seconds`` (the CPU demo).
    measure_after: time this call's steps after the first ``measure_after`` (device synced at both ends,
    peak memory over the window): ``maskfit bench --data`` reads ``TrainResult.measured``.
    """
    parallel = init_parallel(cfg.train.parallel, cfg.train.device)
    try:
        # One process per run folder: a second `maskfit train` on it is refused, naming the first
        # (maskfit.locks). Rank 0 holds it for the run's ranks (only rank 0 writes there).
        run_dir = _checked_run_dir(cfg)
        lock = folder_lock(run_dir, "run folder") if parallel.is_main else contextlib.nullcontext()
        with lock, StopSignals() as stop:  # a Ctrl-C during the set-up already stops cleanly
            return _train(cfg, run_dir, resume, progress and parallel.is_main, stop_after, max_seconds,
                          measure_after, fresh_into_existing, stop, parallel)
    finally:
        shutdown(parallel)


def _note(message: str) -> None:
    print(f"maskfit train: {message}", file=sys.stderr, flush=True)


def _start_checkpoint(run_dir: Path, resume: bool, fresh_into_existing: bool) -> Optional[Path]:
    """The checkpoint to resume from (None: step 0); refuses a start that would mix with or lose another run."""
    if not ckpt_io.holds_checkpoints(run_dir):
        return None
    latest = ckpt_io.latest_checkpoint(run_dir)
    if resume and not fresh_into_existing:
        if latest is None:
            raise ValueError(
                f"{run_dir / 'checkpoints'} holds checkpoint folders but none is complete (each needs "
                f"{', '.join(ckpt_io.REQUIRED_FILES)}); a start at step 0 there would overwrite them. Move them "
                "away, or pass --fresh-into-existing to move the old run's files aside and start over"
            )
        if ckpt_io.latest_pointer_target(run_dir) != latest:
            _note(f"{run_dir / 'checkpoints' / 'latest'} is missing, empty or names no complete checkpoint; "
                  f"resuming from {latest.name}, the newest complete one")
        return latest
    if not fresh_into_existing:
        raise ValueError(
            f"{run_dir} already holds a run (latest checkpoint: {latest.name if latest else 'none complete'}); a "
            "fresh start (--no-resume) there would mix its checkpoints with the old ones. Resume it (drop "
            "--no-resume), set train.out_dir to a new folder, or pass --fresh-into-existing to move the old "
            f"run's files into {run_dir}/previous_run_<time>/ and start at step 0 (nothing is deleted)"
        )
    moved = ckpt_io.set_aside_run(run_dir)
    _note(f"moved the previous run's files into {moved}; starting at step 0")
    return None


def _train(cfg, run_dir: Path, resume, progress, stop_after, max_seconds, measure_after, fresh_into_existing, stop,
           parallel: Parallel) -> TrainResult:
    from maskfit.data.pipeline import build_training_data, stream_length_varies

    tcfg = cfg.train
    max_seconds = tcfg.max_seconds if max_seconds is None else max_seconds
    latest = None
    if parallel.is_main:  # only rank 0 changes the run folder; the others learn where to resume from it
        run_dir.mkdir(parents=True, exist_ok=True)
        for partial in ckpt_io.remove_partial_checkpoints(run_dir):
            _note(f"removed {partial}, the partial folder of an interrupted checkpoint write")
        latest = _start_checkpoint(run_dir, resume, fresh_into_existing)
    latest = parallel.gather_objects(latest)[0]
    torch.manual_seed(tcfg.seed)

    data = build_training_data(cfg, run_patch_size(cfg), parallel.rank, parallel.world_size)
    run = build_training_run(cfg, data.channels, dynamic_stream=stream_length_varies(cfg, data.mask),
                             resuming=latest is not None,
                             parallel=parallel, checkpoint=latest)
    model, device = run.model, run.device

    step, images_seen = 0, 0
    if latest is not None:
        state = ckpt_io.load_state(latest)
        step = state["step"]
        images_seen = int(state.get("images_seen", 0))  # checkpoints from before the count start at 0
        run.bad_steps = BadSteps(device, total=int(state.get("skipped_steps", 0)))
        # Every rank's own RNG where the checkpoint has it (same world size), else rank 0's; the training
        # draws themselves come from run.generator, the same stream on every rank.
        ranks = state.get("rng_ranks") or [state["rng"]]
        ckpt_io.set_rng_state(ranks[parallel.rank] if parallel.rank < len(ranks) else state["rng"])
        run.generator.set_state(state["generator"].to(run.generator.get_state().device))
        data.load_state_dict(state["data"])
    full_config = to_dict(cfg)
    full_config["resolved_model"] = to_dict(run.mcfg)
    changes = save_run_config(run_dir, cfg, step) if parallel.is_main else None  # appended to config_history.jsonl
    if changes:
        print(f"maskfit train: {run_dir} {'resumes at step ' + str(step) if latest else 'starts over'} with a changed "
              f"config: {describe_changes(changes)} (recorded in {run_dir / HISTORY_NAME})", file=sys.stderr)

    log = TensorBoardLog(run_dir) if parallel.is_main else _NoLog()
    peak = peak_tflops(device)
    window = RateWindow(FlopModel.of(run.mcfg))
    graphs0, compile0 = compile_stats()
    losses: list[float] = []
    last_step = tcfg.steps if stop_after is None else min(tcfg.steps, step + stop_after)
    bar = _progress(step, None if max_seconds is not None else tcfg.steps, progress)
    first_step, images_at_start, t0 = step, images_seen, time.perf_counter()
    measured, mark = None, None
    running = torch.zeros((), device=device)  # sum of the finite losses since the last log line ...
    since_log = 0  # ... over this many steps (0 at every start: a resume need not begin on a log boundary)
    skipped_at_log = run.bad_steps.total.item()  # ... less the skipped ones (the total's growth since)
    saved, saved_step = latest, step  # the newest checkpoint of this run
    pending = False  # a checkpoint is due; it waits for a finite step (a diverging model must not replace a good one)
    count = None
    read_every_step = _reads_counters_every_step(device)
    signalled = stop.requested  # a signal on any rank (agreed every step on many ranks)
    model.train()
    # The loop ends through `stopping` only: a signal is acted on where it is read (after a step, agreed across
    # ranks), never in this condition, where one landing after that read would end the loop with no checkpoint
    # (and, on many ranks, end it on one rank alone).
    while step < last_step:
        if measure_after is not None and step - first_step == measure_after:
            mark = _start_measure(device, step, window)
        t_fetch = time.perf_counter()
        batch = data.next_device_batch(step, device)  # built, flattened and pinned by the loader workers
        t_step = time.perf_counter()
        events = window.step_events(device)
        info = data.last_info
        shares, signalled, out_of_time = None, None, None  # one process: read after the step
        if parallel.world_size > 1:
            # One CPU all-gather of host numbers per step (no GPU sync): the batch sizes (rank-independent
            # draws, loss weights, images seen) and the stop flags, so every rank stops at the same step.
            late = max_seconds is not None and time.perf_counter() - t0 > max_seconds
            gathered = parallel.gather_ints([*step_sizes(run, batch, info.num_images), int(stop.requested), int(late)])
            shares = StepShares(parallel.rank, tuple(tuple(g[:3]) for g in gathered))
            signalled, out_of_time = any(g[3] for g in gathered), any(g[4] for g in gathered)
        if events is not None:
            events[0].record()
        loss, terms, grad_norm = (train_step(run, batch, step) if shares is None  # one process: the bench's call
                                  else train_step(run, batch, step, shares))
        if events is not None:
            events[1].record()
        window.add(info, loader_wait=t_step - t_fetch, host_step=time.perf_counter() - t_step, events=events)
        step += 1
        step_images = info.num_images if shares is None else shares.images
        images_seen += step_images
        running += torch.where(run.bad_steps.last_finite, loss.detach().float(), 0.0)
        since_log += 1
        bar.update(1)
        if signalled is None:
            signalled = stop.requested
        if out_of_time is None:
            out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        enough_images = tcfg.max_images is not None and images_seen >= tcfg.max_images
        stopping = step == last_step or out_of_time or enough_images or signalled
        pending = (pending or step % tcfg.ckpt_every == 0 or step == tcfg.steps or out_of_time or enough_images
                   or crossed_image_mark(tcfg.ckpt_at_images, images_seen - step_images, images_seen))
        at_log = step % tcfg.log_every == 0 or stopping
        if at_log or pending or read_every_step:
            # The bad-step counters come back here only: a host sync, at log lines and checkpoints on CUDA.
            count = run.bad_steps.read()
            if count.longest >= tcfg.max_bad_steps:
                log.scalars(step, {"skipped_steps": count.total, "bad_steps_in_a_row": count.in_a_row})
                bar.close()
                log.close()
                raise DivergenceError(divergence_message(count, step, tcfg.max_bad_steps, cfg.optim, saved))
        if at_log:
            # One host sync every log_every steps, never inside the step.
            finite_steps = since_log - (count.total - skipped_at_log)
            # Many ranks: one all-reduce of the running loss and the last step's terms (mean over ranks).
            reduced = parallel.mean_(torch.stack([running, *(v.detach().float() for v in terms.values())]))
            terms = dict(zip(terms, reduced[1:]))
            mean_loss = float(reduced[0]) / finite_steps if finite_steps else float("nan")
            running.zero_()
            since_log, skipped_at_log = 0, count.total
            losses.append(mean_loss)
            now = time.perf_counter()
            graphs, compile_s = compile_stats()
            values = {
                "loss": mean_loss, "grad_norm": float(grad_norm), "lr": run.optimizer.param_groups[0]["lr"],
                "padding_fraction": data.padding_fraction(), "images_seen": images_seen,
                "skipped_steps": count.total, "bad_steps_in_a_row": count.in_a_row,
                **{f"speed/{k}": v for k, v in window.rates(now, peak).items()},
                "compile/graphs": graphs - graphs0, "compile/seconds": compile_s - compile0,
            }
            values.update({f"loss/{k}": float(v) for k, v in terms.items()})
            log.scalars(step, values)
            window.reset(now)
            postfix = {"loss": f"{mean_loss:.4f}", "img_s": f"{values['speed/images_per_s']:.0f}"}
            bar.set_postfix(**postfix, **({"skipped": count.total} if count.total else {}))
        if pending and count.in_a_row == 0:
            saved = _save(run_dir, step, run, data, images_seen, count.total, full_config, t0)
            saved_step, pending = step, False
        if stopping:
            break
    stop_message = ""
    if signalled:  # SIGTERM / SIGINT (on any rank): save the steps since the last checkpoint (if they were finite)
        count = run.bad_steps.read()
        if step > saved_step and count.in_a_row == 0:
            saved = _save(run_dir, step, run, data, images_seen, count.total, full_config, t0)
            saved_step = step
        stop_message = _stop_message(stop.name or "a signal to another rank", step, step > first_step, saved_step,
                                     saved, count.in_a_row)
    elif pending:
        _note(f"no checkpoint for step {step}: its last {count.in_a_row} steps were not finite; the newest "
              f"checkpoint is {saved}")
    if mark is not None:
        measured = _end_measure(device, mark, step, window)
    bar.close()
    log.close()
    elapsed = time.perf_counter() - t0
    graphs, compile_s = compile_stats()
    return TrainResult(
        run_dir, step, losses, (images_seen - images_at_start) / max(elapsed, 1e-9), count_parameters(model),
        images_seen=images_seen, compile_graphs=graphs - graphs0, compile_seconds=round(compile_s - compile0, 2),
        measured=measured, skipped_steps=run.bad_steps.read().total, checkpoint=saved,
        stop_signal=stop.signum if stop.signum is not None or not signalled else _signal_number(),
        stop_message=stop_message,
    )


def _reads_counters_every_step(device: torch.device) -> bool:
    """Off CUDA reading the bad-step counters costs nothing, so the run stops at the exact step; on CUDA
    they are read at log lines and checkpoints only (a read waits for the GPU)."""
    return device.type != "cuda"


def _save(run_dir: Path, step: int, run: TrainingRun, data, images_seen: int, skipped: int, full_config: dict,
          t0: float) -> Path:
    extra = {"generator": run.generator.get_state(), "data": data.state_dict(), "images_seen": images_seen,
             "skipped_steps": skipped,
             "train_seconds": _seconds_since(t0, run.device)}  # this call's loop time (maskfit experiment)
    par = run.parallel
    keep = run.cfg.train.keep_checkpoints
    if writes_sharded(run.cfg.train.checkpoint_format, par):  # every rank writes its own shards, nothing gathered
        extra["rng_ranks"] = par.gather_objects(ckpt_io.rng_state())
        states, extra["optimizer_param_groups"] = sharded_states(run.model, run.ema, run.optimizer)
        return ckpt_io.save_sharded_checkpoint(run_dir, step, states, extra, full_config, par, keep_last=keep)
    if not par.distributed:
        return ckpt_io.save_checkpoint(run_dir, step, run.model, run.ema, run.optimizer, extra, full_config,
                                       keep_last=keep)
    # Every rank takes part (FSDP gathers the shards; every rank's RNG is kept), rank 0 writes the usual
    # single-process files, atomically; the others wait for it, so none runs ahead of a failed write.
    model_state, ema_state = full_model_state(run.model, par), full_model_state(run.ema, par)
    optimizer_state = full_optimizer_state(run.model, run.optimizer, par)
    extra["rng_ranks"] = par.gather_objects(ckpt_io.rng_state())
    final = run_dir / "checkpoints" / f"step_{step:07d}"
    if par.is_main:
        final = ckpt_io.save_checkpoint(run_dir, step, model_state, ema_state, optimizer_state, extra, full_config,
                                        keep_last=keep)
    par.barrier()
    return final


class _NoLog:
    """The log of ranks other than 0: only rank 0 writes log.jsonl and TensorBoard."""

    def scalars(self, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _signal_number() -> int:
    import signal

    return int(signal.SIGTERM)


def _stop_message(signal_name: str, step: int, trained: bool, saved_step: int, saved: Optional[Path],
                  bad_in_a_row: int) -> str:
    if not trained:
        return (f"stopped by {signal_name} before training a step; nothing new to save (newest checkpoint: "
                f"{saved or 'none'})")
    if saved_step == step:
        return f"stopped by {signal_name} at step {step}; checkpoint: {saved}; run the same command to resume"
    return (f"stopped by {signal_name} at step {step}; its last {bad_in_a_row} steps were not finite, so no "
            f"checkpoint was written for it; the newest is {saved or 'none'}")


def _seconds_since(t0: float, device: torch.device) -> float:
    """Wall seconds since ``t0`` once the device has finished its queued work (a checkpoint syncs anyway)."""
    from maskfit.bench import sync_device

    sync_device(device)
    return round(time.perf_counter() - t0, 3)


def _start_measure(device: torch.device, step: int, window: RateWindow) -> dict:
    from maskfit.bench import sync_device

    sync_device(device)
    window.settle()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"t": time.perf_counter(), "step": step, "compile": compile_stats()[1], **window.totals}


def _end_measure(device: torch.device, mark: dict, step: int, window: RateWindow) -> dict:
    from maskfit.bench import sync_device

    sync_device(device)
    window.settle()
    end = time.perf_counter()
    seconds = end - mark["t"]
    steps = step - mark["step"]
    images, tokens, flops, wait, host, gpu_ms, gpu_steps = (window.totals[k] - mark[k] for k in RateWindow.COUNTERS)
    return {
        "ms_per_step": round(1000 * seconds / max(steps, 1), 2),
        "gpu_ms_per_step": round(gpu_ms / gpu_steps, 2) if gpu_steps else None,
        "steps": steps, "seconds": seconds, "window_start": mark["t"], "window_end": end,
        "images_per_s": images / max(seconds, 1e-9),
        "tokens_per_s": tokens / max(seconds, 1e-9), "flops": flops,
        "loader_wait_fraction": round(wait / max(seconds, 1e-9), 3),
        "host_step_fraction": round(host / max(seconds, 1e-9), 3),
        "compile_seconds_in_window": round(compile_stats()[1] - mark["compile"], 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def training_loss(
    forward, diffusion, batch: TokenBatch, y: Tensor, aux_weight: float, generator, aux_target: str = "noisy_input"
):
    """The diffusion loss of one batch, masked or not (maskfit.objective says which tokens count).

    aux_target: the DDPM target on dropped tokens of a full-grid design (mask.aux_target); the flow
    objective keeps its velocity target there (sound: maskfit.objective).
    """
    from maskfit.diffusion.gaussian import GaussianDiffusion
    from maskfit.objective import dropped_tokens, token_weights

    model = unwrap(forward)  # torch.compile and DDP wrap the module
    mask, layout = batch.mask, batch.layout
    if mask is not None and model.cfg.mask_design == "plain":
        # Plain dropping is the unmasked model on a stream of the kept tokens (their true positions,
        # attention restricted to them): noise, loss and every layer touch kept tokens only.
        kept_tokens = batch.tokens[mask.index]  # (T_k, D)
        return diffusion.training_loss(forward, kept_tokens, y, mask.layout, generator=generator)
    predicts_dropped = mask is not None and model.predicts_dropped_tokens()
    weights = token_weights(layout, mask, aux_weight, predicts_dropped)
    aux = {}
    if predicts_dropped and isinstance(diffusion, GaussianDiffusion):
        # ε has conditional mean 0 on tokens the model never saw: fit those to aux_target instead.
        aux = {"aux_tokens": dropped_tokens(layout, mask), "aux_target": aux_target}

    def model_fn(x, t, labels, _layout):
        return forward(x, t, labels, layout, mask=mask)  # (T, D_out); zeros where nothing was predicted

    return diffusion.training_loss(
        model_fn, batch.tokens, y, layout, generator=generator, token_weights=weights, **aux
    )


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)
