#!/usr/bin/env python3
"""Expected GPU time of the full-scale runs (README "Reproducing the papers"), from our measured throughput.

    PYTHONPATH=src python3 tools/full_scale_cost.py     # the README table's rows, then how each rate was reached

GPU-hours = images / (images/s on one GPU) / 3600, phase by phase (a masked run's unmasked fine-tune at the
unmasked rate). Rates are images/s on one H200 at the config's batch of 256:

- **measured**: the "real" rows of `maskfit bench --data` on one H200, 2026-12-01
  (bench_results/h200_2026-12-01_latents.jsonl; BENCHMARKS.md): FiT-B/2 unmasked, 50 % kept plain and 50 % kept
  with the MaskDiT decoder, from a latent cache of random latents at ImageNet-like sizes, packed, varlen,
  compiled, batch 256. Used where the run's preset, design and keep ratio were measured.
- **estimated** (not measured): every other phase. A measured row of the same preset and design where one
  exists, else FiT-B/2 unmasked, scaled by training FLOPs per image: rate = rate_ref * F_ref / F_run, i.e. the
  run is assumed to reach the reference row's MFU. F is :func:`maskfit.throughput.design_flops` (3 x forward,
  useful tokens only) averaged over the benchmark's own size mix (:func:`maskfit.bench.imagenet_like_grids`,
  the grids of the measured cache) at the run's token budget and keep ratio.

The 8-GPU wall time is GPU-hours / 8: linear scaling, an assumption (multi-GPU scaling is unmeasured). The
latent caches (`maskfit prepare`) are not costed: the SD-VAE encoding rate has not been measured.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASURED_FILE = ROOT / "bench_results" / "h200_2026-12-01_latents.jsonl"
GPUS = 8


@dataclass(frozen=True)
class Run:
    name: str
    config: str  # relative to the repository root
    parallel: str  # the train.parallel value of the documented torchrun command
    note: str = ""  # what the estimate leaves out, printed in the measurement column


RUNS = [
    Run("FiT-B/2 (FiT Tab. 3/5: FID 36.36)", "configs/fit_b2_imagenet_packed.toml", "ddp"),
    Run("FiT-B/2, 50 % kept, plain, last 10 % unmasked (ours)", "configs/masked_plain50_b2_imagenet.toml", "ddp"),
    Run("FiT-B/2, 50 % kept, MaskDiT decoder, last 10 % unmasked (ours)", "configs/masked_decoder50_b2_imagenet.toml",
        "ddp"),
    Run("FiTv2-B/2 (FiTv2 Tab. II: FID 26.03 / 9.45 at CFG 1.5)", "configs/fitv2_b2_imagenet.toml", "ddp"),
    Run("FiTv2-XL/2 (FiTv2 Tab. III-V: FID 2.26 at CFG 1.5)", "configs/fitv2_xl2_imagenet.toml", "fsdp"),
    Run("FiTv2-XL/2 high-resolution stage (FiTv2 Tab. VI: FID 2.90 at 512², CFG 1.65)", "configs/fitv2_xl2_hr_imagenet.toml",
        "fsdp", "FLOPs as if every weight trained: an upper estimate"),
    Run("FiTv2-B/2 high-resolution stage (no paper row)", "configs/fitv2_b2_hr_imagenet.toml", "ddp",
        "FLOPs as if every weight trained: an upper estimate"),
]


def command(run: Run) -> str:
    return f"torchrun --nproc-per-node {GPUS} -m maskfit.cli train {run.config} --set train.parallel={run.parallel}"


def measured_rates(path: Path = MEASURED_FILE) -> dict:
    """(preset, design, keep_ratio) -> (images/s, recorded MFU) of the benchmark's "real" rows."""
    rates = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["path"] == "real":
            rates[(row["model"], row["design"], row["keep_ratio"])] = (row["images_per_s"], row["mfu"])
    return rates


def mean_train_flops(mcfg, token_budget: int, keep_ratio: float, num_images: int = 8192) -> float:
    """Mean training FLOPs per image over the benchmark's ImageNet-like size mix at this budget."""
    from maskfit.bench import imagenet_like_grids
    from maskfit.masking import MaskConfig, num_keep_for
    from maskfit.throughput import design_flops

    # The measured cache: maskfit bench --write-random-cache (8192 images, seed 0, patch 2 on the f8 VAE = 16 px).
    counts = Counter(h * w for h, w in imagenet_like_grids(num_images, token_budget, 16, seed=0))
    mask = MaskConfig(keep_ratio=keep_ratio)
    total = sum(c * design_flops(mcfg, n, num_keep_for(n, mask)) for n, c in counts.items())
    return total / num_images


@dataclass(frozen=True)
class Phase:
    steps: int
    keep_ratio: float
    images_per_s: float
    measured: bool
    source: str  # how the rate was reached


def _model_config(cfg):
    from maskfit.train import resolved_model_config

    return resolved_model_config(cfg, 3 if cfg.data.autoencoder == "identity" else 4)


def phases(cfg, rates: dict) -> list[Phase]:
    """The run's masked and unmasked stretches, each with its images/s on one GPU and where it comes from."""
    from maskfit.config import config_from_dict

    m = cfg.mask
    if m.keep_count is not None or m.schedule != "constant" or m.ratio_distribution != "constant":
        raise ValueError("full_scale_cost costs constant keep ratios only (mask.keep_ratio, schedule 'constant')")
    stretches = [(cfg.train.steps, 1.0)] if m.keep_ratio == 1.0 else [
        (cfg.train.steps - m.final_unmasked_steps, m.keep_ratio), (m.final_unmasked_steps, 1.0)]
    mcfg = _model_config(cfg)
    out = []
    for steps, keep in stretches:
        if steps == 0:
            continue
        key = (cfg.model.preset, m.design, keep)
        # The measured workload: DDPM (configs/fit_b2_imagenet.toml) at 256 tokens, every weight trained.
        same_workload = (cfg.diffusion.objective, cfg.data.token_budget, cfg.finetune.trainable) == ("ddpm", 256, "all")
        if key in rates and same_workload:
            rate, mfu = rates[key]
            out.append(Phase(steps, keep, rate, True, f"measured {_num(rate)} img/s"))
            continue
        # The closest measured row: same preset and design at another keep ratio, else FiT-B/2 unmasked.
        ref_key = next((k for k in rates if k[:2] == key[:2]), ("FiT-B/2", "plain", 1.0))
        ref_rate, ref_mfu = rates[ref_key]
        ref_cfg = config_from_dict({"model": {"preset": ref_key[0]}, "mask": {"design": ref_key[1]}})
        f_ref = mean_train_flops(_model_config(ref_cfg), 256, ref_key[2])
        f_run = mean_train_flops(mcfg, cfg.data.token_budget, keep)
        rate = ref_rate * f_ref / f_run
        ref = ref_key[0] + (" + decoder" if ref_key[1] == "decoder" else "") + (
            " unmasked" if ref_key[2] == 1.0 else f" {_pct(ref_key[2])} kept")
        out.append(Phase(steps, keep, rate, False,
                         f"**estimated** {_num(rate)} img/s: {_num(f_run / 1e9)} GFLOP/image at the MFU of the "
                         f"measured {ref} row ({ref_mfu * 100:.1f} %)"))
    return out


def cost(run: Run, rates: dict) -> dict:
    from maskfit.config import load_config

    cfg = load_config(ROOT / run.config)
    batch = cfg.train.batch_size
    if batch is None:
        raise ValueError(f"{run.config}: token batching has no fixed images per step; cost an image-batched config")
    parts = phases(cfg, rates)
    images = sum(p.steps for p in parts) * batch
    seconds = sum(p.steps * batch / p.images_per_s for p in parts)
    return {"run": run, "cfg": cfg, "phases": parts, "images": images, "gpu_hours": seconds / 3600}


def _num(x: float) -> str:
    """1234.5 -> '1 234' (thousands as BENCHMARKS.md writes them)."""
    return f"{x:,.0f}".replace(",", " ")


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.0f} %"


def _phase_label(phase: Phase, count: int) -> str:
    if count == 1:
        return ""
    return "unmasked fine-tune: " if phase.keep_ratio == 1.0 else f"{_pct(phase.keep_ratio)} kept: "


def _wall(hours: float) -> str:
    return f"{hours:.1f} h" if hours < 48 else f"{hours:.0f} h ({hours / 24:.1f} days)"


def table_rows(rates: dict) -> list[str]:
    rows = []
    for run in RUNS:
        c = cost(run, rates)
        parts = c["phases"]
        how = "; ".join(_phase_label(p, len(parts)) + p.source for p in parts)
        if run.note:
            how += f"; {run.note}"
        rows.append(
            f"| {run.name} | `{run.config}` | `{command(run)}` | {c['images'] / 1e6:.1f} M | "
            f"{c['gpu_hours']:.1f} | {_wall(c['gpu_hours'] / GPUS)} | {how} |"
        )
    return rows


def main() -> int:
    rates = measured_rates()
    print("| run | config | command (8 GPUs) | images | GPU-hours on one H200 | 8-GPU wall time (linear scaling "
          "assumed) | which measurement (images/s on one H200) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in table_rows(rates):
        print(row)
    print()
    for run in RUNS:
        c = cost(run, rates)
        for p in c["phases"]:
            print(f"{run.config}: {_num(p.steps)} steps at {_pct(p.keep_ratio)} kept, "
                  f"{p.steps * c['cfg'].train.batch_size / p.images_per_s / 3600:.1f} GPU-h, {p.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
