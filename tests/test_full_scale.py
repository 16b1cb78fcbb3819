"""The full-scale configs (README "Reproducing the papers"): the papers' recipes, and costs that follow from our
measured throughput by tools/full_scale_cost.py."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from maskfit.config import config_from_dict, load_config
from maskfit.throughput import PEAK_BF16_TFLOPS

ROOT = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("full_scale_cost", ROOT / "tools" / "full_scale_cost.py")
cost = importlib.util.module_from_spec(_spec)
sys.modules["full_scale_cost"] = cost  # its dataclasses look their module up while the file runs
_spec.loader.exec_module(cost)

# config -> (preset, objective, train.steps, train.batch_size, token budget, keep ratio, design, unmasked steps)
# FiT Tab. 3/5: FiT-B/2 400K x 256; FiTv2 Tab. II: FiTv2-B/2 400K x 256; FiTv2 Tab. III-V: FiTv2-XL/2 2000K x 256
# (512 M images); FiTv2 Tab. VI and whlzy/FiT config_fitv2_hr_xl.yaml: +400K x 256 at 1024 tokens
# (reference/fit.md §1.2, §2.1). The masked runs are ours, at FiT-B/2's budget.
FULL_SCALE = {
    "fit_b2_imagenet_packed.toml": ("FiT-B/2", "ddpm", 400_000, 256, 256, 1.0, "plain", 0),
    "masked_plain50_b2_imagenet.toml": ("FiT-B/2", "ddpm", 400_000, 256, 256, 0.5, "plain", 40_000),
    "masked_decoder50_b2_imagenet.toml": ("FiT-B/2", "ddpm", 400_000, 256, 256, 0.5, "decoder", 40_000),
    "fitv2_b2_imagenet.toml": ("FiTv2-B/2", "flow", 400_000, 256, 256, 1.0, "plain", 0),
    "fitv2_xl2_imagenet.toml": ("FiTv2-XL/2", "flow", 2_000_000, 256, 256, 1.0, "plain", 0),
    "fitv2_xl2_hr_imagenet.toml": ("FiTv2-XL/2", "flow", 400_000, 256, 1024, 1.0, "plain", 0),
    "fitv2_b2_hr_imagenet.toml": ("FiTv2-B/2", "flow", 400_000, 256, 1024, 1.0, "plain", 0),
}


@pytest.mark.parametrize("name", sorted(FULL_SCALE))
def test_full_scale_configs_are_the_papers_recipes(name):
    cfg = load_config(ROOT / "configs" / name)
    preset, objective, steps, batch, budget, keep, design, unmasked = FULL_SCALE[name]
    assert (cfg.model.preset, cfg.diffusion.objective, cfg.train.steps, cfg.train.batch_size) == (
        preset, objective, steps, batch)
    assert (cfg.data.token_budget, cfg.mask.keep_ratio, cfg.mask.design, cfg.mask.final_unmasked_steps) == (
        budget, keep, design, unmasked)
    # FiT §4.1 / FiTv2 §V-A: AdamW lr 1e-4, no weight decay, EMA 0.9999, clip 1.0, label dropout 0.1, batch 256
    # images per step (not a token budget).
    o = cfg.optim
    assert (o.lr, o.betas, o.weight_decay, o.grad_clip, o.ema_decay, o.ema_warmup) == (
        1e-4, (0.9, 0.999), 0.0, 1.0, 0.9999, False)
    assert (cfg.diffusion.label_dropout, cfg.data.batching, cfg.train.compile) == (0.1, "images", True)
    v2 = preset.startswith("FiTv2")
    # FiTv2 trains on "mixed" data with logit-normal t and the paper's 5 000-step warm-up (none after the 256
    # stage); FiT resizes only, with no warm-up.
    assert cfg.data.preprocess == ("mixed" if v2 else "flexible")
    assert o.warmup_steps == (0 if budget == 1024 or not v2 else 5000)
    assert not v2 or cfg.diffusion.t_sampling == "logit_normal"
    # Each trains as shipped from the cache the README's `maskfit prepare` lines write.
    assert (cfg.data.source, cfg.data.root) == ("latents", "cache/in1k" if budget == 256 else "cache/in1k_1024")
    assert (cfg.finetune.trainable == "hr_subset") == (budget == 1024)


def test_every_full_scale_config_is_costed():
    assert {Path(r.config).name for r in cost.RUNS} == set(FULL_SCALE)
    assert all(r.config.startswith("configs/") for r in cost.RUNS)


def test_flop_model_reproduces_the_measured_mfu():
    """The estimates scale measured rates by FLOPs: on the measured rows themselves our FLOP model over the
    benchmark's size mix must give the MFU recorded with each measurement."""
    rows = [json.loads(line) for line in cost.MEASURED_FILE.read_text().splitlines()]
    real = [r for r in rows if r["path"] == "real"]
    assert {(r["model"], r["design"], r["keep_ratio"]) for r in real} == {
        ("FiT-B/2", "plain", 1.0), ("FiT-B/2", "plain", 0.5), ("FiT-B/2", "decoder", 0.5)}
    for r in real:
        cfg = config_from_dict({"model": {"preset": r["model"]},
                                "mask": {"design": r["design"], "keep_ratio": r["keep_ratio"]}})
        flops = cost.mean_train_flops(cost._model_config(cfg), 256, r["keep_ratio"])
        mfu = r["images_per_s"] * flops / (PEAK_BF16_TFLOPS["H200"] * 1e12)
        assert mfu == pytest.approx(r["mfu"], abs=1e-3)


def test_masked_run_costs_its_unmasked_fine_tune_at_the_unmasked_rate():
    rates = cost.measured_rates()
    run = next(r for r in cost.RUNS if r.config.endswith("masked_plain50_b2_imagenet.toml"))
    c = cost.cost(run, rates)
    expected = (360_000 * 256 / 4152.3 + 40_000 * 256 / 2101.7) / 3600  # the H200 real-path rows
    assert c["images"] == 400_000 * 256 and c["gpu_hours"] == pytest.approx(expected)
    assert [(p.steps, p.keep_ratio, p.measured) for p in c["phases"]] == [(360_000, 0.5, True), (40_000, 1.0, True)]
    # Unmeasured phases are estimated and say so: the decoder's unmasked fine-tune, every FiTv2 run.
    decoder = cost.cost(next(r for r in cost.RUNS if "decoder" in r.config), rates)
    assert [p.measured for p in decoder["phases"]] == [True, False]
    assert decoder["phases"][1].images_per_s < 2101.7  # the decoder adds work to the unmasked step
    for run in cost.RUNS:
        if "fitv2" in run.config:
            assert not any(p.measured for p in cost.cost(run, rates)["phases"])


def test_token_batched_configs_are_refused_with_the_reason():
    run = cost.Run("token-batched", "configs/masked_b2_imagenet.toml", "ddp")
    with pytest.raises(ValueError, match="token batching has no fixed images per step"):
        cost.cost(run, cost.measured_rates())


def test_readme_table_is_the_cost_scripts_output():
    readme = (ROOT / "README.md").read_text()
    assert "## Reproducing the papers" in readme
    lines = set(readme.splitlines())
    missing = [row for row in cost.table_rows(cost.measured_rates()) if row not in lines]
    assert not missing, f"README rows differ from `python3 tools/full_scale_cost.py`; paste its table: {missing}"
