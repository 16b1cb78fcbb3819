"""Probe: does a masked model's sampling path get worse predictions than its training path? (REPORT.md, decoder)

    PYTHONPATH=src python3 tools/probes/decoder_mask_token_gap.py CHECKPOINT [CHECKPOINT ...] [--batches 4]
        [--data FOLDER] [--out FILE.jsonl]

A checkpoint folder of a masked DDPM run (``maskfit train`` or ``maskfit experiment``; its run folder's
``checkpoints/step_*``), written for the MaskDiT decoder (``mask.design="decoder"``) and run on the plain design
as its control. For its EMA and raw weights, on held-out images of the run's own config (``data.split="holdout"``:
the project's split, never trained on; the run's crops and batching; masks at the run's ratio), at
t = 50, 250, 500, 750, 950 with noise fixed per (batch, t), under the run's precision rule (bf16 autocast on a GPU,
fp32 on a CPU), each way below scores

- ``eps_mse``: the epsilon MSE, and
- ``x0_slope``: the slope of the regression of the implied x0 prediction, (x_t - sqrt(1 - ᾱ) ε̂) / sqrt(ᾱ), on the
  clean image, per image over its scored tokens and channels: 1 is unbiased, below 1 a prediction shrunk toward
  the image's mean (the posterior mean is shrunk at high noise, so compare ways and runs, not against 1). At high
  noise the epsilon MSE says little about this bias (the x0 MSE it implies is (1 - ᾱ)/ᾱ times larger).

The ways:

- ``unmasked``: every token, no mask: what sampling runs;
- ``masked``: the training forward (the backbone on the kept tokens; for the decoder, the learnable mask token at
  dropped positions), kept tokens scored (the training loss's epsilon term);
- ``full_encoder`` (decoder only): the encoder on every token as at sampling, then the mask token put at the dropped
  positions of the decoder's input; kept tokens scored.

For the decoder's ``masked`` way also ``mask_attention``: the softmax mass that kept tokens' queries put on the mask
tokens' keys in the decoder's attention (mean over decoder blocks, heads, kept queries and the first 32 images of each
batch), beside ``mask_share``, the mask tokens' share of the keys (what attention blind to them would give them
on average). Far above the share at high noise is a decoder using the mask tokens as an attention sink, a place
to put attention when the visible tokens carry nothing (Darcet et al. 2024, "Vision Transformers Need
Registers"; Xiao et al. 2024, attention sinks) and which sampling never provides.

Along the sampler's own path, ``trajectory``: an unguided DDIM run of 25 steps from fixed noise (32 images at the
training grid, labels cycling over the classes) records at each step the mean per-image standard deviation of the
x0 prediction (``x0_std``, tokens and channels; the sampled images' own as ``trajectory_final``, the held-out images'
as ``data``). Washed-out samples (REPORT) show here as an x0_std that falls short of the data's, and the step where
it stops growing says at which noise level the contrast is lost.

For the decoder, ``masked`` ~ ``full_encoder`` < ``unmasked`` says the sampling-time gap comes from the decoder's
missing mask tokens, not from the encoder's denser context. Each image counts once (mean over its tokens, then over
images). Prints one line per (checkpoint, weights): the mean over t of each way's epsilon MSE, and t = 950's; with
--out, one JSON line per (checkpoint, weights, way, t).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from maskfit.data.pipeline import build_training_data
from maskfit.diffusion.gaussian import GaussianDiffusion
from maskfit.models.rope import training_grid
from maskfit.models.transformer import _Stream, with_mask_tokens
from maskfit.runs import autocast_for, load_model_from_checkpoint, run_patch_size
from maskfit.tokens import pack, segment_sum

TIMESTEPS = (50, 250, 500, 750, 950)
WAYS = ("unmasked", "masked", "full_encoder")


def heldout_batches(cfg, count: int, data_root: str | None):
    """``count`` batches of held-out images, built by the run's own pipeline (crops, batching, masks)."""
    data = dataclasses.replace(cfg.data, split="holdout", num_workers=0, root=data_root or cfg.data.root)
    held = dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train, seed=123))
    pipeline = build_training_data(held, run_patch_size(held))
    batches = [pipeline.next_batch(step) for step in range(count)]
    if any(b.mask is None for b in batches):
        raise ValueError("the run keeps every token (mask.keep_ratio 1): there is no masked forward to compare with")
    return batches


def full_encoder_forward(model, x, t, y, layout, mask):
    """The encoder on every token (as at sampling), the decoder with mask tokens at the dropped positions."""
    cfg = model.cfg
    cond, global_mod = model.condition(t, y)  # (B, d), (B, 6d) or None
    full = _Stream(layout, cfg.head_dim, None, cfg.rope_theta, cfg.attention)
    h = model._run_blocks(model.x_embedder(x), cond, global_mod, full, model.blocks)  # (T, d)
    h = model.decoder_in(h)  # (T, dd)
    hf = with_mask_tokens(model.mask_token, h[mask.index], mask.index, layout.num_tokens)  # (T, dd)
    return model._decode(hf, cond, full)  # (T, p*p*C_out)


SINK_IMAGES = 32  # images per batch whose decoder attention weights are formed densely


@torch.no_grad()
def decoder_mask_attention(model, x_t, steps, y, layout, mask) -> tuple[float, float]:
    """(mask_attention, mask_share) of the masked forward's decoder (see the module's docstring)."""
    from maskfit.models import transformer

    T, B = layout.num_tokens, min(layout.num_images, SINK_IMAGES)
    dropped = torch.ones(T, dtype=torch.bool, device=x_t.device).index_fill(0, mask.index, False)  # (T,)
    starts = layout.cu_seqlens.long().tolist()
    masses, shares = [], []
    original = transformer.attention

    def recording(q, k, v, plan):
        if q.shape[0] == T:  # only the decoder runs on the full stream in a masked forward (the encoder on T_k)
            for b in range(B):
                rows = slice(starts[b], starts[b + 1])
                is_mask = dropped[rows]  # (L,)
                if is_mask.all() or not is_mask.any():
                    continue
                qb, kb = q[rows].float().transpose(0, 1), k[rows].float().transpose(0, 1)  # (H, L, D_h)
                weights = torch.softmax(qb @ kb.transpose(1, 2) / qb.shape[-1] ** 0.5, dim=-1)  # (H, L_q, L_k)
                masses.append(float(weights[:, ~is_mask][:, :, is_mask].sum(-1).mean()))
                shares.append(float(is_mask.float().mean()))
        return original(q, k, v, plan)

    transformer.attention = recording
    try:
        model(x_t, steps, y, layout, mask=mask)
    finally:
        transformer.attention = original
    return sum(masses) / max(len(masses), 1), sum(shares) / max(len(shares), 1)


def per_image_slope(prediction, target, counted, layout) -> float:
    """Mean over images of the least-squares slope of ``prediction`` on ``target`` (both (T, C)) over each image's
    counted tokens and all channels, each centred on its own per-image mean."""
    B, C = layout.num_images, target.shape[1]
    p, x = prediction.double(), target.double()
    zero = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)

    def image_sum(per_token):  # (T,) -> (B,) over counted tokens
        return segment_sum(torch.where(counted, per_token, zero), layout.seq_id, B)

    n = image_sum(torch.full_like(zero, float(C)))
    sx, sp = image_sum(x.sum(1)), image_sum(p.sum(1))
    sxx, sxp = image_sum((x * x).sum(1)), image_sum((x * p).sum(1))
    var = sxx - sx * sx / n.clamp(min=1)
    has = (n > 0) & (var > 0)
    return float(((sxp - sx * sp / n.clamp(min=1))[has] / var[has]).mean())


def per_image_mean(per_token, counted, layout) -> float:
    """Mean over images of each image's mean over its counted tokens."""
    B = layout.num_images
    total = segment_sum(torch.where(counted, per_token, torch.zeros_like(per_token)), layout.seq_id, B)
    count = segment_sum(counted.float(), layout.seq_id, B)
    has = count > 0
    return float((total[has] / count[has]).mean())


@torch.no_grad()
def gap(model, batches, device) -> dict:
    """{way: {t: {"eps_mse": ..., "x0_slope": ...}}} over the batches (``full_encoder`` for the decoder only)."""
    diffusion = GaussianDiffusion()
    ways = WAYS if model.cfg.mask_design == "decoder" else WAYS[:2]
    sums = {way: {t: {"eps_mse": 0.0, "x0_slope": 0.0} for t in TIMESTEPS} for way in ways}
    if "full_encoder" in ways:
        for t in TIMESTEPS:
            sums["masked"][t].update(mask_attention=0.0, mask_share=0.0)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        layout, mask = batch.layout, batch.mask
        real = torch.ones(layout.num_tokens, dtype=torch.bool, device=device) if layout.valid is None else layout.valid
        kept = torch.zeros_like(real).index_fill(0, mask.index, True) & real
        channels = batch.tokens.shape[1]
        for t in TIMESTEPS:
            noise = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(1000 * i + t)).to(device)
            steps = torch.full((layout.num_images,), t, dtype=torch.long, device=device)
            t_tok = steps[layout.seq_id]  # (T,)
            x_t = diffusion.q_sample(batch.tokens, t_tok, noise)  # (T, C)
            with autocast_for("auto", device):  # bf16 on a GPU (FlashAttention needs it), fp32 on a CPU
                outputs = {
                    "unmasked": (model(x_t, steps, batch.y, layout), real),
                    "masked": (model(x_t, steps, batch.y, layout, mask=mask), kept),
                }
                if "full_encoder" in ways:
                    outputs["full_encoder"] = (full_encoder_forward(model, x_t, steps, batch.y, layout, mask), kept)
                    attended, share = decoder_mask_attention(model, x_t, steps, batch.y, layout, mask)
                    sums["masked"][t]["mask_attention"] += attended / len(batches)
                    sums["masked"][t]["mask_share"] += share / len(batches)
            for way, (out, counted) in outputs.items():
                eps = out[:, :channels].float()  # (T, C) the epsilon channels
                err = ((eps - noise) ** 2).mean(dim=1)  # (T,)
                x0_hat = diffusion.predict_x0(x_t, t_tok, eps)  # (T, C)
                sums[way][t]["eps_mse"] += per_image_mean(err, counted, layout) / len(batches)
                sums[way][t]["x0_slope"] += per_image_slope(x0_hat, batch.tokens, counted, layout) / len(batches)
    return sums


TRAJECTORY_IMAGES, TRAJECTORY_STEPS = 32, 25


def per_image_std(x, layout) -> float:
    """Mean over images of each image's standard deviation over its tokens and channels; x: (T, C)."""
    B, C = layout.num_images, x.shape[1]
    v = x.double()
    n = segment_sum(torch.full((v.shape[0],), float(C), dtype=torch.float64, device=v.device), layout.seq_id, B)
    s1, s2 = segment_sum(v.sum(1), layout.seq_id, B), segment_sum((v * v).sum(1), layout.seq_id, B)
    var = (s2 - s1 * s1 / n) / (n - 1).clamp(min=1)
    return float(var.clamp(min=0).sqrt().mean())


@torch.no_grad()
def trajectory(model, token_budget: int, device) -> dict:
    """{original t: mean per-image std of the x0 prediction} along an unguided DDIM run, and "final": the samples'."""
    diffusion = GaussianDiffusion()
    cfg = model.cfg
    grids = [training_grid(token_budget)] * TRAJECTORY_IMAGES
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(h * w, cfg.token_dim, generator=g) for h, w in grids]
    y = torch.arange(TRAJECTORY_IMAGES) % cfg.num_classes
    batch = pack(noise, grids, y).to(device)
    stds = {}

    def model_fn(x, t, labels, layout):
        with autocast_for("auto", device):
            out = model(x, t, labels, layout)
        eps = out[:, : x.shape[1]].float()
        x0_hat = diffusion.predict_x0(x.float(), t[layout.seq_id], eps)  # t: original timesteps of the full schedule
        stds[int(t[0])] = per_image_std(x0_hat, layout)
        return out

    sample = diffusion.sample(model_fn, batch.tokens, batch.y, batch.layout, steps=TRAJECTORY_STEPS, method="ddim")
    stds["final"] = per_image_std(sample, batch.layout)
    return stds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--data", default=None, help="the image folder (default: the run's data.root)")
    p.add_argument("--out", default=None, help="JSON lines, one per (checkpoint, weights, way, t)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention = None if device.type == "cuda" else "dense"
    lines = []
    batches = None
    for path in args.checkpoints:
        for weights in ("ema", "raw"):
            model, cfg = load_model_from_checkpoint(Path(path), use_ema=weights == "ema", device=device,
                                                    attention=attention)
            if cfg.diffusion.objective != "ddpm":
                raise ValueError(f"{path}: a DDPM run is needed (the probe scores epsilon), got "
                                 f"diffusion.objective={cfg.diffusion.objective!r}")
            batches = batches or heldout_batches(cfg, args.batches, args.data)
            result = gap(model.eval(), batches, device)
            summary = "  ".join(f"{way} {sum(v['eps_mse'] for v in per_t.values()) / len(per_t):.4f} "
                                f"(t=950 {per_t[950]['eps_mse']:.4f}, x0 slope {per_t[950]['x0_slope']:.3f})"
                                for way, per_t in result.items())
            print(f"{path} {weights}: {summary}", flush=True)
            lines += [{"checkpoint": str(path), "weights": weights, "way": way, "t": t, **v}
                      for way, per_t in result.items() for t, v in per_t.items()]
            path_stds = trajectory(model, cfg.data.token_budget, device)
            final = path_stds.pop("final")
            lines += [{"checkpoint": str(path), "weights": weights, "way": "trajectory", "t": t, "x0_std": v}
                      for t, v in sorted(path_stds.items(), reverse=True)]
            lines.append({"checkpoint": str(path), "weights": weights, "way": "trajectory_final", "x0_std": final})
            print(f"{path} {weights}: x0 std along DDIM "
                  + ", ".join(f"t={t} {v:.3f}" for t, v in sorted(path_stds.items(), reverse=True)[::6])
                  + f"; samples {final:.3f}", flush=True)
    if batches:  # the held-out images' own spread, what the samples' should reach
        data = sum(per_image_std(b.tokens, b.layout) for b in batches) / len(batches)
        lines.append({"checkpoint": None, "weights": None, "way": "data", "x0_std": data})
        print(f"held-out images: per-image std {data:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
