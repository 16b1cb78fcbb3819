"""The high-resolution post-training stage (FiTv2 §IV-D, §V-E): base weights, the trained subset, per-image RoPE."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskfit import checkpoint as ckpt_io
from maskfit.cli import main
from maskfit.config import config_from_dict, load_config, to_dict
from maskfit.finetune import in_hr_subset, prepare_model, rope_train_grid, select_trainable, training_rope
from maskfit.models.rope import RopeExtrapolation, rope_tables
from maskfit.models.transformer import FiT, model_config
from maskfit.tokens import pack
from maskfit.train import train
from tests.test_train import tiny_run

TINY = dict(patch_size=4, in_channels=3, num_classes=4)  # what tiny_run's synthetic pixels give FiTv2-tiny


def random_model(seed: int, **overrides) -> FiT:
    """A tiny FiTv2 with every weight random (fresh init zeroes biases, gates and the output)."""
    torch.manual_seed(seed)
    model = FiT(model_config("FiTv2-tiny", **{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def save_base(run_dir: Path, model: FiT, ema: FiT, token_budget: int = 16) -> Path:
    """A base run folder with one checkpoint holding ``model`` and ``ema`` (weights differ, so the test can tell them apart)."""
    cfg = config_from_dict({"model": {"preset": "FiTv2-tiny", "overrides": TINY}, "data": {"token_budget": token_budget}})
    config = {**to_dict(cfg), "resolved_model": to_dict(model.cfg)}
    return ckpt_io.save_checkpoint(run_dir, 5, model, ema, None, {}, config)


def stage(**finetune):
    return config_from_dict({"finetune": finetune})


# ----------------------------------------------------------------------------------------------------
# The trained subset
# ----------------------------------------------------------------------------------------------------


def test_hr_subset_is_the_published_14_15_percent_of_fitv2_xl2(monkeypatch):
    # Shapes only: skip the initialisers (normal_ on a meta tensor imports torch's reference ops: seconds).
    monkeypatch.setattr(FiT, "initialize_weights", lambda self: None)
    monkeypatch.setattr(torch.nn.Embedding, "reset_parameters", lambda self: None)
    with torch.device("meta"):  # no memory
        model = FiT(model_config("FiTv2-XL/2"))
    params = select_trainable(model, "hr_subset")
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in params)
    assert (trained, total) == (94_961_680, 671_045_776)  # reference/fit.md §4.2
    assert f"{100 * trained / total:.2f}" == "14.15"  # FiTv2 §V-E
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trained
    outside = {n for n in names if not n.startswith("blocks.")}
    assert outside == {
        "x_embedder.weight", "x_embedder.bias", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.bias",
        "global_adaLN.weight", "global_adaLN.bias", "final_layer.adaLN.weight", "final_layer.adaLN.bias",
        "final_layer.linear.weight", "final_layer.linear.bias",
    }
    for i in (0, 35):
        in_block = {n.removeprefix(f"blocks.{i}.") for n in names if n.startswith(f"blocks.{i}.")}
        assert in_block == {
            "attn.qkv.bias", "attn.proj.bias", "ffn.fc1.bias", "ffn.fc2.bias",
            "adaLN.0.weight", "adaLN.0.bias", "adaLN.1.weight", "adaLN.1.bias",
        }
    assert not model.y_embedder.weight.requires_grad and not model.blocks[3].attn.qkv.weight.requires_grad


def test_hr_stage_trains_the_subset_and_leaves_the_frozen_weights_bit_identical(tmp_path):
    base = train(tiny_run(tmp_path / "base", steps=2), progress=False)
    base_ema = load_file(str(ckpt_io.latest_checkpoint(base.run_dir) / "ema.safetensors"))
    hr = tiny_run(
        tmp_path / "hr", steps=2, data={"token_budget": 64}, train={"ckpt_every": 1},
        finetune={"init_from": str(base.run_dir), "trainable": "hr_subset", "hr_subset_init": "loaded",
                  "rope": "vision_ntk", "rope_base_grid": 4},
    )
    first = train(hr, progress=False, stop_after=1)
    shutil.rmtree(base.run_dir)  # a resume reads its own checkpoint, never the base run again
    result = train(hr, progress=False)
    assert (first.step, result.step) == (1, 2)
    ckpt = ckpt_io.latest_checkpoint(result.run_dir)
    after = load_file(str(ckpt / "model.safetensors"))
    subset = sorted(n for n in after if in_hr_subset(n))
    frozen = sorted(n for n in after if not in_hr_subset(n))
    assert frozen and subset
    for name in frozen:
        assert torch.equal(after[name], base_ema[name]), name
    changed = [n for n in subset if not torch.equal(after[n], base_ema[n])]
    assert set(changed) == set(subset)  # every trained tensor moved (biases, adaLN, x_embedder, final layer)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert len(optimizer["param_groups"][0]["params"]) == len(subset)  # frozen weights are not in the optimizer
    assert len(optimizer["state"]) == len(subset)
    # Sampling scales RoPE from the stage's L0 (4 here), not from its 8 x 8 budget grid.
    out = tmp_path / "samples"
    assert main(["sample", str(result.run_dir), "-n", "1", "--steps", "1", "--extrapolation", "vision_ntk",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "sampling.json").read_text())["options"]["rope"]["train_grid"] == [4, 4]


# ----------------------------------------------------------------------------------------------------
# Base weights
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ema", "model"])
def test_init_from_loads_the_chosen_weights_of_the_base_run(tmp_path, which):
    weights, ema = random_model(1), random_model(2)
    save_base(tmp_path / "base", weights, ema)
    model = random_model(3)
    params = prepare_model(model, stage(init_from=str(tmp_path / "base"), init_weights=which), resuming=False)
    source = ema if which == "ema" else weights
    for (name, p), (_, q) in zip(model.named_parameters(), source.named_parameters()):
        assert torch.equal(p, q), name
    assert len(params) == len(list(model.parameters())) and all(p.requires_grad for p in params)


def test_init_from_is_skipped_on_resume(tmp_path):
    model = random_model(3)
    before = [p.clone() for p in model.parameters()]
    prepare_model(model, stage(init_from=str(tmp_path / "gone")), resuming=True)  # would fail if it were read
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_init_from_another_architecture_is_refused_naming_keys_and_shapes(tmp_path):
    save_base(tmp_path / "base", random_model(1), random_model(2))
    deeper = FiT(model_config("FiTv2-tiny", **TINY, depth=3))
    with pytest.raises(ValueError, match=r"finetune.init_from=.*preset 'FiTv2-tiny'.*missing \['blocks\.2\.adaLN"):
        prepare_model(deeper, stage(init_from=str(tmp_path / "base")), resuming=False)
    wider = FiT(model_config("FiTv2-tiny", **{**TINY, "ffn_hidden": 96}))
    with pytest.raises(ValueError, match=r"shape blocks\.0\.ffn\.fc1\.bias: \(256,\) vs \(192,\)"):
        prepare_model(wider, stage(init_from=str(tmp_path / "base")), resuming=False)
    with pytest.raises(FileNotFoundError, match="finetune.init_from='nowhere' does not exist"):
        prepare_model(deeper, stage(init_from="nowhere"), resuming=False)


@pytest.mark.parametrize("subset_init", ["reinit", "loaded"])
def test_hr_subset_init_reinit_keeps_the_fresh_init_and_loaded_takes_the_base(tmp_path, subset_init):
    ema = random_model(2)
    save_base(tmp_path / "base", random_model(1), ema)
    torch.manual_seed(7)
    model = FiT(model_config("FiTv2-tiny", **TINY))
    fresh = {n: p.clone() for n, p in model.named_parameters()}
    cfg = stage(init_from=str(tmp_path / "base"), trainable="hr_subset", hr_subset_init=subset_init)
    params = prepare_model(model, cfg, resuming=False)
    base = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        expected = fresh[name] if subset_init == "reinit" and in_hr_subset(name) else base[name]
        assert torch.equal(p, expected), name
        assert p.requires_grad == in_hr_subset(name)
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if in_hr_subset(n)}
    if subset_init == "reinit":  # the released code's starting point: identity blocks, zero output
        assert not model.final_layer.linear.weight.any() and not model.blocks[0].attn.qkv.bias.any()


def test_stage_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="trainable='hr_subset'.*set finetune.init_from"):
        stage(trainable="hr_subset")
    with pytest.raises(ValueError, match="finetune.rope='vision-ntk' is not one of"):
        stage(rope="vision-ntk")
    save_base(tmp_path / "base", random_model(1), random_model(2), token_budget=16)  # a 4 x 4 training grid
    with pytest.raises(ValueError, match="trained on a 4x4 token grid.*set finetune.rope_base_grid=4"):
        prepare_model(random_model(3), stage(init_from=str(tmp_path / "base"), rope="vision_ntk"), resuming=False)


def test_shipped_hr_configs_are_the_published_stage():
    root = Path(__file__).parent.parent / "configs"
    for name, preset in (("fitv2_xl2_hr_imagenet.toml", "FiTv2-XL/2"), ("fitv2_b2_hr_imagenet.toml", "FiTv2-B/2")):
        cfg = load_config(root / name)
        f = cfg.finetune
        assert (cfg.model.preset, cfg.data.token_budget, cfg.optim.lr, cfg.optim.warmup_steps) == (preset, 1024, 1e-4, 0)
        assert (f.init_weights, f.trainable, f.hr_subset_init, f.rope, f.rope_base_grid) == (
            "ema", "hr_subset", "reinit", "vision_ntk", 16)
        assert rope_train_grid(cfg) == (16, 16)  # sampling scales RoPE from L0, not from the 32 x 32 budget grid
    assert rope_train_grid(config_from_dict({"data": {"token_budget": 1024}})) == (32, 32)


# ----------------------------------------------------------------------------------------------------
# Per-image RoPE at training
# ----------------------------------------------------------------------------------------------------


def test_training_rope_is_the_published_online_decoupled_ntk():
    """s_a = max(L_a / 16, 1) per axis of each image, b_a = b s_a^(m/(m-2)), m = D_h/2 (ntk-aware, decouple)."""
    rope = training_rope(stage(rope="vision_ntk", rope_base_grid=16).finetune)
    grids = [(32, 16), (8, 24)]  # 512 x 256 px: s = (2, 1); 128 x 384 px: s = (1 clamped, 1.5)
    batch = pack([torch.zeros(h * w, 16) for h, w in grids], grids, torch.tensor([0, 1]))
    lay = batch.layout
    head_dim, m = 72, 36
    tables = rope_tables(lay.pos, lay.seq_id, lay.grid, head_dim, rope, dtype=torch.float64)
    for image, scales in enumerate([(2.0, 1.0), (1.0, 1.5)]):
        token = int(lay.cu_seqlens[image]) + lay.grid[image, 1].item() + 1  # position (1, 1): angles = frequencies
        i = torch.arange(m // 2, dtype=torch.float64)
        freqs = [(1e4 * s ** (m / (m - 2))) ** (-2 * i / m) for s in scales]  # (m/2,) per axis
        expected = torch.cat(freqs).repeat_interleave(2).cos()
        torch.testing.assert_close(tables.cos[token], expected, rtol=0, atol=1e-12)
    # Known value (reference/fit.md §3.5): the new base at s = 2 for XL is 20832.
    assert round(1e4 * 2.0 ** (m / (m - 2))) == 20832


def test_packed_batch_scales_each_image_from_its_own_size():
    """Each image of a packed stream gets the output it gets alone: its RoPE scale is its own, not the batch's."""
    model = random_model(4).eval()
    prepare_model(model, stage(rope="vision_ntk", rope_base_grid=4), resuming=False)
    grids = [(8, 4), (3, 6), (4, 4)]  # scales (2, 1), (1, 1.5), (1, 1): the last is within L0 x L0
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(h * w, model.cfg.token_dim, generator=g) for h, w in grids]
    labels, t = torch.tensor([0, 1, 2]), torch.tensor([0.3, 0.6, 0.8])
    with torch.no_grad():
        batch = pack(tokens, grids, labels)
        packed = model(batch.tokens, t, batch.y, batch.layout)  # rope=None: the stage's per-image VisionNTK
        for b, grid in enumerate(grids):
            alone_batch = pack([tokens[b]], [grid], labels[b : b + 1])
            alone = model(alone_batch.tokens, t[b : b + 1], alone_batch.y, alone_batch.layout)
            segment = packed[batch.layout.cu_seqlens[b] : batch.layout.cu_seqlens[b + 1]]
            torch.testing.assert_close(segment, alone, rtol=1e-5, atol=1e-5)
            plain = model(alone_batch.tokens, t[b : b + 1], alone_batch.y, alone_batch.layout, rope=RopeExtrapolation())
            scaled = not torch.allclose(alone, plain, atol=1e-4)
            assert scaled == (grid != (4, 4)), grid  # clamped at 1: an image within 4 x 4 keeps plain RoPE


def test_the_kept_fraction_a_run_attended_over_in_training():
    from maskfit.config import config_from_dict
    from maskfit.finetune import rope_train_keep

    assert rope_train_keep(config_from_dict({})) == 1.0
    assert rope_train_keep(config_from_dict({"mask": {"keep_ratio": 0.25}})) == 0.25
    assert rope_train_keep(config_from_dict({"mask": {"keep_count": 64}, "data": {"token_budget": 256}})) == 0.25
