"""Training loop: the loss goes down, checkpoints round-trip, a resumed run equals an uninterrupted one."""
import json
import math
from pathlib import Path

import pytest
import torch

from maskfit import checkpoint as ckpt_io
from maskfit.config import RunConfig, config_from_dict, load_config
from maskfit.models.transformer import FiT, model_config
from maskfit.tokens import pack
from maskfit.train import build_diffusion, load_model_from_checkpoint, train, training_loss


def tiny_run(out: Path, objective="flow", steps=6, **extra) -> RunConfig:
    preset = "FiTv2-tiny" if objective == "flow" else "FiT-tiny"
    raw = {
        "model": {"preset": preset, "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 64, "num_classes": 4, "token_budget": 16,
                 "autoencoder": "identity", "layout": "packed"},
        "diffusion": {"objective": objective},
        "optim": {"lr": 1e-3, "ema_decay": 0.9},
        "train": {"out_dir": str(out), "steps": steps, "batch_size": 8, "log_every": 2, "ckpt_every": 3,
                  "device": "cpu", "seed": 3},
    }
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def test_loss_goes_down_on_a_fixed_tiny_batch():
    torch.manual_seed(0)
    model = FiT(model_config("FiTv2-tiny", patch_size=1, in_channels=4, num_classes=2))
    diffusion = build_diffusion(tiny_run(Path("unused")))
    grids = [(3, 4), (2, 2)]
    g = torch.Generator().manual_seed(0)
    batch = pack([torch.randn(h * w, 4, generator=g) for h, w in grids], grids, torch.tensor([0, 1]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def mean_loss(seed):  # the same t and noise draws every time: compare like with like
        gen = torch.Generator().manual_seed(seed)
        return training_loss(model, diffusion, batch, batch.y, 0.0, gen)[0]

    with torch.no_grad():
        before = sum(float(mean_loss(s)) for s in range(8))
    for step in range(150):
        loss, _ = training_loss(model, diffusion, batch, batch.y, 0.0, torch.Generator().manual_seed(step % 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(float(mean_loss(s)) for s in range(8))
    assert after < 0.5 * before


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_resume_matches_an_uninterrupted_run(tmp_path, objective):
    straight = train(tiny_run(tmp_path / "a", objective), progress=False)
    first = train(tiny_run(tmp_path / "b", objective), progress=False, stop_after=3)  # "crash" after 3
    assert first.step == 3
    resumed = train(tiny_run(tmp_path / "b", objective), progress=False)
    assert resumed.step == straight.step == 6
    a = ckpt_io.latest_checkpoint(tmp_path / "a")
    b = ckpt_io.latest_checkpoint(tmp_path / "b")
    for name in ("model.safetensors", "ema.safetensors"):
        from safetensors.torch import load_file

        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=f"{name}:{k}")


def test_masked_run_trains_and_resumes_exactly(tmp_path):
    mask = {"keep_ratio": 0.5, "design": "decoder", "decoder_depth": 1, "decoder_hidden": 32, "decoder_heads": 2}
    straight = train(tiny_run(tmp_path / "a", mask=mask), progress=False)
    train(tiny_run(tmp_path / "b", mask=mask), progress=False, stop_after=4)
    resumed = train(tiny_run(tmp_path / "b", mask=mask), progress=False)
    assert straight.step == resumed.step
    from safetensors.torch import load_file

    wa = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    wb = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "mask_token" in wa


def test_checkpoint_save_load_gives_identical_outputs(tmp_path):
    result = train(tiny_run(tmp_path / "run", steps=3), progress=False)
    model, cfg = load_model_from_checkpoint(result.run_dir, use_ema=False)
    ckpt = ckpt_io.latest_checkpoint(result.run_dir)
    # Rebuild from the saved config and weights by hand and compare outputs.
    from maskfit.models.transformer import ModelConfig

    raw = json.loads((ckpt / "config.json").read_text())
    rebuilt = FiT(ModelConfig(**raw["resolved_model"]))
    ckpt_io.load_weights(rebuilt, ckpt / "model.safetensors")
    grids = [(2, 3)]
    batch = pack([torch.randn(6, model.cfg.token_dim)], grids, torch.tensor([1]))
    t = torch.tensor([0.3])
    with torch.no_grad():
        torch.testing.assert_close(model(batch.tokens, t, batch.y, batch.layout),
                                   rebuilt.eval()(batch.tokens, t, batch.y, batch.layout), rtol=0, atol=0)
    assert cfg.train.steps == 3


def test_checkpoint_from_another_architecture_is_a_clear_error(tmp_path):
    result = train(tiny_run(tmp_path / "run", steps=3), progress=False)
    other = FiT(model_config("FiTv2-tiny", depth=3, patch_size=4, in_channels=3, num_classes=4))
    with pytest.raises(ValueError, match="saved from another architecture.*missing"):
        ckpt_io.load_weights(other, ckpt_io.latest_checkpoint(result.run_dir) / "model.safetensors")


def test_a_decoder_checkpoint_with_the_unused_backbone_final_layer_still_loads(tmp_path):
    """Decoder-design checkpoints from before 2026-12-02 carry final_layer.* weights the design never used."""
    from safetensors.torch import save_file

    cfg = model_config("FiTv2-tiny", mask_design="decoder", decoder_hidden=32, decoder_heads=2)
    model = FiT(cfg)
    old = {**model.state_dict(), "final_layer.linear.weight": torch.zeros(3, 4), "final_layer.adaLN.bias": torch.zeros(2)}
    save_file(old, str(tmp_path / "model.safetensors"))
    rebuilt = FiT(cfg)
    ckpt_io.load_weights(rebuilt, tmp_path / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    save_file({**old, "blocks.9.attn.qkv.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"saved from another architecture \(unexpected \['blocks.9.attn.qkv.weight'\]"):
        ckpt_io.load_weights(FiT(cfg), tmp_path / "other.safetensors")


def test_checkpoints_are_atomic_and_latest_points_to_a_complete_one(tmp_path):
    train(tiny_run(tmp_path / "run", steps=6), progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_0000006"
    assert not list(root.glob(".tmp*"))  # no half-written folder left behind
    for ckpt in root.glob("step_*"):
        assert {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.pt", "config.json"} <= {
            p.name for p in ckpt.iterdir()
        }


def test_bad_config_key_names_the_key_and_the_known_ones(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ValueError, match="unknown config key 'train.stepz'; known keys here: .*steps"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown config key 'optimizer'"):
        config_from_dict({"optimizer": {}})


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match=r"mask.keep_ratio=1.5 is outside \(0, 1\]"):
        config_from_dict({"mask": {"keep_ratio": 1.5}})
    with pytest.raises(ValueError, match="data.layout='ragged'"):
        config_from_dict({"data": {"layout": "ragged"}})
    with pytest.raises(ValueError, match="keep_count=64 and mask.keep_ratio=0.5 are both set.*remove one"):
        config_from_dict({"mask": {"keep_count": 64, "keep_ratio": 0.5}})


def test_flex_attention_needs_a_static_stream():
    with pytest.raises(ValueError, match="model.attention='ragged' is not one of"):
        config_from_dict({"model": {"attention": "ragged"}})
    flex = {"model": {"attention": "flex"}}
    with pytest.raises(ValueError, match="data.batching='images'.*Set data.batching='tokens'"):
        config_from_dict(flex)
    with pytest.raises(ValueError, match="data.batching='images'"):
        config_from_dict({**flex, "train": {"compile": True}})
    token_batching = {"layout": "packed", "batching": "tokens", "tokens_per_step": 512}
    with pytest.raises(ValueError, match="mask.design='decoder'"):
        config_from_dict({**flex, "data": token_batching, "mask": {"design": "decoder"}})
    assert config_from_dict({**flex, "data": token_batching}).model.attention == "flex"  # one stream length


def test_objective_and_model_mismatch_is_explained(tmp_path):
    cfg = tiny_run(tmp_path, "flow")
    cfg.model.preset = "FiT-tiny"  # learned sigma with a velocity objective
    with pytest.raises(ValueError, match="objective='flow' predicts a velocity.*learn_sigma=True"):
        train(cfg, progress=False)


def test_toml_config_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "FiT-tiny"\n[train]\nsteps = 7\n')
    cfg = load_config(path, ["train.batch_size=4", "mask.keep_ratio=0.25"])
    assert (cfg.model.preset, cfg.train.steps, cfg.train.batch_size, cfg.mask.keep_ratio) == ("FiT-tiny", 7, 4, 0.25)


CONFIG_ROOT = Path(__file__).parent.parent / "configs"
# Every shipped file, configs/study/ included: a variants file (sets of overrides on its folder's base.toml,
# maskfit.experiment.load_variants) is loaded variant by variant.
CONFIGS = sorted(CONFIG_ROOT.rglob("*.toml")) + sorted(CONFIG_ROOT.rglob("*.json"))
VARIANT_FILES = {"variants.toml"}
IMAGENETTE = Path(__file__).parent.parent.parent / "shared" / "data" / "imagenette" / "train-64"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(CONFIG_ROOT)) for p in CONFIGS])
def test_shipped_configs_load(path):
    from maskfit.experiment import load_variants
    from maskfit.train import resolved_model_config

    if path.name in VARIANT_FILES:
        variants = load_variants(path)
        configs = [load_config(path.parent / "base.toml", v.get("set", [])) for v in variants.values()]
        assert variants
    else:
        configs = [load_config(path)]
    for cfg in configs:
        assert cfg.model.preset and cfg.train.steps > 0
        # The model resolves too: preset, objective (learned sigma or not) and masked design agree.
        mcfg = resolved_model_config(cfg, 3 if cfg.data.autoencoder == "identity" else 4)
        assert mcfg.mask_design == cfg.mask.design


def test_shipped_configs_include_the_study():
    names = {str(p.relative_to(CONFIG_ROOT)) for p in CONFIGS}
    assert {"study/base.toml", "study/variants.toml", "fit_b2_imagenet.toml"} <= names


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason="../shared/data/imagenette is not beside this checkout")
def test_two_steps_on_real_images_with_random_aspect_crops(tmp_path):
    cfg = load_config(
        Path(__file__).parent.parent / "configs" / "imagenette_pixels.toml",
        [f"data.root={json.dumps(str(IMAGENETTE))}", f"train.out_dir={json.dumps(str(tmp_path / 'run'))}",
         "train.steps=2", "train.batch_size=4", "train.device=\"cpu\"",
         'model.overrides={"depth": 1, "hidden_size": 32, "num_heads": 2, "ffn_hidden": 64, "adaln_lora_rank": 8, "patch_size": 4, "num_classes": 10}'],
    )
    result = train(cfg, progress=False)
    assert result.step == 2 and all(v == v for v in result.losses)  # finite (not NaN)


def test_packed_batches_carry_a_static_max_seqlen_for_compile(tmp_path):
    from maskfit.data.pipeline import build_training_data

    cfg = tiny_run(tmp_path, mask={"keep_ratio": 0.5})
    data = build_training_data(cfg, 4)
    seen = set()
    for step in range(4):
        batch = data.next_batch(step)
        seen.add(batch.layout.max_seqlen)
        seen.add(batch.mask.layout.max_seqlen)
        assert int(batch.layout.seqlens().max()) <= batch.layout.max_seqlen
    assert seen == {cfg.data.token_budget}  # one value for every step: no recompilation per batch


def test_loss_logged_after_a_resume_averages_only_the_steps_it_saw(tmp_path):
    per_step = train(tiny_run(tmp_path / "each", steps=6, train={"log_every": 1}), progress=False).losses
    train(tiny_run(tmp_path / "run", steps=6), progress=False, stop_after=4)  # log_every 2, checkpoint at 3
    resumed = train(tiny_run(tmp_path / "run", steps=6), progress=False).losses  # resumes at step 3
    # Steps 4 and 5-6 are logged: step 4 alone (the resume starts between log lines), then the mean of 5 and 6.
    assert resumed == pytest.approx([per_step[3], (per_step[4] + per_step[5]) / 2], rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Comparable runs: images seen, max_images, max_seconds, batch size under token batching
# ----------------------------------------------------------------------------------------------------

TOKEN_BATCHING = {"batching": "tokens", "tokens_per_step": 64}


def test_a_batch_size_under_token_batching_is_an_error_that_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size=8 has no effect with data.batching='tokens'.*train.max_images"):
        tiny_run(tmp_path, data=TOKEN_BATCHING)
    raw_images = tiny_run(tmp_path, train={"batch_size": None})
    assert raw_images.train.batch_size == 256  # image batching without a batch size: FiT's 256


def _logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_images_seen_are_counted_logged_checkpointed_and_resumed(tmp_path):
    def cfg(out):
        c = tiny_run(out, data=TOKEN_BATCHING, mask={"keep_ratio": 0.5}, train={"batch_size": None})
        return c

    straight = train(cfg(tmp_path / "a"), progress=False)
    rows = _logged(tmp_path / "a")
    assert [r["step"] for r in rows] == [2, 4, 6]
    # Token batching at 50 % kept packs about 64 / (16 * 0.5) = 8 images per step: more than 64 / 16 = 4.
    assert straight.images_seen == rows[-1]["images_seen"] > 6 * 4
    assert all(later["images_seen"] > earlier["images_seen"] for earlier, later in zip(rows, rows[1:]))
    state = ckpt_io.load_state(ckpt_io.latest_checkpoint(tmp_path / "a"))
    assert state["images_seen"] == straight.images_seen
    train(cfg(tmp_path / "b"), progress=False, stop_after=3)
    resumed = train(cfg(tmp_path / "b"), progress=False)
    assert resumed.images_seen == straight.images_seen
    for key in ("speed/images_per_s", "speed/tokens_per_s", "compile/graphs", "compile/seconds"):
        assert key in rows[-1]
    assert "speed/mfu" not in rows[-1]  # no known peak on a CPU: no made-up MFU


def test_the_loop_says_whether_the_loader_or_the_host_held_it_back(monkeypatch, tmp_path):
    """RateWindow's host split: a loader that takes 0.2 s per batch shows as most of the window waiting for it."""
    import time as time_module

    from maskfit.data.pipeline import TrainingData

    normal = train(tiny_run(tmp_path / "a", steps=6), progress=False, measure_after=2)
    m = normal.measured
    assert 0 <= m["loader_wait_fraction"] < 0.5 and 0 < m["host_step_fraction"] <= 1.0
    assert m["loader_wait_fraction"] + m["host_step_fraction"] <= 1.0 + 1e-3
    assert m["ms_per_step"] == pytest.approx(1000 * m["seconds"] / m["steps"], abs=0.01)
    assert m["gpu_ms_per_step"] is None  # no CUDA events on a CPU
    rows = _logged(tmp_path / "a")
    assert {"speed/loader_wait_fraction", "speed/host_step_fraction"} <= set(rows[-1])

    fetch = TrainingData.next_device_batch

    def slow_fetch(self, step, device):
        time_module.sleep(0.2)
        return fetch(self, step, device)

    monkeypatch.setattr(TrainingData, "next_device_batch", slow_fetch)
    slow = train(tiny_run(tmp_path / "b", steps=6), progress=False, measure_after=2).measured
    assert slow["loader_wait_fraction"] > 0.5 > slow["host_step_fraction"]


def test_max_images_stops_the_run_at_the_first_step_that_reaches_it(tmp_path):
    cfg = tiny_run(tmp_path / "run", steps=100, train={"max_images": 20})  # batch 8: steps 1, 2, 3 -> 24 >= 20
    result = train(cfg, progress=False)
    assert (result.step, result.images_seen) == (3, 24)
    assert ckpt_io.latest_checkpoint(tmp_path / "run").name == "step_0000003"  # the stop is checkpointed


def test_max_seconds_comes_from_the_config(tmp_path):
    cfg = tiny_run(tmp_path / "run", steps=10_000, train={"max_seconds": 0.5})
    result = train(cfg, progress=False)
    assert 0 < result.step < 10_000
    assert ckpt_io.latest_checkpoint(tmp_path / "run").name == f"step_{result.step:07d}"


@pytest.mark.parametrize("key,value,message", [
    ("max_images", 0, "train.max_images=0 must be a positive number of images"),
    ("max_seconds", -1.0, "train.max_seconds=-1.0 must be a positive number of seconds"),
])
def test_stop_limits_are_checked(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_run(tmp_path, train={key: value})


def test_compile_mode_needs_one_shape_every_step_and_reaches_torch_compile(monkeypatch, tmp_path):
    from maskfit.config import config_from_dict
    import maskfit.runs as runs

    def cfg(train=None, data=None, mask=None):
        base_data = {"source": "synthetic", "num_images": 16, "num_classes": 4, "token_budget": 64,
                     "autoencoder": "identity", "layout": "packed", "batching": "tokens", "tokens_per_step": 256,
                     "max_images_per_step": 8}
        return config_from_dict({
            "model": {"preset": "FiT-tiny", "attention": "dense", "overrides": {"patch_size": 4, "num_classes": 4}},
            "data": {**base_data, **(data or {})}, "mask": {"keep_ratio": 0.5, **(mask or {})},
            "train": {"out_dir": str(tmp_path / "run"), "steps": 2, "compile": True, "device": "cpu", **(train or {})},
        })

    with pytest.raises(ValueError, match=r"train.compile_mode='fast' is not one of"):
        cfg({"compile_mode": "fast"})
    with pytest.raises(ValueError, match=r"applies under train.compile=true; set train.compile=true"):
        cfg({"compile_mode": "reduce-overhead", "compile": False})
    with pytest.raises(ValueError, match=r"data.max_images_per_step set .*use train.compile_mode='default'"):
        cfg({"compile_mode": "reduce-overhead"}, {"max_images_per_step": None})
    # A full-grid design's full stream is padded to a static bound, which Beta-drawn kept counts do not have
    cfg({"compile_mode": "reduce-overhead"}, mask={"design": "decoder"})
    with pytest.raises(ValueError, match=r"kept counts that are a function of image size for mask.design='decoder' "
                                         r"\(got mask.ratio_distribution='beta'"):
        cfg({"compile_mode": "reduce-overhead"}, mask={"design": "decoder", "ratio_distribution": "beta"})
    cfg({"compile_mode": "reduce-overhead"}, mask={"ratio_distribution": "beta"})  # plain: the kept stream is static
    with pytest.raises(ValueError, match=r"data.batching='tokens' \(got 'images'\)"):
        cfg({"compile_mode": "reduce-overhead", "batch_size": 4},
            {"batching": "images", "tokens_per_step": 0, "max_images_per_step": None})
    # Without CUDA graphs any batching compiles: no shape condition
    cfg({"compile_mode": "max-autotune-no-cudagraphs", "batch_size": 4},
        {"batching": "images", "tokens_per_step": 0, "max_images_per_step": None})
    ok = cfg({"compile_mode": "reduce-overhead"})
    seen = {}

    def fake_compile(module, mode=None):
        seen["mode"] = mode
        return module

    monkeypatch.setattr(runs.torch, "compile", fake_compile)
    runs.build_training_run(ok, data_channels=3)
    assert seen["mode"] == "reduce-overhead"


def test_a_decoder_with_its_position_embedding_trains_and_samples_with_it(tmp_path):
    """mask.decoder_pos_embed reaches the model, its checkpoint, and the model sampling loads from it."""
    from maskfit.runs import load_model_from_checkpoint

    mask = {"keep_ratio": 0.5, "design": "decoder", "decoder_pos_embed": True, "decoder_hidden": 32, "decoder_heads": 2}
    result = train(tiny_run(tmp_path / "run", steps=2, mask=mask), progress=False)
    assert result.step == 2 and all(math.isfinite(l) for l in result.losses)
    model, cfg = load_model_from_checkpoint(tmp_path / "run")
    assert model.cfg.decoder_pos_embed and cfg.mask.decoder_pos_embed


def _legacy_decoder_checkpoint(ckpt: Path) -> None:
    """Rewrite a decoder checkpoint as code before 2026-12-02 wrote it: a backbone final layer in the weights and
    its four (stateless: they never got a gradient) AdamW entries between the blocks' and decoder_in's."""
    from safetensors.torch import load_file, save_file

    model, _ = load_model_from_checkpoint(ckpt, use_ema=False)
    names = [n for n, _ in model.named_parameters()]
    hidden, out_dim = model.cfg.hidden_size, model.cfg.patch_size**2 * model.cfg.out_channels

    for name in ("model.safetensors", "ema.safetensors"):
        weights = load_file(str(ckpt / name))
        weights.update({"final_layer.adaLN.weight": torch.randn(2 * hidden, hidden),
                        "final_layer.adaLN.bias": torch.randn(2 * hidden),
                        "final_layer.linear.weight": torch.randn(out_dim, hidden),
                        "final_layer.linear.bias": torch.randn(out_dim)})
        save_file(weights, str(ckpt / name))
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    at = names.index("decoder_in.weight")
    shift = {i: i if i < at else i + 4 for i in range(len(names))}
    state["state"] = {shift[i]: v for i, v in state["state"].items()}
    state["param_groups"][0]["params"] = list(range(len(names) + 4))
    torch.save(state, ckpt / "optimizer.pt")


def test_a_decoder_checkpoint_from_before_the_final_layer_removal_resumes_exactly(tmp_path):
    mask = {"keep_ratio": 0.5, "design": "decoder", "decoder_depth": 1, "decoder_hidden": 32, "decoder_heads": 2}
    straight = train(tiny_run(tmp_path / "a", mask=mask), progress=False)
    train(tiny_run(tmp_path / "b", mask=mask), progress=False, stop_after=3)
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "b")
    _legacy_decoder_checkpoint(ckpt)
    resumed = train(tiny_run(tmp_path / "b", mask=mask), progress=False)
    assert straight.step == resumed.step == 6
    from safetensors.torch import load_file

    wa = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "a") / "model.safetensors"))
    wb = load_file(str(ckpt_io.latest_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_optimizer_state_of_another_model_is_refused_with_the_fix(tmp_path):
    train(tiny_run(tmp_path / "b"), progress=False, stop_after=3)
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "b")
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    state["state"].pop(max(state["state"]), None)
    torch.save(state, ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer.pt holds AdamW state for \d+ parameters.*finetune.init_from"):
        train(tiny_run(tmp_path / "b"), progress=False)
