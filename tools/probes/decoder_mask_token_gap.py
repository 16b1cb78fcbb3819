"""Probe: does a MaskDiT-style decoder lean on the mask tokens it only ever sees in training? (REPORT.md, decoder)

    PYTHONPATH=src python3 tools/probes/decoder_mask_token_gap.py CHECKPOINT [CHECKPOINT ...] [--batches 4]
        [--data FOLDER] [--out FILE.jsonl]

A checkpoint folder of a DDPM run with ``mask.design="decoder"`` (``maskfit train`` or ``maskfit experiment``;
its run folder's ``checkpoints/step_*``). For its EMA and raw weights, the epsilon MSE on held-out images of the
run's own config (``data.split="holdout"``: the project's split, never trained on; the run's crops and batching;
masks at the run's ratio), at t = 50, 250, 500, 750, 950 with noise fixed per (batch, t), under the run's precision
rule (bf16 autocast on a GPU, fp32 on a CPU), three ways:

- ``unmasked``: every token, no mask: what sampling runs;
- ``masked``: the training forward (encoder on the kept tokens, the learnable mask token at dropped positions),
  kept tokens scored (the training loss's epsilon term);
- ``full_encoder``: the encoder on every token as at sampling, then the mask token put at the dropped positions
  of the decoder's input; kept tokens scored.

``masked`` ~ ``full_encoder`` < ``unmasked`` says the sampling-time gap comes from the decoder's missing mask
tokens, not from the encoder's denser context. Each image counts once (mean over its tokens, then over images).
Prints one line per (checkpoint, weights): the mean over t of each way, and t = 950's; with --out, one JSON line
per (checkpoint, weights, way, t).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from maskfit.data.pipeline import build_training_data
from maskfit.diffusion.gaussian import GaussianDiffusion
from maskfit.models.transformer import _Stream, with_mask_tokens
from maskfit.runs import autocast_for, load_model_from_checkpoint, run_patch_size
from maskfit.tokens import segment_sum

TIMESTEPS = (50, 250, 500, 750, 950)
WAYS = ("unmasked", "masked", "full_encoder")


def heldout_batches(cfg, count: int, data_root: str | None):
    """``count`` batches of held-out images, built by the run's own pipeline (crops, batching, masks)."""
    data = dataclasses.replace(cfg.data, split="holdout", num_workers=0, root=data_root or cfg.data.root)
    held = dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train, seed=123))
    pipeline = build_training_data(held, run_patch_size(held))
    batches = [pipeline.next_batch(step) for step in range(count)]
    if any(b.mask is None for b in batches):
        raise ValueError("the run keeps every token (mask.keep_ratio 1): there is no mask token to probe")
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


def per_image_mean(per_token, counted, layout) -> float:
    """Mean over images of each image's mean over its counted tokens."""
    B = layout.num_images
    total = segment_sum(torch.where(counted, per_token, torch.zeros_like(per_token)), layout.seq_id, B)
    count = segment_sum(counted.float(), layout.seq_id, B)
    has = count > 0
    return float((total[has] / count[has]).mean())


@torch.no_grad()
def gap(model, batches, device) -> dict:
    """{way: {t: epsilon MSE}} over the batches."""
    diffusion = GaussianDiffusion()
    sums = {way: {t: 0.0 for t in TIMESTEPS} for way in WAYS}
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        layout, mask = batch.layout, batch.mask
        real = torch.ones(layout.num_tokens, dtype=torch.bool, device=device) if layout.valid is None else layout.valid
        kept = torch.zeros_like(real).index_fill(0, mask.index, True) & real
        channels = batch.tokens.shape[1]
        for t in TIMESTEPS:
            noise = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(1000 * i + t)).to(device)
            steps = torch.full((layout.num_images,), t, dtype=torch.long, device=device)
            x_t = diffusion.q_sample(batch.tokens, steps[layout.seq_id], noise)  # (T, C)
            with autocast_for("auto", device):  # bf16 on a GPU (FlashAttention needs it), fp32 on a CPU
                outputs = {
                    "unmasked": (model(x_t, steps, batch.y, layout), real),
                    "masked": (model(x_t, steps, batch.y, layout, mask=mask), kept),
                    "full_encoder": (full_encoder_forward(model, x_t, steps, batch.y, layout, mask), kept),
                }
            for way, (out, counted) in outputs.items():
                err = ((out[:, :channels].float() - noise) ** 2).mean(dim=1)  # (T,) the epsilon channels
                sums[way][t] += per_image_mean(err, counted, layout) / len(batches)
    return sums


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
            if cfg.mask.design != "decoder" or cfg.diffusion.objective != "ddpm":
                raise ValueError(f"{path}: a DDPM run with mask.design='decoder' is needed, got "
                                 f"{cfg.mask.design!r} / {cfg.diffusion.objective!r}")
            batches = batches or heldout_batches(cfg, args.batches, args.data)
            result = gap(model.eval(), batches, device)
            summary = "  ".join(f"{way} {sum(v.values()) / len(v):.4f} (t=950 {v[950]:.4f})" for way, v in result.items())
            print(f"{path} {weights}: {summary}", flush=True)
            lines += [{"checkpoint": str(path), "weights": weights, "way": way, "t": t, "eps_mse": v}
                      for way, per_t in result.items() for t, v in per_t.items()]
    if args.out:
        Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
