"""`maskfit bench`: training-step throughput, MFU and peak memory, measured the same way every time.

Workload (reference/measured.md): random latents shaped like ImageNet under FiT's pipeline: aspect
ratios 1:1 30 %, 4:3 35 %, 3:4 15 %, 16:9 10 %, 1:2 5 %, 2:1 5 %, each resized to fit the token budget
(256 tokens at patch 2 on an f8 autoencoder), one full training step (forward, backward, AdamW) under
bf16 autocast. Modes:

- ``padded``: FiT's layout through our code: every image padded to the batch's longest (FiT truncates
  to max n_b), FiT's validity mask in SDPA, every linear layer pays for the padding;
- ``packed``: the same images concatenated with no padding (varlen attention);
- ``keepR``: packed, and the backbone sees a uniform random fraction R of each image's tokens
  (``keep0.5`` = 50 % masking), with the model design given by ``--designs``;
- ``countK``: every image keeps exactly K tokens (equal lengths: dense Flash attention, no varlen).

One batch layout is drawn per mode and reused for every timed step (steady state, static shapes);
training itself pads each stream to a constant budget for the same reason. Useful FLOPs count only
real (kept) tokens with :func:`maskfit.models.transformer.flops_per_image`; MFU divides the achieved
useful FLOP/s by the device's dense bf16 peak (989 TFLOP/s for an H100 SXM, as measured.md).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import maskfit.models.swiglu_backward as swiglu_backward
from maskfit.throughput import design_flops, peak_tflops  # noqa: F401 (bench's public names)

ASPECT_MIX = [((1, 1), 0.30), ((4, 3), 0.35), ((3, 4), 0.15), ((16, 9), 0.10), ((1, 2), 0.05), ((2, 1), 0.05)]


def imagenet_like_grids(num_images: int, token_budget: int = 256, patch_px: int = 16, seed: int = 0):
    """Token grids (h, w) of images drawn from ASPECT_MIX (width:height) and resized by FiT's rule."""
    from maskfit.data.resize import fit_to_token_budget

    rng = np.random.default_rng(seed)
    ratios, probs = zip(*ASPECT_MIX)
    grids = []
    for i in rng.choice(len(ratios), size=num_images, p=probs):
        rw, rh = ratios[i]
        height = int(rng.integers(300, 600))  # ImageNet-like source sizes, all above the budget
        width = int(round(height * rw / rh))
        w, h = fit_to_token_budget(width, height, token_budget, patch_px)
        grids.append((h // patch_px, w // patch_px))
    return grids


@dataclass
class BenchResult:
    mode: str
    design: str
    model: str
    params_m: float
    batch: int
    attention: str
    compiled: bool
    tokens_real: int
    tokens_backbone: int
    ms_per_step: float
    images_per_s: float
    peak_mem_gib: float
    useful_tflops: float
    mfu: Optional[float]
    loss: float
    # SwiGLU's backward in this row (maskfit.models.swiglu_backward: "triton" acts in compiled CUDA steps only);
    # None for the published code's rows
    swiglu_backward: Optional[str] = None


def build_batch(grids, mode: str, token_dim: int, seed: int, device):
    from maskfit.masking import uniform_random
    from maskfit.tokens import masked_view, pack, to_padded

    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(h * w, token_dim, generator=g) for h, w in grids]
    labels = torch.randint(0, 1000, (len(grids),), generator=g)
    budget_len = max(h * w for h, w in grids)
    batch = pack(tokens, grids, labels, max_seqlen=256)
    if mode == "padded":
        return to_padded(batch, seq_len=budget_len).to(device)
    if mode == "packed":
        return batch.to(device)
    if mode.startswith("keep"):
        ratio = float(mode[4:])
        keep = [uniform_random((h, w), max(1, round(h * w * ratio)), g) for h, w in grids]
    elif mode.startswith("count"):
        k = int(mode[5:])
        keep = [uniform_random((h, w), min(k, h * w), g) for h, w in grids]
    else:
        raise ValueError(f"unknown bench mode {mode!r}; use padded, packed, keepR (e.g. keep0.5) or countK")
    view = masked_view(batch.layout, keep, max_seqlen=256)
    from maskfit.tokens import TokenBatch

    return TokenBatch(batch.tokens, batch.y, batch.layout, mask=view).to(device)


def sync_device(dev: torch.device) -> None:
    """Wait for queued GPU work, so a host clock reading covers it (no-op off CUDA)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_steps(step, warmup: int, steps: int, dev: torch.device, profile_label: Optional[str] = None):
    """Run `warmup` untimed then `steps` timed calls of `step()`; return (seconds, peak GiB, last loss).

    Peak memory is the allocator's high-water mark over the timed steps only (NaN off CUDA); with
    `profile_label` three extra steps are profiled and the top kernels printed before timing.
    """
    loss = None
    for _ in range(warmup):
        loss = step()
    sync_device(dev)
    if profile_label is not None:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync_device(dev)
        # Self time: each kernel's own, so the table names the kernels that cost (a total would put every
        # module's wrapper first).
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(f"--- profile {profile_label} (3 steps) ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=100))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync_device(dev)
    elapsed = time.perf_counter() - t0
    peak_mem = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else float("nan")
    return elapsed, peak_mem, loss


def bench_train_step(
    preset: str, mode: str, design: str = "plain", batch_size: int = 256, attention: str = "varlen",
    compile: bool = True, steps: int = 20, warmup: int = 5, seed: int = 0, device: str = "cuda",
    profile: bool = False, compile_mode: Optional[str] = None, design_overrides: Optional[dict] = None,
) -> BenchResult:
    from maskfit.config import config_from_dict
    from maskfit.models.transformer import FiT, count_parameters, model_config
    from maskfit.runs import build_diffusion
    from maskfit.train import training_loss

    dev = torch.device(device)
    overrides = {"attention": attention if mode != "padded" else "dense", "mask_design": design}
    overrides.update(design_overrides or {})
    cfg = model_config(preset, **overrides)
    torch.manual_seed(seed)
    model = FiT(cfg).to(dev)
    objective = "ddpm" if cfg.learn_sigma else "flow"
    diffusion = build_diffusion(config_from_dict({"diffusion": {"objective": objective}}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    if compile:
        # Each row compiles from scratch: otherwise Dynamo sees the earlier rows' shapes, recompiles this one
        # with dynamic shapes (and past its recompile limit would fall back to eager).
        torch._dynamo.reset()
    forward = torch.compile(model, mode=compile_mode) if compile else model
    grids = imagenet_like_grids(batch_size, seed=seed)
    batch = build_batch(grids, mode, cfg.token_dim, seed, dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss, _ = training_loss(forward, diffusion, batch, batch.y, 0.1, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    elapsed, peak_mem, loss = time_steps(step, warmup, steps, dev, profile_label=f"{preset} {mode} {design}" if profile else None)
    n_full = [h * w for h, w in grids]
    if batch.mask is not None:
        kept = batch.mask.layout.seqlens().cpu().tolist()
    else:
        kept = n_full
    useful = sum(design_flops(cfg, nf, nk) for nf, nk in zip(n_full, kept))
    ms = 1000 * elapsed / steps
    tflops = useful / (elapsed / steps) / 1e12
    peak = peak_tflops(dev)
    return BenchResult(
        mode=mode, design=design, model=preset, params_m=count_parameters(model) / 1e6, batch=batch_size,
        attention=overrides["attention"], compiled=compile, tokens_real=sum(n_full), tokens_backbone=sum(kept),
        ms_per_step=round(ms, 2), images_per_s=round(batch_size / (elapsed / steps), 1),
        peak_mem_gib=peak_mem,
        useful_tflops=round(tflops, 1), mfu=None if peak is None else round(tflops / peak, 3),
        loss=float(loss.detach()),
        swiglu_backward=swiglu_backward.BACKWARD if compile and dev.type == "cuda" else "autograd",
    )


@dataclass
class SamplingBenchResult:
    model: str
    layout: str  # "packed" (mixed resolutions per stream) | "per-resolution" (one resolution per batch)
    num_images: int
    batch: int
    sampler: str
    steps: int
    cfg_scale: float
    precision: str  # the network's forward ("bf16" autocast | "fp32"); the sampler is fp32 either way
    attention: str
    compiled: bool
    seconds: float
    images_per_s: float


def bench_sampling(
    preset: str = "FiTv2-B/2", num_images: int = 512, batch: int = 128, steps: int = 50, cfg_scale: float = 1.5,
    packed: bool = True, attention: str = "auto", compile: bool = False, device: str = "cuda", seed: int = 0,
    precision: str = "auto",
) -> SamplingBenchResult:
    """Images/s of sampling (Euler, CFG) at FiT's ImageNet-like resolution mix, one layout per batch.

    What is timed is what `maskfit sample` runs: ``sample_tokens`` with the precision and attention backend
    resolved by the same functions (``resolve_precision``, ``sampling_attention``: bf16 autocast and varlen on
    CUDA by default), eager unless ``compile`` (the command does not compile), and the same clock
    (``SamplingClock``: drawing only, no decoding), so this figure and the ``throughput`` that `maskfit sample
    --distribution imagenet` prints compare directly.

    packed: each batch holds images of every resolution in one stream (per-image RoPE and varlen
    attention); otherwise images are grouped by resolution and each batch holds one resolution.
    The model's weights are random (the cost does not depend on them). Every batch layout is run once
    with one step before the clock starts, so start-up (and compilation, if any) is not timed.
    """
    from maskfit.config import config_from_dict
    from maskfit.models.transformer import FiT, model_config
    from maskfit.sample import SamplerOptions, sample_tokens
    from maskfit.sampling_run import SamplingClock, resolve_precision, sampling_attention
    from maskfit.runs import build_diffusion

    dev = torch.device(device)
    precision = resolve_precision(precision, dev)
    cfg = model_config(preset, attention=sampling_attention(attention, dev, precision))
    model = FiT(cfg).to(dev).eval().requires_grad_(False)  # as load_model_from_checkpoint leaves it
    objective = "ddpm" if cfg.learn_sigma else "flow"
    diffusion = build_diffusion(config_from_dict({"diffusion": {"objective": objective}}))
    if compile:
        from maskfit.sampling_run import compile_for_sampling

        torch._dynamo.reset()  # no shapes remembered from earlier rows (see bench_train_step)
        compile_for_sampling(model)  # as `maskfit sample --compile`
    grids = imagenet_like_grids(num_images, seed=seed)
    if not packed:
        grids = sorted(grids)  # group equal resolutions
    batches = []
    i = 0
    while i < len(grids):
        chunk = grids[i : i + batch]
        if not packed:  # one resolution per batch
            chunk = [g for g in chunk if g == chunk[0]]
        batches.append(chunk)
        i += len(chunk)
    options = SamplerOptions(method="euler" if objective == "flow" else "ddim", steps=steps, cfg_scale=cfg_scale,
                             precision=precision)
    generator = torch.Generator(device=dev).manual_seed(seed)
    one_step = replace(options, steps=1)
    for chunk in batches:  # warm-up: every batch layout once, so the timing below excludes start-up
        sample_tokens(model, diffusion, chunk, torch.zeros(len(chunk), dtype=torch.long), one_step, generator, dev)
    clock = SamplingClock()
    for chunk in batches:
        labels = torch.randint(0, cfg.num_classes, (len(chunk),))
        clock.draw(lambda: sample_tokens(model, diffusion, chunk, labels, options, generator, dev), len(chunk), dev)
    return SamplingBenchResult(
        preset, "packed" if packed else "per-resolution", num_images, batch, options.method, steps, cfg_scale,
        precision, cfg.attention, compile, round(clock.seconds, 2), round(num_images / clock.seconds, 1),
    )


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", default=None, metavar="CONFIG",
                   help="time the real `maskfit train` path of a run config (loader, masks, packing) beside the "
                        "synthetic-layout step of the same model and mode (maskfit.bench_data); repeatable")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--data: override a config value, as `maskfit train --set`")
    p.add_argument("--write-random-cache", default=None, metavar="DIR",
                   help="write a latent cache of random latents at ImageNet-like sizes (--num-images of them) "
                        "to DIR and exit: the latent-cache path without autoencoder weights")
    p.add_argument("--sampling", action="store_true",
                   help="benchmark sampling instead of training: packed mixed resolutions vs one per batch")
    p.add_argument("--num-images", type=int, default=512, help="--sampling: images per layout")
    p.add_argument("--sample-steps", type=int, default=50, help="--sampling: Euler steps")
    p.add_argument("--sample-compile", action="store_true",
                   help="--sampling: compile the network as `maskfit sample --compile` does")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="--sampling: guidance scale")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="--sampling: the network's precision, as `maskfit sample --precision` (auto = bf16 on CUDA)")
    p.add_argument("--models", default="FiT-B/2-dit", help="comma list of presets")
    p.add_argument("--modes", default="padded,packed,keep0.75,keep0.5,keep0.25")
    p.add_argument("--designs", default="plain", help="comma list: plain,decoder,mixer,side_interp (masked modes)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--attention", default=None,
                   help="varlen | flex | dense (padded mode always dense); default varlen, and for --sampling auto "
                        "(as `maskfit sample`: varlen on CUDA in bf16)")
    p.add_argument("--no-compile", action="store_true",
                   help="training rows only: --sampling always runs eager, as `maskfit sample` does")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--profile", action="store_true",
                   help="print the top kernels of 3 profiled steps; with --data: where the real row's main thread "
                        "spent its timed window, from samples of its Python stack (maskfit.hostprofile)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--decoder-depth", type=int, default=None, help="decoder blocks (design 'decoder')")
    p.add_argument("--mixer-depth", type=int, default=None, help="patch-mixer blocks (design 'mixer')")
    p.add_argument("--published-fit", default=None, metavar="PATH",
                   help="also time the published FiT code (a checkout of github.com/whlzy/FiT at PATH) on the "
                        "same workload, one row per model before ours (maskfit.bench_published)")


def run_bench(args) -> int:
    from maskfit.paths import check_output_dir, check_output_file

    if args.out:
        check_output_file(args.out, "--out", "JSON-lines file")  # before any row is timed
    if getattr(args, "write_random_cache", None):
        check_output_dir(args.write_random_cache, "--write-random-cache", "latent-cache folder")
    results = []

    def record(r) -> None:  # print one JSON line, append it to --out (rank 0 only under torchrun)
        results.append(r)
        if os.environ.get("RANK", "0") != "0":
            return
        line = json.dumps(asdict(r))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    if getattr(args, "write_random_cache", None):
        from maskfit.bench_data import write_random_latent_cache

        print(write_random_latent_cache(Path(args.write_random_cache), args.num_images))
        return 0
    if getattr(args, "data", None):
        from maskfit.bench_data import bench_config
        from maskfit.config import load_config

        for path in args.data:
            for row in bench_config(load_config(path, args.set), Path(path).name, args.steps, args.warmup,
                                    host_profile=args.profile):
                record(row)
        return 0
    if args.sampling:
        for preset in args.models.split(","):
            for packed in (True, False):
                record(bench_sampling(preset, args.num_images, args.batch, args.sample_steps, args.cfg_scale, packed,
                                      args.attention or "auto", compile=args.sample_compile, device=args.device,
                                      precision=args.precision))
        return 0
    for preset in args.models.split(","):
        if args.published_fit:
            from maskfit.bench_published import bench_published_train_step

            record(bench_published_train_step(Path(args.published_fit), preset, args.batch, args.steps, args.warmup,
                                              device=args.device))
        for mode in [m for m in args.modes.split(",") if m]:
            designs = args.designs.split(",") if mode not in ("padded", "packed") else ["plain"]
            for design in designs:
                r = bench_train_step(
                    preset, mode, design, args.batch, args.attention or "varlen", not args.no_compile, args.steps,
                    args.warmup, device=args.device, profile=args.profile,
                    compile_mode=args.compile_mode,
                    design_overrides={k: v for k, v in (("decoder_depth", args.decoder_depth),
                                                        ("mixer_depth", args.mixer_depth)) if v is not None},
                )
                record(r)
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(markdown_table(results))
    return 0


def markdown_table(results) -> str:
    head = "| model | mode | design | attention | images/s | ms/step | peak GiB | useful TFLOP/s | MFU |\n|---|---|---|---|---|---|---|---|---|"
    rows = [
        f"| {r.model} ({r.params_m:.1f}M) | {r.mode} | {r.design} | {r.attention} | {r.images_per_s:,.0f} | "
        f"{r.ms_per_step:.1f} | {r.peak_mem_gib:.1f} | {r.useful_tflops:.0f} | "
        f"{'' if r.mfu is None else f'{100 * r.mfu:.1f} %'} |"
        for r in results
    ]
    return "\n".join([head] + rows)
