"""How fast a run trains: useful FLOPs of a step, the device's peak, and time lost to compilation.

One accounting for ``maskfit train`` (logged every ``log_every`` steps) and ``maskfit bench``:

- :func:`design_flops`: training FLOPs of one image for a masked design, from
  :func:`maskfit.models.transformer.flops_per_image` (its docstring states the convention). Only real
  (kept) tokens count: padding and the token budget's dummy segment are not useful work.
- :class:`FlopModel`: the same number for a whole step from five sums the loader workers compute
  (:class:`maskfit.data.pipeline.StepInfo`), so the main process does no per-image work. A design's
  FLOPs are a quadratic in the kept count n_k and the full count n_f with no cross term (linear layers
  are linear in the token count, attention quadratic), so ``a0 + a1 n_k + a2 n_k^2 + a3 n_f + a4 n_f^2``
  fitted at five points is exact (tested against :func:`design_flops`).
- MFU = useful FLOP/s / the device's dense bf16 peak (:func:`peak_tflops`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

# Dense bf16 peak, TFLOP/s (no sparsity): H100 SXM and H200 share the GH100 compute (989.4).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def peak_tflops(dev: torch.device) -> Optional[float]:
    """Dense bf16 peak of the device (None where unknown, e.g. a CPU)."""
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def design_flops(cfg, n_full: int, n_kept: int) -> float:
    """Training FLOPs of one image (3 x forward) for a masked design; n_kept == n_full when unmasked."""
    from maskfit.models.transformer import flops_per_image

    fw = flops_per_image(cfg, n_kept)
    d = cfg.hidden_size

    def block(c, n):  # one backbone-style block of config c on n tokens
        plain = replace(c, mask_design="plain", decoder_pos_embed=False)  # the embedding's add is not counted
        return flops_per_image(replace(plain, depth=1), n) - flops_per_image(replace(plain, depth=0), n)

    if cfg.mask_design == "mixer":
        fw += cfg.mixer_depth * block(cfg, n_full)
    elif cfg.mask_design == "side_interp" and n_kept < n_full:
        extra = cfg.side_decode_depth * (block(cfg, n_full) - block(cfg, n_kept)) + block(cfg, n_full)
        fw += extra
    elif cfg.mask_design == "decoder":
        dd = cfg.decoder_hidden
        dec = replace(cfg, hidden_size=dd, num_heads=cfg.decoder_heads, ffn_hidden=(4 * dd * 2) // 3, adaln="full")
        fw += cfg.decoder_depth * block(dec, n_full) + 2 * n_full * d * dd
    return 3.0 * fw


@dataclass(frozen=True)
class TokenSums:
    """Per-step sums over the real images of a batch (the dummy padding segment is no image)."""

    images: int = 0
    kept: int = 0  # backbone tokens (kept tokens when masked, every token otherwise)
    kept_sq: int = 0  # sum of squared per-image backbone counts (attention is quadratic)
    full: int = 0  # full-grid tokens
    full_sq: int = 0

    def __add__(self, other: "TokenSums") -> "TokenSums":
        return TokenSums(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, int, int, int, int]:
        return (self.images, self.kept, self.kept_sq, self.full, self.full_sq)


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs of a step from its :class:`TokenSums`: exact for every design (see module doc).

    masked: (a0, a1, a2, a3, a4) of ``a0 + a1 n_k + a2 n_k^2 + a3 n_f + a4 n_f^2`` per image, fitted where
    n_k < n_f; unmasked: (c0, c1, c2) of ``c0 + c1 n + c2 n^2`` per image at n_k = n_f = n (the
    side-interpolator skips its extra blocks when nothing is dropped, so the two are fitted apart).
    """

    masked: tuple[float, ...]
    unmasked: tuple[float, ...]

    @classmethod
    def of(cls, cfg) -> "FlopModel":
        points = [(16, 4), (16, 8), (16, 12), (32, 8), (64, 8)]  # (n_full, n_kept), n_kept < n_full
        rows = [[1.0, nk, nk * nk, nf, nf * nf] for nf, nk in points]
        masked = _solve(rows, [design_flops(cfg, nf, nk) for nf, nk in points])
        sizes = [4, 16, 64]
        unmasked = _solve([[1.0, n, n * n] for n in sizes], [design_flops(cfg, n, n) for n in sizes])
        return cls(masked, unmasked)

    def step_flops(self, sums: TokenSums, masked: bool) -> float:
        """FLOPs of a step whose images keep ``sums.kept`` of ``sums.full`` tokens (masked) or all of them."""
        if masked:
            a0, a1, a2, a3, a4 = self.masked
            return a0 * sums.images + a1 * sums.kept + a2 * sums.kept_sq + a3 * sums.full + a4 * sums.full_sq
        c0, c1, c2 = self.unmasked
        return c0 * sums.images + c1 * sums.full + c2 * sums.full_sq


def _solve(rows: list[list[float]], rhs: list[float]) -> tuple[float, ...]:
    coef = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return tuple(float(c) for c in coef)


def compile_stats() -> tuple[int, float]:
    """(graphs compiled, seconds spent compiling) by torch.compile in this process so far.

    Graphs count every frame Dynamo compiled (a recompile for a new shape is one more); seconds add
    Dynamo's forward compilations and AOTAutograd's backward compilations, which run at the first
    backward of each graph. Both come from Dynamo's own counters, so they cost nothing to read.
    """
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except Exception:  # a torch without Dynamo
        return 0, 0.0
    graphs = int(counters["stats"].get("unique_graphs", 0))
    seconds = sum(sum(v) for k, v in compilation_time_metrics.items()
                  if k == "_compile.compile_inner" or "bw_compiler" in k)
    return graphs, float(seconds)
