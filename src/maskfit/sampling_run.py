"""`maskfit sample`: N images at each of a list of resolutions, streamed to disk, resumable.

Per resolution H x W the images are drawn in batches; each finished batch is written atomically as a
shard (``HxW/shard_00000.npz``) and a rerun skips finished shards, so an interrupted run loses at most
one batch. At the end the shards become ``samples_HxW.npz`` (ADM format: ``arr_0`` uint8 NHWC,
``arr_1`` labels) and a PNG grid of the first images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from maskfit.bench import sync_device
from maskfit.models.attention import ATTENTION_BACKENDS
from maskfit.models.rope import NTK_EXPONENTS, YARN_RAMPS, RopeExtrapolation, training_grid
from maskfit.sample import (
    DOPRI5_ATOL,
    DOPRI5_RTOL,
    PRECISIONS,
    RECIPES,
    SAMPLERS,
    SamplerOptions,
    check_resolution,
    image_grid,
    parse_resolution,
    recipe_choices,
    sample_tokens,
    save_adm_npz,
    tokens_to_images,
)


def guidance_channels_arg(text: str):
    """--guidance-channels: a positive count of latent channels, or 'all' (argparse type)."""
    if text == "all":
        return "all"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive channel count or 'all' (the released code guides 3)"
        ) from None


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a count of images, steps or a batch size; 0 would draw nothing)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (a NaN guidance scale turns every image black)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def subset_keep_arg(text: str) -> float:
    """--subset-keep: a fraction of tokens in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: the fraction of each image's tokens a network call sees is in "
                                         "(0, 1], e.g. 0.5 for a run trained at mask.keep_ratio=0.5")
    return value


def add_sampler_arguments(p) -> None:
    """The options every sampling command shares (`maskfit sample`, `maskfit sweep`).

    The recipe options default to None, meaning "not given": ``resolve_sampling_choices`` then takes the
    value from ``--recipe`` (or the project's default), and a flag that is given always wins.
    """
    p.add_argument("--labels", default="uniform", help="'uniform' (random classes), 'per-class' or a comma list")
    p.add_argument("--cfg-scale", type=finite_float, default=1.5)
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="published sampling recipe: 'paper' (as FiT/FiTv2 write it) or 'released' (as whlzy/FiT runs "
                        "it); sets the sampler of the published tables (v1: 250 DDPM steps, v2: dopri5 atol 1e-6 "
                        "rtol 1e-3) and the flags below; a flag given explicitly overrides it")
    p.add_argument("--guidance-channels", type=guidance_channels_arg, default=None,
                   help="guide only the first k latent channels (released code: 3) or 'all' (papers, the default)")
    p.add_argument("--yarn-ramp", choices=YARN_RAMPS, default=None,
                   help="YaRN ramp: 'paper' (linear in rotations, FiT eqs. 6-8; default) or 'code' (dimension index)")
    p.add_argument("--ntk-exponent", choices=NTK_EXPONENTS, default=None,
                   help="NTK base exponent: 'axis' m/(m-2), m = head_dim/2 (default; released code) or 'head' "
                        "(the paper's |D|/(|D|-2) read literally)")
    p.add_argument("--sampler", choices=[m for ms in SAMPLERS.values() for m in ms], default=None,
                   help="ddpm|ddim (FiT) or euler|heun|dopri5|sde (FiTv2); default by the run's objective and recipe")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (not with the adaptive dopri5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per sampling batch")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--vae-path", default=None, help="local sd-vae-ft-ema folder (overrides the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto",) + PRECISIONS, default="auto",
                   help="the network's forward: 'auto' = bf16 autocast on CUDA, fp32 on a CPU; the sampler state, "
                        "guidance and decoding are fp32 either way")
    p.add_argument("--subset-keep", type=subset_keep_arg, default=1.0, metavar="K",
                   help="subset sampling, for masked runs: every network call runs the model's masked forward on "
                        "random subsets of K of each image's tokens that together cover it, as masked training did "
                        "(e.g. the run's mask.keep_ratio), instead of the full grid; default 1 (the full grid)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network once for every stream length (dynamic shapes): a minute or two "
                        "up front, then faster per image; worth it for thousands of images")
    p.add_argument("--attention", default="auto", choices=("auto",) + ATTENTION_BACKENDS,
                   help="attention backend (same math whatever the run trained with): 'auto' = varlen on CUDA in bf16, "
                        "dense otherwise")


def resolve_sampling_choices(args, objective: str) -> dict:
    """The sampling choices of a command: ``--recipe``'s (``recipe_choices``), each flag given explicitly on top.

    Checked here, before anything is sampled: the sampler belongs to the run's objective, and ``--steps`` is not
    given to the adaptive dopri5 (it would have no effect). Returns ``recipe_choices``' keys plus "recipe".
    """
    choices = recipe_choices(getattr(args, "recipe", None), objective)
    for key in ("sampler", "steps", "guidance_channels", "yarn_ramp", "ntk_exponent", "attn_scale"):
        value = getattr(args, key, None)
        if value is not None:
            choices[key] = value
    if choices["guidance_channels"] == "all":
        choices["guidance_channels"] = None
    sampler = choices["sampler"]
    if sampler not in SAMPLERS[objective]:
        other = "FiTv2's" if sampler in SAMPLERS["flow"] else "FiT v1's"
        raise ValueError(
            f"--sampler {sampler} is {other}, but this run's objective is '{objective}'; use one of "
            f"{'|'.join(SAMPLERS[objective])}"
        )
    if sampler == "dopri5":
        if getattr(args, "steps", None) is not None:
            raise ValueError(
                f"--steps {args.steps} has no effect with dopri5: it is adaptive, its steps follow atol "
                f"{DOPRI5_ATOL:g} and rtol {DOPRI5_RTOL:g}; drop --steps, or pick a fixed-step sampler (--sampler euler)"
            )
        choices.update(steps=None, atol=DOPRI5_ATOL, rtol=DOPRI5_RTOL)
    else:
        if choices["steps"] is None:  # the recipe's dopri5 was replaced by a fixed-step sampler
            choices["steps"] = recipe_choices(None, objective)["steps"]
        choices.update(atol=None, rtol=None)
    return {"recipe": getattr(args, "recipe", None), **choices}


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (the speed, and FlashAttention's dtype), fp32 on a CPU (where bf16 is slow)."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}; choose auto, {' or '.join(PRECISIONS)}")
    return requested


def sampling_attention(requested: str, device: torch.device, precision: str) -> str:
    """The backend to sample with. Every backend computes the same attention, so 'auto' takes the fastest
    that handles any stream length: varlen on CUDA (flex recompiles for every new length and was 15 %
    slower in training, BENCHMARKS.md), dense on a CPU (varlen has no CPU kernel) and in fp32 (varlen is
    FlashAttention, bf16/fp16 only)."""
    from maskfit.runs import check_attention_device

    if requested == "auto":
        return "varlen" if device.type == "cuda" and precision == "bf16" else "dense"
    check_attention_device(requested, device, "use --attention dense (or auto) on a CPU")
    if requested == "varlen" and precision != "bf16":
        raise ValueError(
            f"attention 'varlen' is FlashAttention, which runs in bf16 only, but the precision is {precision}; "
            "use --precision bf16 (or auto on CUDA), or --attention dense (or auto) for fp32"
        )
    return requested


def load_sampling_model(checkpoint: Path, args, device: torch.device, precision: str):
    """(model, run config) of a resolved checkpoint folder, EMA weights unless --no-ema, on --attention's backend
    (resolved for ``precision``: ``model.cfg.attention`` says which)."""
    from maskfit.runs import load_model_from_checkpoint

    attention = sampling_attention(getattr(args, "attention", "auto"), device, precision)
    model, run_cfg = load_model_from_checkpoint(checkpoint, use_ema=not args.no_ema, device=device, attention=attention)
    if getattr(args, "compile", False):
        compile_for_sampling(model)
    return model, run_cfg


def compile_for_sampling(model) -> None:
    """Compile the network's forward for every stream length at once.

    Sampling batches change length with every resolution mix; with dynamic shapes Dynamo builds one
    graph for all of them instead of one per length (and past its recompile limit, eager fallbacks).
    """
    model.forward = torch.compile(model.forward, dynamic=True)


def check_settings(folder: Path, settings: dict, old: Optional[dict]) -> None:
    """Refuse ``folder`` when ``old`` (the settings its samples were drawn with; None: no record) differs from
    ``settings``: finished shards are skipped on a rerun, so settings that change the pixels (or where images
    fall in shards) must equal the saved ones, or the old images would be returned as if they were these."""
    settings = json.loads(json.dumps(settings, default=str))  # tuples -> lists, as they are saved
    if old is not None and old != settings:
        keys = sorted(set(old) | set(settings))
        shown = ", ".join(f"{k}: {old.get(k)!r} before, {settings.get(k)!r} now" for k in keys
                          if old.get(k) != settings.get(k))
        raise ValueError(
            f"{folder} holds samples drawn with other settings ({shown}); they would be reused as if they "
            f"were yours. Use another --out, or delete {folder} to start over"
        )


def saved_settings(folder: Path) -> Optional[dict]:
    """The settings recorded in ``folder/settings.json`` by :func:`record_settings`, or None."""
    path = folder / "settings.json"
    return json.loads(path.read_text()).get("settings") if path.exists() else None


def record_settings(folder: Path, settings: dict) -> None:
    """Save `settings` in ``folder/settings.json``, refusing a folder whose samples were drawn with others
    (:func:`check_settings`; the check comes first, so a refused run leaves the file as it was)."""
    from maskfit.checkpoint import atomic_write_text

    check_settings(folder, settings, saved_settings(folder))
    settings = json.loads(json.dumps(settings, default=str))
    atomic_write_text(folder / "settings.json", json.dumps({"settings": settings}, indent=2))


def load_autoencoder(run_cfg, vae_path, device):
    from maskfit.data.latents import SDVAE, IdentityAutoencoder

    if run_cfg.data.autoencoder == "identity":
        return IdentityAutoencoder(), 1
    vae = SDVAE.from_pretrained(vae_path or run_cfg.data.vae_path, device=device)
    return vae, vae.factor


def labels_for(spec: str, n: int, num_classes: int, generator: torch.Generator, start: int = 0) -> torch.Tensor:
    """Labels of images start .. start + n - 1 of a run: 'uniform' draws them; 'per-class' and a comma list
    cycle through the classes by image index, so every batch continues where the previous one stopped."""
    index = torch.arange(start, start + n)
    if spec == "uniform":
        return torch.randint(0, num_classes, (n,), generator=generator)
    if spec == "per-class":
        return index % num_classes
    try:
        fixed = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--labels {spec!r} must be 'uniform', 'per-class' or a comma list of class ids") from None
    bad = [v for v in fixed if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--labels has class ids {bad} outside 0..{num_classes - 1}")
    return torch.tensor(fixed)[index % len(fixed)]


def sampler_options(choices: dict, rope: RopeExtrapolation, cfg_scale: float, precision: str,
                    guidance_schedule: str = "constant", subset_keep: float = 1.0) -> SamplerOptions:
    """SamplerOptions from ``resolve_sampling_choices``' choices (the RoPE setting and subset sampling the caller's)."""
    return SamplerOptions(
        method=choices["sampler"], steps=choices["steps"], cfg_scale=cfg_scale,
        guidance_channels=choices["guidance_channels"], guidance_schedule=guidance_schedule, rope=rope,
        atol=choices["atol"], rtol=choices["rtol"], precision=precision, subset_keep=subset_keep,
    )


def option_settings(options: SamplerOptions) -> dict:
    """What a samples folder records of the options: every field, except ``subset_keep`` at its default 1 (added
    later; folders sampled on the full grid before it existed still resume)."""
    return {**{k: v for k, v in vars(options).items() if k != "subset_keep" or v != 1.0},
            "rope": rope_settings(options.rope)}


def rope_for(method: str, train_grid, choices: dict, train_keep: float = 1.0) -> RopeExtrapolation:
    """RoPE extrapolation ``method`` read as the resolved choices say (attention scale, NTK exponent, YaRN ramp)."""
    return RopeExtrapolation(
        method, train_grid, attn_scale=choices["attn_scale"], ntk_exponent=choices["ntk_exponent"],
        yarn_ramp=choices["yarn_ramp"], train_keep=train_keep,
    )


def rope_settings(rope: RopeExtrapolation) -> dict:
    """What a samples folder records of the RoPE setting: every field, except ``train_keep`` where the attention
    scale does not read it (it changes no pixel there, and folders sampled before it existed still resume)."""
    return {k: v for k, v in vars(rope).items() if k != "train_keep" or rope.attn_scale == "kept"}


@dataclass
class SamplingClock:
    """Time spent drawing tokens (network and sampler; not decoding, not writing files): the part of
    `maskfit sample` that `maskfit bench --sampling` times, so the two images/s figures compare."""

    images: int = 0
    seconds: float = 0.0
    first: Optional[tuple[int, float]] = None  # (images, seconds) of the first batch drawn

    def draw(self, draw_tokens, count: int, device: torch.device):
        sync_device(device)  # cheap: the previous batch's decode already waited for the GPU
        t0 = time.perf_counter()
        tokens = draw_tokens()
        sync_device(device)
        seconds = time.perf_counter() - t0
        if self.first is None:
            self.first = (count, seconds)
        self.seconds += seconds
        self.images += count
        return tokens

    def summary(self) -> dict:
        """images/s over every batch, and after the first: the first batch also pays one-time start-up
        (CUDA context, kernel selection, compilation with --compile), which the bench runs before its clock
        and which a long run (50 000 images) amortises."""
        rate = self.images / self.seconds if self.seconds > 0 else None
        out = {"images": self.images, "seconds": round(self.seconds, 3),
               "images_per_s": None if rate is None else round(rate, 2)}
        if self.first is not None and self.images > self.first[0]:
            rest = self.seconds - self.first[1]
            out["first_batch_seconds"] = round(self.first[1], 3)
            out["images_per_s_after_first_batch"] = round((self.images - self.first[0]) / rest, 2) if rest > 0 else None
        return out


OUT_OF_MEMORY = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


@contextmanager
def explain_out_of_memory(what: str, batch_size: int, device: torch.device):
    """One line naming the batch and the fix when a sampling batch runs out of memory: CUDA raises
    torch.OutOfMemoryError, CPU allocators a plain RuntimeError with one of :data:`OUT_OF_MEMORY`."""
    try:
        yield
    except RuntimeError as err:
        if not (isinstance(err, torch.OutOfMemoryError) or any(m in str(err).lower() for m in OUT_OF_MEMORY)):
            raise
        fix = (f"lower --batch-size (e.g. --batch-size {batch_size // 2})" if batch_size > 1 else
               "one image of this size does not fit: sample a smaller resolution or use a device with more memory")
        raise RuntimeError(f"sampling {what} with --batch-size {batch_size} ran out of memory on {device}; {fix}") from err


def run_sampling(args) -> dict:
    from maskfit.checkpoint import atomic_write_text, resolve_checkpoint
    from maskfit.finetune import rope_train_grid, rope_train_keep
    from maskfit.locks import folder_lock
    from maskfit.paths import check_output_dir
    from maskfit.runs import build_diffusion, resolve_device

    out = Path(args.out) if args.out else Path(args.checkpoint) / "samples"
    check_output_dir(out, "--out", "samples folder")  # before the model loads
    kept_fraction = getattr(args, "kept_fraction", None)
    if kept_fraction is not None and not 0.0 < kept_fraction <= 1.0:
        raise ValueError(f"--kept-fraction {kept_fraction:g}: the kept fraction is in (0, 1], e.g. 0.5")
    device = resolve_device(args.device)
    precision = resolve_precision(getattr(args, "precision", "auto"), device)
    # Resolved once: the checkpoint loaded is the one recorded, even if the run writes a newer one meanwhile.
    ckpt = resolve_checkpoint(Path(args.checkpoint))
    model, run_cfg = load_sampling_model(ckpt, args, device, precision)
    choices = resolve_sampling_choices(args, run_cfg.diffusion.objective)
    diffusion = build_diffusion(run_cfg)
    autoencoder, factor = load_autoencoder(run_cfg, args.vae_path, device)
    p = model.cfg.patch_size
    multiple = factor * p
    train_grid = training_grid(run_cfg.data.token_budget)
    resolutions = [parse_resolution(r) for r in (args.resolution or [str(train_grid[0] * multiple)])]
    for h, w in resolutions:
        check_resolution(h, w, multiple)
    if kept_fraction is not None and choices["attn_scale"] != "kept":
        raise ValueError(f"--kept-fraction {kept_fraction:g} is read by --attn-scale kept only (this run samples "
                         f"with {choices['attn_scale']!r}); add --attn-scale kept or drop --kept-fraction")
    train_keep = rope_train_keep(run_cfg) if kept_fraction is None else kept_fraction
    options = sampler_options(
        choices, rope_for(args.extrapolation, rope_train_grid(run_cfg), choices, train_keep),
        args.cfg_scale, precision,
        guidance_schedule=getattr(args, "cfg_schedule", "constant"), subset_keep=getattr(args, "subset_keep", 1.0),
    )
    out.mkdir(parents=True, exist_ok=True)
    distribution = getattr(args, "distribution", None)
    pack = getattr(args, "pack", False)
    # What changes the pixels of a shard; each shard folder keeps its own copy and refuses others on a rerun.
    # The options hold every resolved recipe choice (sampler, tolerances, guidance channels, RoPE readings) and
    # the precision; the attention backend changes the bf16 rounding, so it counts too.
    settings = {
        # The checkpoint itself, not the run folder: a run that trained on must not reuse older samples.
        "checkpoint": str(ckpt.resolve()), "use_ema": not args.no_ema, "num_images": args.num_images,
        "batch_size": args.batch_size, "labels": args.labels, "seed": args.seed,
        "attention": model.cfg.attention, "options": option_settings(options),
    }
    grids = None
    if distribution is not None or pack:
        if distribution == "imagenet":
            from maskfit.bench import imagenet_like_grids

            grids = imagenet_like_grids(args.num_images, run_cfg.data.token_budget, multiple, seed=args.seed)
        elif distribution is None:
            # --pack: the listed resolutions in turn, so every batch mixes them.
            per_res = [(h // multiple, w // multiple) for h, w in resolutions]
            grids = [per_res[i % len(per_res)] for i in range(args.num_images * len(per_res))]
        else:
            raise ValueError(f"--distribution {distribution!r} is not known; use 'imagenet'")
        shard_settings = {"mixed": {**settings, "grids_sha256": hashlib.sha256(json.dumps(grids).encode()).hexdigest()}}
    else:
        shard_settings = {f"{h}x{w}": settings for h, w in resolutions}
    # One process per sample folder (maskfit.locks): two runs into one folder would write each other's shards.
    with folder_lock(out, "sample folder"):
        # Check every record before writing any: a refused run leaves sampling.json describing the images
        # beside it. Its settings are the folder's (packed and per-resolution runs write the same samples_HxW.npz).
        folder_settings = {**settings, "distribution": distribution, "pack": pack}
        record_path = out / "sampling.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        check_settings(out, folder_settings, None if record is None else {k: record.get(k) for k in folder_settings})
        for name, values in shard_settings.items():
            check_settings(out / name, values, saved_settings(out / name))
        sampled = [list(r) for r in (record or {}).get("resolutions", [])]
        sampled += [list(r) for r in resolutions if list(r) not in sampled]
        atomic_write_text(record_path, json.dumps(
            # The recipe name is recorded for the reader; the reuse check compares what it resolved to.
            {"recipe": choices["recipe"], **folder_settings, "resolutions": sampled}, indent=2, default=str,
        ))
        clock = SamplingClock()
        if grids is not None:
            summary = sample_mixed(model, diffusion, autoencoder, grids, multiple, p, options, args, out, device,
                                   settings=shard_settings["mixed"], clock=clock)
        else:
            summary = {}
            for h, w in resolutions:
                summary[f"{h}x{w}"] = sample_resolution(
                    model, diffusion, autoencoder, (h, w), multiple, p, options, args, out, device, settings=settings,
                    clock=clock,
                )
    # Drawing only (batches made in this call): compare with `maskfit bench --sampling`.
    summary["throughput"] = {**clock.summary(), "precision": precision, "attention": model.cfg.attention,
                             "compiled": bool(getattr(args, "compile", False))}
    return summary


def sample_mixed(model, diffusion, autoencoder, grids, multiple, p, options, args, out, device,
                 settings: Optional[dict] = None, clock: Optional[SamplingClock] = None) -> dict:
    """Images of many resolutions packed into each batch (one stream, per-image RoPE), then split.

    ``grids[i]`` is image i's token grid. Each finished batch is a shard holding, per resolution, its
    images, labels and image ids, so an interrupted run resumes; at the end every resolution gets its own
    ``samples_HxW.npz`` in image-id order.
    """
    from maskfit.evaluate.adm_npz import _atomic_savez

    clock = clock if clock is not None else SamplingClock()
    shard_dir = out / "mixed"
    shard_dir.mkdir(exist_ok=True)
    if settings is not None:
        record_settings(shard_dir, settings)
    bs = args.batch_size
    num_batches = (len(grids) + bs - 1) // bs
    for b in tqdm(range(num_batches), desc="sample (packed resolutions)"):
        shard = shard_dir / f"shard_{b:05d}.npz"
        if shard.exists():
            continue
        batch_grids = grids[b * bs : (b + 1) * bs]
        seed = zlib.crc32(f"{args.seed}-mixed-{b}".encode())
        generator = torch.Generator(device=device).manual_seed(seed)
        labels = labels_for(args.labels, len(batch_grids), model.cfg.num_classes, torch.Generator().manual_seed(seed),
                            start=b * bs)
        biggest = max(batch_grids, key=lambda g: g[0] * g[1])
        what = (f"packed batch {b} ({len(batch_grids)} images, the largest {biggest[0] * multiple}x"
                f"{biggest[1] * multiple} = {biggest[0] * biggest[1]} tokens)")
        with explain_out_of_memory(what, bs, device):
            tokens = clock.draw(lambda: sample_tokens(model, diffusion, batch_grids, labels, options, generator, device),
                                len(batch_grids), device)
            images = tokens_to_images(tokens, batch_grids, p, autoencoder)
        arrays: dict[str, list] = {}
        for i, (im, label) in enumerate(zip(images, labels.tolist())):
            key = f"{im.shape[0]}x{im.shape[1]}"
            arrays.setdefault(key, []).append(im)
            arrays.setdefault(f"{key}_labels", []).append(label)
            arrays.setdefault(f"{key}_ids", []).append(b * bs + i)
        _atomic_savez(shard, {k: np.asarray(v) for k, v in arrays.items()})  # a unique temporary name, then rename
    collected: dict[str, list] = {}
    for b in range(num_batches):
        with np.load(shard_dir / f"shard_{b:05d}.npz") as data:
            for key in data.files:
                if not key.endswith(("_labels", "_ids")):
                    for im, label, idx in zip(data[key], data[f"{key}_labels"], data[f"{key}_ids"]):
                        collected.setdefault(key, []).append((int(idx), im, int(label)))
    summary = {}
    for key, items in sorted(collected.items()):
        items.sort(key=lambda it: it[0])
        final = out / f"samples_{key}.npz"
        save_adm_npz(final, [im for _, im, _ in items], np.array([lab for _, _, lab in items]))
        image_grid([im for _, im, _ in items[:64]], columns=8).save(out / f"grid_{key}.png")
        summary[key] = {"npz": str(final), "count": len(items)}
    return summary


def sample_resolution(model, diffusion, autoencoder, hw, multiple, p, options, args, out, device,
                      settings: Optional[dict] = None, clock: Optional[SamplingClock] = None) -> dict:
    """Shards, ``samples_HxW.npz`` and ``grid_HxW.png`` for one resolution in ``out`` (also used by the sweep).

    ``args`` needs ``num_images``, ``batch_size``, ``seed`` and ``labels``. Noise and labels depend on
    (seed, resolution, batch) only, so two RoPE settings sampled with one seed see the same noise.
    """
    clock = clock if clock is not None else SamplingClock()
    h, w = hw
    grid = (h // multiple, w // multiple)
    shard_dir = out / f"{h}x{w}"
    shard_dir.mkdir(exist_ok=True)
    if settings is not None:
        record_settings(shard_dir, settings)
    n, bs = args.num_images, args.batch_size
    num_batches = (n + bs - 1) // bs
    for b in tqdm(range(num_batches), desc=f"sample {h}x{w}", disable=False):
        shard = shard_dir / f"shard_{b:05d}.npz"
        if shard.exists():
            continue  # finished before an interruption
        count = min(bs, n - b * bs)
        # One seed per (run seed, resolution, batch): a resumed run draws what the first would have.
        seed = zlib.crc32(f"{args.seed}-{h}x{w}-{b}".encode())
        generator = torch.Generator(device=device).manual_seed(seed)
        labels = labels_for(args.labels, count, model.cfg.num_classes, torch.Generator().manual_seed(seed),
                            start=b * bs)
        with explain_out_of_memory(f"{h}x{w} ({grid[0] * grid[1]} tokens per image)", bs, device):
            tokens = clock.draw(lambda: sample_tokens(model, diffusion, [grid] * count, labels, options, generator,
                                                      device), count, device)
            images = tokens_to_images(tokens, [grid] * count, p, autoencoder)
        save_adm_npz(shard, images, labels.numpy())
    arrays = [np.load(shard_dir / f"shard_{b:05d}.npz") for b in range(num_batches)]
    images = np.concatenate([a["arr_0"] for a in arrays])[:n]
    labels = np.concatenate([a["arr_1"] for a in arrays])[:n]
    final = out / f"samples_{h}x{w}.npz"
    save_adm_npz(final, list(images), labels)
    image_grid(list(images[:64]), columns=8).save(out / f"grid_{h}x{w}.png")
    return {"npz": str(final), "png": str(out / f"grid_{h}x{w}.png"), "count": int(len(images))}
