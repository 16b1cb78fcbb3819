"""`maskfit bench --data CONFIG`: the real training path beside the synthetic-layout step, one command.

Two rows per config, same model, same mode, same process:

- ``synthetic``: the first few batches the run's loader builds (steps 0..K-1), moved to the GPU once,
  then :func:`maskfit.train.train_step` cycled over them: the steady-state step with no loader, which
  is what ``maskfit bench`` measures on its own workload.
- ``real``: :func:`maskfit.train.train` itself (the loop ``maskfit train`` runs: workers building batches
  and masks, pinned copies, logging), timed after ``warmup`` steps with the device synced at both ends.

``real / synthetic`` is the share of the benchmarked speed that training actually gets; below 1 the
difference is the loader, host work or recompilation (each row reports torch.compile's graphs and the
compile seconds that fell inside its timed window).

:func:`write_random_latent_cache` makes a latent cache of random latents shaped like ImageNet under
FiT's pipeline (the sizes of :func:`maskfit.bench.imagenet_like_grids`), in the format ``maskfit
prepare`` writes, so the latent-cache path can be timed where no autoencoder weights exist.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


@dataclass
class DataBenchResult:
    config: str
    path: str  # "synthetic" | "loader" | "real"
    model: str
    params_m: float
    batching: str
    keep_ratio: float
    design: str
    num_workers: int
    steps: int
    images_per_s: float
    tokens_per_s: float  # backbone tokens (kept tokens when masked), padding excluded
    mfu: Optional[float]
    peak_mem_gib: Optional[float]
    compile_graphs: int
    compile_seconds: float  # compilation inside the timed window (real) / in total (synthetic, before timing)
    real_over_synthetic: Optional[float] = None
    world_size: int = 1  # ranks of the run (torchrun); images_per_s counts every rank's images
    images_per_s_per_gpu: Optional[float] = None
    # real row: shares of the timed window the main process spent waiting for batches and running train_step on
    # the host (maskfit.train.RateWindow says how to read them)
    loader_wait_fraction: Optional[float] = None
    host_step_fraction: Optional[float] = None
    ms_per_step: Optional[float] = None  # wall time per step (synthetic, real)
    gpu_ms_per_step: Optional[float] = None  # real row on CUDA: each step's time on the GPU (RateWindow)
    # real row with host_profile: the main thread's timed window by innermost frame and by innermost maskfit
    # frame, label -> share of the samples (maskfit.hostprofile; the ten largest of each)
    host_profile: Optional[dict] = None


def bench_config(cfg, name: str, steps: int = 30, warmup: int = 10, distinct_batches: int = 4,
                 host_profile: bool = False):
    """(synthetic, loader, real) rows for a run config; the real row's ratio is real / synthetic images/s.

    The loader row runs the run's loader alone (batches built by the workers and copied to the device,
    no model): the rate at which data can arrive, whatever the model. Under torchrun with several ranks
    only the real row is measured (the other two are one process's and equal to a one-GPU run's), with
    images/s over every rank and per GPU (scaling: per-GPU rate at N GPUs / the one-GPU rate).

    host_profile: sample the main thread's stack through the real row and report its timed window
    (:class:`maskfit.hostprofile.StackSampler`), printed and in the row's ``host_profile``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from maskfit.bench import sync_device
    from maskfit.data.pipeline import build_training_data
    from maskfit.throughput import peak_tflops
    from maskfit.runs import resolve_device, run_patch_size

    with tempfile.TemporaryDirectory(prefix="maskfit_bench_") as tmp:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, out_dir=str(Path(tmp) / "run"), log_every=10**9, ckpt_every=10**9,
            steps=max(cfg.train.steps, warmup + steps + 1), max_images=None, max_seconds=None,
        ))
        common = dict(
            config=name, model=cfg.model.preset, batching=cfg.data.batching,
            keep_ratio=cfg.mask.keep_ratio, design=cfg.mask.design, num_workers=cfg.data.num_workers, steps=steps,
        )

        dev = resolve_device(cfg.train.device)
        peak = peak_tflops(dev)
        if world > 1:
            return (_bench_real(cfg, common, steps, warmup, peak, world, host_profile),)

        # --- synthetic: a few real batches, on the GPU once, cycled (its memory is freed on return)
        synthetic = _bench_synthetic(cfg, common, steps, warmup, distinct_batches)
        _free_memory()

        # --- loader: the same loader alone (batches built, copied to the device, nothing trained): its top rate
        data = build_training_data(cfg, run_patch_size(cfg))
        # Drain what the workers prefetched while starting (2 batches each) before the clock starts: the
        # window then times batches made while it runs, not a full queue.
        drain = max(warmup, 2 * cfg.data.num_workers + 2)
        for s in range(drain):
            data.next_device_batch(s, dev)
        sync_device(dev)
        # At least four times the batches the workers hold in flight (2 each): batches begun during the drain
        # then make a small part of the window, which otherwise could overstate the workers' steady rate.
        loader_steps = max(steps, 8 * cfg.data.num_workers)
        t0, images = time.perf_counter(), 0
        for s in range(drain, drain + loader_steps):
            data.next_device_batch(s, dev)
            images += data.last_info.num_images
        sync_device(dev)
        seconds = time.perf_counter() - t0
        loader = DataBenchResult(
            path="loader", params_m=synthetic.params_m, images_per_s=round(images / seconds, 1),
            tokens_per_s=0.0, mfu=None, peak_mem_gib=None, compile_graphs=0, compile_seconds=0.0,
            **{**common, "steps": loader_steps},
        )
        del data

        # --- real: the training loop itself
        real = _bench_real(cfg, common, steps, warmup, peak, world, host_profile)
        real.real_over_synthetic = round(real.images_per_s / synthetic.images_per_s, 3)
        _free_memory()
        return synthetic, loader, real


def _bench_real(cfg, common: dict, steps: int, warmup: int, peak, world: int,
                host_profile: bool = False) -> "DataBenchResult":
    """The real row: ``maskfit train``'s loop (:func:`maskfit.train.train`) timed after ``warmup`` steps.

    The loop's window counts this rank's images (rank 0 under torchrun): that is the per-GPU rate; the
    total is it times the ranks (image batching gives every rank the same images per step; under token
    batching the ranks' counts differ by a few images).
    """
    from maskfit.hostprofile import StackSampler
    from maskfit.train import train

    torch._dynamo.reset()
    sampler = StackSampler() if host_profile else None
    with sampler or contextlib.nullcontext():
        result = train(cfg, resume=False, progress=False, stop_after=warmup + steps, measure_after=warmup)
    m = result.measured
    profile = None
    if sampler is not None:
        try:
            found = sampler.profile(m["window_start"], m["window_end"])
        except ValueError as exc:  # a window shorter than the sampling interval: say so, keep the row
            print(f"host profile: {exc} (the window was {m['seconds'] * 1000:.0f} ms; raise --steps)", flush=True)
        else:
            print("\n".join(found.lines()), flush=True)
            profile = {"samples": found.samples, "innermost": dict(list(found.innermost.items())[:10]),
                       "maskfit": dict(list(found.maskfit.items())[:10]),
                       "threads": {name: dict(list(sh.items())[:5]) for name, sh in found.threads.items()}}
    per_gpu = m["images_per_s"]
    return DataBenchResult(
        path="real", params_m=round(result.num_params / 1e6, 1), images_per_s=round(per_gpu * world, 1),
        tokens_per_s=round(m["tokens_per_s"] * world, 1),
        mfu=None if peak is None else round(m["flops"] / m["seconds"] / 1e12 / peak, 3),
        peak_mem_gib=m["peak_mem_gib"], compile_graphs=result.compile_graphs,
        compile_seconds=m["compile_seconds_in_window"], world_size=world,
        images_per_s_per_gpu=round(per_gpu, 1), loader_wait_fraction=m["loader_wait_fraction"],
        host_step_fraction=m["host_step_fraction"], ms_per_step=m["ms_per_step"],
        gpu_ms_per_step=m["gpu_ms_per_step"], host_profile=profile, **common,
    )


def _bench_synthetic(cfg, common: dict, steps: int, warmup: int, distinct_batches: int) -> "DataBenchResult":
    """The synthetic row: the run's first ``distinct_batches`` batches, on the device once, cycled through
    ``train_step`` (the steady-state step without the loader)."""
    from maskfit.bench import sync_device, time_steps
    from maskfit.data.pipeline import build_training_data, stream_length_varies
    from maskfit.throughput import FlopModel, TokenSums, compile_stats, peak_tflops
    from maskfit.runs import run_patch_size
    from maskfit.models.transformer import count_parameters
    from maskfit.runs import build_training_run
    from maskfit.train import train_step

    torch._dynamo.reset()
    data = build_training_data(cfg, run_patch_size(cfg))
    run = build_training_run(cfg, data.channels, dynamic_stream=stream_length_varies(cfg, data.mask))
    batches, infos = [], []
    for s in range(distinct_batches):
        batches.append(data.next_device_batch(s, run.device))
        infos.append(data.last_info)
    del data  # stops its workers
    flop_model = FlopModel.of(run.mcfg)
    counter = {"i": 0}

    def step():
        i = counter["i"]
        counter["i"] += 1
        loss, _, _ = train_step(run, batches[i % distinct_batches], i)
        return loss

    for _ in range(distinct_batches):  # compile every layout before timing
        step()
    sync_device(run.device)
    graphs, compile_s = compile_stats()
    counter["i"] = 0  # the timed window starts at batch 0, so its batches are known
    elapsed, peak_mem, _ = time_steps(step, warmup, steps, run.device)
    window = [infos[(warmup + k) % distinct_batches] for k in range(steps)]
    sums = sum((info.sums for info in window), TokenSums())
    flops = sum(flop_model.step_flops(info.sums, info.masked) for info in window)
    peak = peak_tflops(run.device)
    synthetic = DataBenchResult(
        path="synthetic", params_m=round(count_parameters(run.model) / 1e6, 1),
        images_per_s=round(sums.images / elapsed, 1), tokens_per_s=round(sums.kept / elapsed, 1),
        mfu=None if peak is None else round(flops / elapsed / 1e12 / peak, 3),
        peak_mem_gib=None if peak_mem != peak_mem else peak_mem,
        compile_graphs=graphs, compile_seconds=round(compile_s, 2), ms_per_step=round(1000 * elapsed / steps, 2),
        **common,
    )
    return synthetic


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# A latent cache of random latents (the latent-cache path without autoencoder weights)
# ----------------------------------------------------------------------------------------------------


class _BlankImages(torch.utils.data.Dataset):
    """Blank RGB images of ImageNet-like sizes after FiT's resize; only their sizes matter."""

    def __init__(self, grids, patch_px: int, token_budget: int, num_classes: int, seed: int):
        self.grids, self.patch_px, self.token_budget = grids, patch_px, token_budget
        self.labels = torch.randint(0, num_classes, (len(grids),), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, index: int):
        from maskfit.data.datasets import DataItem

        h, w = self.grids[index]
        return DataItem(torch.zeros(3, h * self.patch_px, w * self.patch_px), int(self.labels[index]))


class _RandomLatents:
    """An autoencoder stand-in (factor 8, 4 channels, like sd-vae-ft-ema) whose latents are N(0, 1)."""

    name, factor, channels, scale = "random-latents", 8, 4, 1.0

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def encode(self, images):  # (B, 3, H, W) -> (B, 4, H/8, W/8)
        B, _, H, W = images.shape
        return torch.randn(B, self.channels, H // self.factor, W // self.factor, generator=self.generator)

    def decode(self, latents):
        raise NotImplementedError("random latents have no decoder: use this cache for timing only")


def write_random_latent_cache(out: Path, num_images: int = 8192, token_budget: int = 256, patch: int = 2,
                              num_classes: int = 1000, seed: int = 0) -> Path:
    """A latent cache (``maskfit prepare``'s format) of random latents at ImageNet-like sizes; returns its folder."""
    from maskfit.bench import imagenet_like_grids
    from maskfit.data.latents import build_latent_cache

    patch_px = patch * _RandomLatents.factor
    grids = imagenet_like_grids(num_images, token_budget, patch_px, seed=seed)
    dataset = _BlankImages(grids, patch_px, token_budget, num_classes, seed)
    build_latent_cache(dataset, _RandomLatents(seed), out, batch_size=256, flips=True, dtype=torch.float16,
                       progress=False)
    return Path(out)
