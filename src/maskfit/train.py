"""One training loop for every path (padded FiT, packed, masked-and-packed), single device.

bf16 autocast on GPU and fp32 on CPU, AdamW, EMA, gradient clipping, tqdm, TensorBoard scalars, atomic
checkpoints and exact resume (model, EMA, optimizer, data order, RNG).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from maskfit import checkpoint as ckpt_io
from maskfit.config import RunConfig, save_config, to_dict
from maskfit.diffusion.guidance import drop_labels
from maskfit.finetune import prepare_model
from maskfit.models.transformer import FiT, ModelConfig, count_parameters, model_config
from maskfit.tokens import TokenBatch


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(name)


def check_attention_device(attention: str, device: torch.device, fix: str) -> None:
    """varlen_attn is FlashAttention (CUDA only): fail before the first step, naming the fix."""
    if attention == "varlen" and device.type != "cuda":
        raise ValueError(f"attention 'varlen' needs a CUDA device (FlashAttention has no {device.type} kernel); {fix}")


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on GPU ('auto'), fp32 on CPU: CPU bf16 is slow and tests compare fp32 values."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_patch_size(cfg: RunConfig) -> int:
    """The patch size a run's model will have (its preset's, unless overridden): the data needs it first."""
    return cfg.model.overrides.get("patch_size", model_config(cfg.model.preset).patch_size)


def resolved_model_config(cfg: RunConfig, data_channels: int) -> ModelConfig:
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("in_channels", data_channels)
    overrides["attention"] = cfg.model.attention
    m = cfg.mask
    overrides.update(
        mask_design=m.design, decoder_depth=m.decoder_depth, decoder_hidden=m.decoder_hidden,
        decoder_heads=m.decoder_heads, mixer_depth=m.mixer_depth, side_decode_depth=m.side_decode_depth,
    )
    mcfg = model_config(cfg.model.preset, **overrides)
    objective = cfg.diffusion.objective
    if objective == "ddpm" and not mcfg.learn_sigma:
        raise ValueError(
            f"diffusion.objective='ddpm' trains FiT v1's learned variance but model {cfg.model.preset} has "
            "learn_sigma=False; use a FiT (v1) preset or set model.overrides.learn_sigma=true"
        )
    if objective == "flow" and mcfg.learn_sigma:
        raise ValueError(
            f"diffusion.objective='flow' predicts a velocity but model {cfg.model.preset} has learn_sigma=True; "
            "use a FiTv2 preset or set model.overrides.learn_sigma=false"
        )
    return mcfg


def build_diffusion(cfg: RunConfig):
    d = cfg.diffusion
    if d.objective == "ddpm":
        from maskfit.diffusion.gaussian import GaussianDiffusion, GaussianDiffusionConfig

        return GaussianDiffusion(
            GaussianDiffusionConfig(num_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
        )
    from maskfit.diffusion.flow import FlowConfig, RectifiedFlow

    return RectifiedFlow(FlowConfig(t_sampling=d.t_sampling))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema = decay*ema + (1-decay)*p


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
# The loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float]
    images_per_s: float
    num_params: int


def train(
    cfg: RunConfig,
    resume: bool = True,
    progress: bool = True,
    stop_after: Optional[int] = None,
    max_seconds: Optional[float] = None,
) -> TrainResult:
    """Train (or resume) the run described by ``cfg`` in ``cfg.train.out_dir``.

    stop_after: stop after this many optimiser steps in this call (tests use it to simulate a crash).
    max_seconds: stop after this much wall-clock time (the CPU demo); a checkpoint is written at the stop.
    """
    from maskfit.data.pipeline import build_training_data

    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    check_attention_device(cfg.model.attention, device, "set model.attention='dense' to train on the CPU")
    run_dir = Path(tcfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tcfg.seed)

    data = build_training_data(cfg, run_patch_size(cfg))
    mcfg = resolved_model_config(cfg, data.channels)
    model = FiT(mcfg).to(device)
    # [finetune]: base weights (fresh starts only), training RoPE, frozen weights; before the EMA copies the model.
    trainable = prepare_model(model, cfg, resuming=resume and ckpt_io.latest_checkpoint(run_dir) is not None)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = build_diffusion(cfg)
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda",
    )
    generator = torch.Generator(device=device).manual_seed(tcfg.seed + 1)  # t, noise and label dropout

    step = 0
    latest = ckpt_io.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        ckpt_io.load_weights(model, latest / "model.safetensors")
        ckpt_io.load_weights(ema, latest / "ema.safetensors")
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", map_location=device, weights_only=False))
        state = ckpt_io.load_state(latest)
        step = state["step"]
        ckpt_io.set_rng_state(state["rng"])
        generator.set_state(state["generator"].to(generator.get_state().device))
        data.load_state_dict(state["data"])
    full_config = to_dict(cfg)
    full_config["resolved_model"] = to_dict(mcfg)
    save_config(cfg, run_dir / "config.json")

    forward = torch.compile(model) if tcfg.compile else model
    log = TensorBoardLog(run_dir)
    losses: list[float] = []
    last_step = tcfg.steps if stop_after is None else min(tcfg.steps, step + stop_after)
    bar = _progress(step, None if max_seconds is not None else tcfg.steps, progress)
    images_seen, t0 = 0, time.perf_counter()
    running = torch.zeros((), device=device)  # sum of the losses since the last log line ...
    since_log = 0  # ... over this many steps (0 at every start: a resume need not begin on a log boundary)
    model.train()
    while step < last_step:
        cpu_batch: TokenBatch = data.next_batch(step)
        # Real images of this step, counted on the host before the copy (token batching adds a dummy
        # padding segment that is no image).
        num_images = len(data.last_plan.indices) if data.last_plan is not None else cpu_batch.layout.num_images
        batch = cpu_batch.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps)
        y = drop_labels(batch.y, cfg.diffusion.label_dropout, mcfg.num_classes, generator=generator)
        with autocast_for(tcfg.precision, device):
            loss, terms = training_loss(forward, diffusion, batch, y, cfg.mask.aux_loss_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        update_ema(ema, model, cfg.optim.ema_decay)
        step += 1
        images_seen += num_images
        running += loss.detach()
        since_log += 1
        bar.update(1)
        out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        if step % tcfg.log_every == 0 or step == last_step or out_of_time:
            # One host sync every log_every steps, never inside the step.
            mean_loss = float(running) / since_log
            running.zero_()
            since_log = 0
            losses.append(mean_loss)
            elapsed = time.perf_counter() - t0
            values = {
                "loss": mean_loss, "grad_norm": float(grad_norm), "images_per_s": images_seen / max(elapsed, 1e-9),
                "padding_fraction": data.padding_fraction(), "lr": optimizer.param_groups[0]["lr"],
            }
            values.update({f"loss/{k}": float(v) for k, v in terms.items()})
            log.scalars(step, values)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if step % tcfg.ckpt_every == 0 or step == tcfg.steps or out_of_time:
            extra = {"generator": generator.get_state(), "data": data.state_dict()}
            ckpt_io.save_checkpoint(run_dir, step, model, ema, optimizer, extra, full_config)
        if out_of_time:
            break
    bar.close()
    log.close()
    elapsed = time.perf_counter() - t0
    return TrainResult(run_dir, step, losses, images_seen / max(elapsed, 1e-9), count_parameters(model))


def training_loss(forward, diffusion, batch: TokenBatch, y: Tensor, aux_weight: float, generator):
    """The diffusion loss of one batch, masked or not (maskfit.objective says which tokens count)."""
    from maskfit.objective import token_weights

    model = getattr(forward, "_orig_mod", forward)  # torch.compile wraps the module
    mask, layout = batch.mask, batch.layout
    if mask is not None and model.cfg.mask_design == "plain":
        # Plain dropping is the unmasked model on a stream of the kept tokens (their true positions,
        # attention restricted to them): noise, loss and every layer touch kept tokens only.
        kept_tokens = batch.tokens[mask.index]  # (T_k, D)
        return diffusion.training_loss(forward, kept_tokens, y, mask.layout, generator=generator)
    weights = token_weights(layout, mask, aux_weight, model.predicts_dropped_tokens())

    def model_fn(x, t, labels, _layout):
        return forward(x, t, labels, layout, mask=mask)  # (T, D_out); zeros where nothing was predicted

    return diffusion.training_loss(model_fn, batch.tokens, y, layout, generator=generator, token_weights=weights)


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)


def load_model_from_checkpoint(
    path: Path, use_ema: bool = True, device: Optional[torch.device] = None, attention: Optional[str] = None
):
    """(model, run config) from a checkpoint folder or a run folder.

    attention: the backend to run with instead of the one the run trained with (same math: a varlen-trained
    model samples on a CPU with "dense").
    """
    from maskfit.config import config_from_dict

    ckpt = ckpt_io.resolve_checkpoint(path)
    raw = ckpt_io.load_config_of(ckpt)
    resolved = raw.pop("resolved_model")
    run_cfg = config_from_dict(raw)
    if attention is not None:
        resolved["attention"] = attention
    mcfg = ModelConfig(**resolved)
    model = FiT(mcfg)
    ckpt_io.load_weights(model, ckpt / ("ema.safetensors" if use_ema else "model.safetensors"))
    model.eval().requires_grad_(False)
    return model.to(device or torch.device("cpu")), run_cfg
