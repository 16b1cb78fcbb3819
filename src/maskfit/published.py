"""The released FiT / FiTv2 weights (github whlzy/FiT, ``fit/model/fit_model.py``) as maskfit checkpoints.

``maskfit import-published CKPT --preset NAME --out DIR`` reads a published state dict, checks it key by
key and shape by shape against the preset, renames it to our modules and writes a checkpoint folder that
``maskfit sample`` loads. ``to_published`` is the inverse (used by the tests' round trip).

Names, published -> ours (every other parameter has the same name in both):
  x_embedder.proj.*                     -> x_embedder.*            PatchEmbedder wraps one Linear
  y_embedder.embedding_table.weight     -> y_embedder.weight       1001 rows; row 1000 is the null class
  global_adaLN_modulation.1.*           -> global_adaLN.*          FiTv2 only; index 0 is the SiLU
  blocks.N.adaLN_modulation.1.*         -> blocks.N.adaLN.*        FiT: SiLU, Linear(d, 6d)
  blocks.N.adaLN_modulation.{1,2}.*     -> blocks.N.adaLN.{0,1}.*  FiTv2 AdaLN-LoRA: Linear(d, r), Linear(r, 6d)
  blocks.N.mlp.fc1_g.*, mlp.fc1_x.*     -> blocks.N.ffn.fc1.*      fused (2h, d): rows [0, h) gate, [h, 2h) value
  blocks.N.mlp.fc2.*                    -> blocks.N.ffn.fc2.*
  final_layer.adaLN_modulation.1.*      -> final_layer.adaLN.*
Same names: t_embedder.mlp.{0,2}.*, blocks.N.attn.qkv.*, blocks.N.attn.proj.*, final_layer.linear.*.
No parameters on either side: the LayerNorms (norm1, norm2, norm_final, FiTv2's q_norm / k_norm are
``elementwise_affine=False``). A file with LayerNorm weights (``qk_norm_weight=True``) is refused as unexpected.

Published buffers with no counterpart, skipped by name (``ROPE_BUFFERS``): the RoPE tables of
``rel_pos_embed`` (freqs_h, freqs_w and their cached tables). They are registered non-persistent, so a
``state_dict()`` has none, but a file that holds them loads: we compute RoPE from each token's position.

Renaming is enough for equal outputs because the computations agree (tests/test_published.py checks a
round trip): token values in (c, p1, p2) order, qkv split as (3, heads, head_dim), RoPE with the row half
first and interleaved pairs, the conditioning SiLU(t_emb + y_emb) fed to every modulation Linear, and the
SwiGLU as SiLU(fc1_g x) * fc1_x x (timm).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maskfit.models.transformer import FiT, ModelConfig, model_config

ROPE_BUFFERS = (
    "rel_pos_embed.freqs_h",
    "rel_pos_embed.freqs_w",
    "rel_pos_embed.freqs_h_cached",
    "rel_pos_embed.freqs_w_cached",
)

# (pattern on our key, published replacement); the first that matches wins, so LoRA's ".0." / ".1."
# come before the plain adaLN rule.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^x_embedder\.", "x_embedder.proj."),
    (r"^y_embedder\.", "y_embedder.embedding_table."),
    (r"^global_adaLN\.", "global_adaLN_modulation.1."),
    (r"^blocks\.(\d+)\.adaLN\.0\.", r"blocks.\1.adaLN_modulation.1."),
    (r"^blocks\.(\d+)\.adaLN\.1\.", r"blocks.\1.adaLN_modulation.2."),
    (r"^blocks\.(\d+)\.adaLN\.", r"blocks.\1.adaLN_modulation.1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"blocks.\1.mlp.fc2."),
    (r"^final_layer\.adaLN\.", "final_layer.adaLN_modulation.1."),
)
_FUSED_FC1 = re.compile(r"^blocks\.(\d+)\.ffn\.fc1\.(weight|bias)$")

# Where a checkpoint file may keep its state dict when it is not the top level (accelerate/DiT habits).
STATE_KEYS = ("ema", "model", "state_dict")


def published_names(key: str) -> tuple[str, ...]:
    """Our state-dict key -> the published key(s) it is made of: two for the fused SwiGLU fc1 (gate, value)."""
    fused = _FUSED_FC1.match(key)
    if fused:
        block, kind = fused.groups()
        return (f"blocks.{block}.mlp.fc1_g.{kind}", f"blocks.{block}.mlp.fc1_x.{kind}")
    for pattern, replacement in _RENAMES:
        renamed, n = re.subn(pattern, replacement, key)
        if n:
            return (renamed,)
    return (key,)


def _check_importable(cfg: ModelConfig) -> None:
    if cfg.mask_design != "plain":
        raise ValueError(
            f"mask_design={cfg.mask_design!r} adds modules the published FiT has no weights for; "
            "import into a plain preset (mask_design='plain')"
        )


def _our_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: the 3B model costs nothing
        model = FiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def published_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes the published model of this config has."""
    _check_importable(cfg)
    out = {}
    for key, shape in _our_shapes(cfg).items():
        names = published_names(key)
        for name in names:  # a fused matrix splits into equal row blocks
            out[name] = (shape[0] // len(names), *shape[1:])
    return out


def to_published(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> the published layout (independent contiguous tensors, ready for safetensors)."""
    out = {}
    for key, value in state.items():
        names = published_names(key)
        for name, part in zip(names, value.detach().chunk(len(names), dim=0)):
            out[name] = part.contiguous().clone()
    return out


def _natural(key: str) -> list:
    # blocks.2 before blocks.10 in error messages
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _listing(keys: list[str], describe, limit: int = 8) -> str:
    keys = sorted(keys, key=_natural)
    shown = ", ".join(describe(k) for k in keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown


def check_published(state: dict[str, Tensor], cfg: ModelConfig, preset: str) -> None:
    """One error listing every missing, unexpected and wrongly shaped key (RoPE buffers aside)."""
    expected = published_shapes(cfg)
    given = {k: tuple(v.shape) for k, v in state.items() if k not in ROPE_BUFFERS}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and given[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: " + _listing(missing, lambda k: f"{k} {expected[k]}"))
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: " + _listing(unexpected, lambda k: f"{k} {given[k]}"))
    if wrong:
        parts.append(f"wrong shape {len(wrong)}: " + _listing(
            wrong, lambda k: f"{k} is {given[k]}, {preset} has {expected[k]}"))
    raise ValueError(
        f"the published weights do not fit preset {preset!r} ({'; '.join(parts)}); pass the preset the "
        "checkpoint was trained as (the releases are FiT-XL/2, FiTv2-XL/2 and FiTv2-3B/2)"
    )


def from_published(state: dict[str, Tensor], cfg: ModelConfig, preset: str) -> dict[str, Tensor]:
    """A published state dict -> ours, fp32 (as every maskfit checkpoint), after check_published."""
    check_published(state, cfg, preset)
    out = {}
    for key in _our_shapes(cfg):
        parts = [state[name] for name in published_names(key)]
        out[key] = (torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]).to(torch.float32).contiguous()
    return out


def read_checkpoint_file(path: Path) -> Any:
    """The object in a .safetensors file, or a torch pickle loaded with weights_only=True (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError:
            # The published loader (fit/utils/eval_utils.py init_from_ckpt) falls back to torch.load for
            # pickles saved under a .safetensors name, so such files exist; the same fallback here.
            pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors have no common base: one message for every unreadable file
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ValueError(
            f"{path} is neither a safetensors file nor a torch checkpoint that loads with weights_only=True "
            f"(tensors and plain containers only): {type(exc).__name__}: {first_line}"
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def select_state_dicts(obj: Any, key: str, path: Path) -> tuple[dict, dict, str]:
    """(weights for model.safetensors, weights for ema.safetensors, where they came from) of a loaded file.

    key "auto": the top level when it is a state dict; 'model' and 'ema' each to its file when both are
    there; otherwise the first of STATE_KEYS present. Any other key: that entry, written to both files.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if key == "auto":
        if _is_state_dict(obj):
            return obj, obj, "the file's top level"
        if _is_state_dict(obj.get("model")) and _is_state_dict(obj.get("ema")):
            return obj["model"], obj["ema"], "'model' (model.safetensors) and 'ema' (ema.safetensors)"
        key = next((k for k in STATE_KEYS if k in obj), "")
        if not key:
            raise ValueError(
                f"{path} is no state dict and has none of the keys {STATE_KEYS}; its keys are "
                f"{sorted(map(str, obj))[:10]}: pass --key NAME"
            )
    if key not in obj:
        raise ValueError(f"--key {key!r} is not in {path}; its keys are {sorted(map(str, obj))[:10]}")
    if not _is_state_dict(obj[key]):
        raise ValueError(f"{path}[{key!r}] is not a state dict (a dict of tensors); pass another --key")
    return obj[key], obj[key], repr(key)


def _module_with(cfg: ModelConfig, state: dict[str, Tensor]) -> FiT:
    with torch.device("meta"):
        model = FiT(cfg)
    model.load_state_dict(state, assign=True)  # the tensors become the parameters: no second copy
    return model


def import_published(
    checkpoint: Path, preset: str, out: Path, key: str = "auto", token_budget: int = 256, vae_path: str = ""
) -> dict:
    """Write ``out/checkpoints/step_0000000`` (+ ``latest``, ``out/config.json``) from a published file."""
    from maskfit.checkpoint import latest_checkpoint, save_checkpoint
    from maskfit.config import DataConfig, DiffusionConfig, ModelSection, RunConfig, TrainConfig, save_config, to_dict

    from maskfit.paths import check_output_dir

    out = check_output_dir(out, "--out", "run folder")
    if latest_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds checkpoints ({latest_checkpoint(out)}); pass an empty or new --out")
    cfg = model_config(preset)
    plain, ema, source = select_state_dicts(read_checkpoint_file(checkpoint), key, checkpoint)
    model = _module_with(cfg, from_published(plain, cfg, preset))
    ema_model = model if ema is plain else _module_with(cfg, from_published(ema, cfg, preset))
    # FiT v1 learns Σ under DDPM; FiTv2 predicts a rectified-flow velocity (reference/fit.md §0).
    run_cfg = RunConfig(
        model=ModelSection(preset=preset),
        # Published training data: ImageNet latents of sd-vae-ft-ema at token_budget tokens per image (256;
        # 1024 for the high-resolution FiTv2 fine-tunes), which sets the RoPE training grid when sampling.
        data=DataConfig(source="latents", token_budget=token_budget, vae_path=vae_path),
        diffusion=DiffusionConfig(objective="ddpm" if cfg.learn_sigma else "flow"),
        train=TrainConfig(out_dir=str(out)),
    )
    full = to_dict(run_cfg)
    full["resolved_model"] = to_dict(cfg)
    provenance = {"imported_from": str(Path(checkpoint).resolve()), "weights": source, "preset": preset}
    save_config(run_cfg, out / "config.json")
    folder = save_checkpoint(out, 0, model, ema_model, None, {"import": provenance}, full)
    return {"checkpoint": str(folder), **provenance}


def add_import_arguments(p) -> None:
    p.add_argument("checkpoint", help="published .pt/.bin/.safetensors file (whlzy/FiT release)")
    p.add_argument("--preset", required=True, help="the maskfit preset it was trained as, e.g. FiTv2-XL/2")
    p.add_argument("--out", required=True, help="new run folder; `maskfit sample OUT` then uses it")
    p.add_argument("--key", default="auto",
                   help="entry holding the state dict (e.g. ema, model); 'auto': the top level, else "
                        "'model' and 'ema' each to its file, else the first of ema|model|state_dict")
    p.add_argument("--token-budget", type=int, default=256,
                   help="tokens per image it was trained at: 256, or 1024 for the FiTv2 high-resolution fine-tunes")
    p.add_argument("--vae-path", default="", help="local sd-vae-ft-ema folder to record for sampling")


def run_import(args) -> int:
    summary = import_published(
        Path(args.checkpoint), args.preset, Path(args.out), key=args.key, token_budget=args.token_budget,
        vae_path=args.vae_path,
    )
    print(json.dumps(summary, indent=2))
    return 0
