"""The published recipe, exactly: SwiGLU initialisation and the released FiT / FiTv2 weights.

The published layout below is written by hand from whlzy/FiT fit/model/fit_model.py and modules.py
(reference/fit.md §4.1-4.3), not derived from maskfit's mapping, so the two checks meet in the middle.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from maskfit.cli import main
from maskfit.models.transformer import FiT, SwiGLU, model_config
from maskfit.published import ROPE_BUFFERS, published_shapes, to_published
from maskfit.tokens import pack
from maskfit.train import load_model_from_checkpoint
from tests.test_model import EXPECTED_PARAMS, _random_images, _trained_like


# ---------------------------------------------------------------------------------------------------
# 1. SwiGLU initialisation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("FiT-tiny", {}),
        ("FiTv2-tiny", {}),
        ("FiT-tiny", {"mask_design": "decoder", "decoder_hidden": 32, "decoder_heads": 2}),  # decoder SwiGLU too
        ("FiT-B/2", {"depth": 1}),  # the real width d=768, h=3072, one block to keep it fast
        ("FiTv2-B/2", {"depth": 1}),  # d=768, h=2048
    ],
)
def test_each_swiglu_half_is_initialised_like_an_unfused_linear(preset, overrides):
    torch.manual_seed(0)
    model = FiT(model_config(preset, **overrides))
    swiglus = [m for m in model.modules() if isinstance(m, SwiGLU)]
    assert swiglus
    for ffn in swiglus:
        d, h = ffn.fc1.in_features, ffn.hidden
        reference = nn.Linear(d, h)  # the published W_g (or W_x): timm SwiGLU fc1_g / fc1_x
        nn.init.xavier_uniform_(reference.weight)
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(reference.weight)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        for half in ffn.fc1.weight.detach().chunk(2, dim=0):  # gate rows, value rows
            assert half.shape == reference.weight.shape
            assert half.abs().max() <= bound
            assert half.abs().max() > 0.97 * bound  # the whole-matrix init stops at sqrt((d+h)/(d+2h)) of it
            assert half.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
            assert half.std().item() == pytest.approx(reference.weight.std().item(), rel=0.04)
        assert torch.count_nonzero(ffn.fc1.bias) == 0  # published: every Linear bias starts at 0


# ---------------------------------------------------------------------------------------------------
# 2. Published state-dict layout
# ---------------------------------------------------------------------------------------------------

# Published configurations: (hidden d, depth, SwiGLU hidden h, AdaLN-LoRA rank r or None, output channels).
# FiT v1: use_swiglu_large (h = 4d), adaln_type 'normal', learn_sigma (8 channels). FiTv2: h = (4d * 2) // 3,
# adaln_type 'lora' with r = d / 4 plus global_adaLN_modulation, use_sit (4 channels).
PUBLISHED_CONFIGS = {
    "FiT-B/2": (768, 12, 3072, None, 8),
    "FiT-XL/2": (1152, 28, 4608, None, 8),
    "FiTv2-B/2": (768, 15, 2048, 192, 4),
    "FiTv2-XL/2": (1152, 36, 3072, 288, 4),
    "FiTv2-3B/2": (2304, 40, 6144, 576, 4),
}


def published_layout(d, depth, h, r, c_out, patch=2, c_in=4, classes=1000):
    """Key -> shape of the published FiT's state_dict() (nn.Linear weights are (out, in))."""
    keys = {
        "x_embedder.proj.weight": (d, patch * patch * c_in),  # PatchEmbedder.proj
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),  # TimestepEmbedder: Linear, SiLU, Linear
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),  # + the CFG null class (dropout 0.1 > 0)
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),  # SiLU, Linear(d, 2d) also in v2
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (patch * patch * c_out, d),
        "final_layer.linear.bias": (patch * patch * c_out,),
    }
    if r is not None:
        keys["global_adaLN_modulation.1.weight"] = (6 * d, d)
        keys["global_adaLN_modulation.1.bias"] = (6 * d,)
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1_g.weight": (h, d), b + "mlp.fc1_g.bias": (h,),
            b + "mlp.fc1_x.weight": (h, d), b + "mlp.fc1_x.bias": (h,),
            b + "mlp.fc2.weight": (d, h), b + "mlp.fc2.bias": (d,),
        })
        if r is None:
            keys.update({b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,)})
        else:
            keys.update({
                b + "adaLN_modulation.1.weight": (r, d), b + "adaLN_modulation.1.bias": (r,),
                b + "adaLN_modulation.2.weight": (6 * d, r), b + "adaLN_modulation.2.bias": (6 * d,),
            })
    return keys


@pytest.mark.parametrize("preset", sorted(PUBLISHED_CONFIGS))
def test_importer_expects_the_published_keys_and_shapes(preset):
    layout = published_layout(*PUBLISHED_CONFIGS[preset])
    # The hand-written layout is itself pinned by the papers' parameter counts (reference/fit.md §4.3).
    assert sum(math.prod(s) for s in layout.values()) == EXPECTED_PARAMS[preset]
    assert published_shapes(model_config(preset)) == layout


# ---------------------------------------------------------------------------------------------------
# 3. Import through the CLI
# ---------------------------------------------------------------------------------------------------


def test_exported_swiglu_computes_the_published_formula():
    # fc1_g and fc1_x have one shape, so only the computation tells gate from value (a round trip cannot):
    # timm's SwiGLU is fc2(SiLU(fc1_g x) * fc1_x x).
    torch.manual_seed(0)
    model = _trained_like(FiT(model_config("FiTv2-tiny")))
    w = to_published(model.state_dict())
    x = torch.randn(5, 64)
    gate = F.linear(x, w["blocks.1.mlp.fc1_g.weight"], w["blocks.1.mlp.fc1_g.bias"])
    value = F.linear(x, w["blocks.1.mlp.fc1_x.weight"], w["blocks.1.mlp.fc1_x.bias"])
    expected = F.linear(F.silu(gate) * value, w["blocks.1.mlp.fc2.weight"], w["blocks.1.mlp.fc2.bias"])
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[1].ffn(x), expected)


def _outputs(model, preset):
    grids = [(4, 4), (2, 6), (3, 5)]
    batch = pack(_random_images(grids, model.cfg.token_dim, seed=1), grids, torch.tensor([0, 5, 9]))
    t = torch.tensor([10.0, 500.0, 999.0]) if preset.startswith("FiT-") else torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        return model(batch.tokens, t, batch.y, batch.layout)


def _import(path, preset, out, *extra):
    return main(["import-published", str(path), "--preset", preset, "--out", str(out), *extra])


@pytest.mark.parametrize("preset, suffix", [("FiT-tiny", ".safetensors"), ("FiTv2-tiny", ".bin")])
def test_round_trip_through_the_published_layout_gives_the_same_outputs(tmp_path, preset, suffix):
    torch.manual_seed(0)
    model = _trained_like(FiT(model_config(preset))).eval()
    published = to_published(model.state_dict())
    published[ROPE_BUFFERS[2]] = torch.zeros(256, 8)  # a RoPE table in the file is skipped by name
    path = tmp_path / f"published{suffix}"
    save_file(published, str(path)) if suffix == ".safetensors" else torch.save(published, path)
    assert _import(path, preset, tmp_path / "run") == 0
    for use_ema in (True, False):
        loaded, run_cfg = load_model_from_checkpoint(tmp_path / "run", use_ema=use_ema)
        assert torch.equal(_outputs(loaded, preset), _outputs(model, preset))
    assert run_cfg.diffusion.objective == ("ddpm" if preset == "FiT-tiny" else "flow")
    assert run_cfg.data.token_budget == 256


def test_model_and_ema_entries_go_to_their_files_and_key_picks_one(tmp_path):
    preset = "FiTv2-tiny"
    torch.manual_seed(0)
    plain, ema = (_trained_like(FiT(model_config(preset)), seed=s).eval() for s in (1, 2))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": to_published(plain.state_dict()), "ema": to_published(ema.state_dict()), "steps": 7}, path)
    assert _import(path, preset, tmp_path / "auto") == 0
    assert torch.equal(_outputs(load_model_from_checkpoint(tmp_path / "auto")[0], preset), _outputs(ema, preset))
    assert torch.equal(
        _outputs(load_model_from_checkpoint(tmp_path / "auto", use_ema=False)[0], preset), _outputs(plain, preset)
    )
    assert _import(path, preset, tmp_path / "picked", "--key", "model") == 0
    assert torch.equal(_outputs(load_model_from_checkpoint(tmp_path / "picked")[0], preset), _outputs(plain, preset))
    assert _import(path, preset, tmp_path / "bad", "--key", "steps") == 2  # not a state dict


def test_mismatch_error_names_missing_unexpected_and_wrong_shape_keys(tmp_path, capsys):
    published = to_published(FiT(model_config("FiT-tiny")).state_dict())
    published["blocks.0.attn.q_norm.weight"] = torch.ones(16)  # a LayerNorm with weights: not our FiTv2
    path = tmp_path / "v1.safetensors"
    save_file(published, str(path))
    assert _import(path, "FiTv2-tiny", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "preset 'FiTv2-tiny'" in err
    assert "missing" in err and "global_adaLN_modulation.1.weight (384, 64)" in err
    assert "blocks.0.adaLN_modulation.2.weight (384, 16)" in err  # the LoRA up-projection v1 lacks
    assert "unexpected 1: blocks.0.attn.q_norm.weight (16,)" in err
    assert "blocks.0.adaLN_modulation.1.weight is (384, 64), FiTv2-tiny has (16, 64)" in err
    assert "final_layer.linear.weight is (32, 64), FiTv2-tiny has (16, 64)" in err  # learned sigma: 2x channels
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_import_refuses_a_folder_with_checkpoints(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file(to_published(FiT(model_config("FiT-tiny")).state_dict()), str(path))
    assert _import(path, "FiT-tiny", tmp_path / "run") == 0
    assert _import(path, "FiT-tiny", tmp_path / "run") == 2
    assert "already holds checkpoints" in capsys.readouterr().err
