"""`maskfit sweep`: FiT's resolutions scaled to a run's budget, shared sample sets, outputs, resume, errors.

One tiny pixel-space run (64-token budget, patch 4) and a tiny proxy classifier, both trained for a moment
on CPU: the sweep's plumbing is under test, not sample quality.
"""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskfit.cli import main
from maskfit.config import config_from_dict
from maskfit.data.synthetic import render
from maskfit.evaluate.adm_npz import write_sample_npz
from maskfit.evaluate.proxy import LabeledImages, ProxyTrainConfig, save_proxy, train_classifier
from maskfit.sweep import (
    IN_DIST,
    OUT_DIST,
    Variant,
    derive_resolutions,
    parse_resolutions,
    parse_variants,
    rope_signature,
    sample_set_for,
    scaled_fit_grids,
)
from maskfit.train import train
from tests.test_sampling_run import randomise_zero_weights

EXPECTED_64 = ["32x32", "20x40", "16x48", "40x40", "28x56", "20x60"]  # 8x8 5x10 4x12 | 10x10 7x14 5x15 patches


def test_fit_grids_at_256_tokens_are_fits_resolutions():
    res = derive_resolutions(256, 16)  # SD-VAE factor 8 x patch 2
    assert [r.label for r in res] == ["256x256", "160x320", "128x384", "320x320", "224x448", "160x480"]
    assert [r.split for r in res] == [IN_DIST] * 3 + [OUT_DIST] * 3


def test_grids_scale_with_the_budget_and_round_half_up():
    assert [r.label for r in derive_resolutions(64, 4)] == EXPECTED_64
    assert [g for g, _ in scaled_fit_grids(64)] == [(8, 8), (5, 10), (4, 12), (10, 10), (7, 14), (5, 15)]
    # 16 tokens: 10x20 * 0.25 = 2.5x5 -> 3x5 (half up, not banker's 2x5); 14x28 -> 4x7; 10x30 -> 3x8.
    assert [g for g, _ in scaled_fit_grids(16)] == [(4, 4), (3, 5), (2, 6), (5, 5), (4, 7), (3, 8)]
    # 250 tokens: 16x16 * 0.988 rounds to 16x16 = 256 > 250: an in-distribution grid is trimmed into the budget.
    assert scaled_fit_grids(250)[0] == ((16, 15), IN_DIST)


def test_resolution_override_is_checked_and_split_by_budget():
    res = parse_resolutions(["40x40,32", "20x40"], token_budget=64, multiple=4)
    assert [(r.label, r.split) for r in res] == [("32x32", IN_DIST), ("20x40", IN_DIST), ("40x40", OUT_DIST)]
    with pytest.raises(ValueError, match="multiples of 4"):
        parse_resolutions(["30x40"], 64, 4)


def test_methods_share_a_sample_set_only_when_their_rope_tables_agree():
    args = dict(train_grid=(16, 16), head_dim=64, theta=10000.0)
    for m in ("pi", "ntk", "yarn", "vision_ntk", "vision_yarn"):
        assert sample_set_for(Variant(m), (16, 16), **args) == Variant("none")  # scale 1
        assert sample_set_for(Variant(m), (10, 20), **args) == Variant(m)  # 20 > 16: scaled
    assert sample_set_for(Variant("vision_ntk"), (20, 20), **args) == Variant("ntk")  # square: same scale
    assert sample_set_for(Variant("vision_yarn"), (20, 20), **args) == Variant("yarn")
    assert sample_set_for(Variant("none", "paper"), (16, 16), **args) == Variant("none")  # log 256 / log 256 = 1
    assert sample_set_for(Variant("none", "code"), (16, 16), **args) == Variant("none", "code")  # ln 512 / ln 256
    # The masked-training scale: an unmasked run's is eq. 15's (1 here); a run that kept half is scaled by 8/7.
    assert sample_set_for(Variant("none", "kept"), (16, 16), **args, train_keep=1.0) == Variant("none")
    assert sample_set_for(Variant("none", "kept"), (16, 16), **args, train_keep=0.5) == Variant("none", "kept")
    assert sample_set_for(Variant("vision_ntk", "kept"), (20, 20), **args) == Variant("ntk", "paper")


def test_the_sweeps_rope_readings_decide_shared_sets_and_signatures():
    args = dict(train_grid=(16, 16), head_dim=64, theta=10000.0)
    code = Variant("yarn", yarn_ramp="code")
    assert code.rope((16, 16)).yarn_ramp == "code"
    # Scale 1: every reading is plain RoPE, so the set is `none`'s (read with the same ramp).
    assert sample_set_for(code, (16, 16), **args) == Variant("none", yarn_ramp="code")
    assert sample_set_for(code, (20, 20), **args) == code
    paper_sig = rope_signature(Variant("yarn"), (20, 20), args["train_grid"], 64, 10000.0)
    assert not np.allclose(rope_signature(code, (20, 20), args["train_grid"], 64, 10000.0), paper_sig)
    assert [v.ntk_exponent for v in parse_variants("ntk,pi", "none", "paper", "head")] == ["head", "head"]


def test_bad_method_names_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['vison_ntk'\]; choose a comma list from none,pi"):
        parse_variants("none,vison_ntk")
    with pytest.raises(ValueError, match="--attn-scale 'paper,log'"):
        parse_variants("none", "paper,log")
    assert [v.label for v in parse_variants("none,pi", "none,paper")] == ["none", "none+attn_paper", "pi", "pi+attn_paper"]


# --------------------------------------------------------------------------------------------------
# End to end on CPU
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = config_from_dict({
        "model": {"preset": "FiTv2-tiny", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 16, "num_classes": 4, "token_budget": 64,
                 "autoencoder": "identity", "layout": "packed"},
        "diffusion": {"objective": "flow"},
        "train": {"out_dir": str(root / "run"), "steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2,
                  "device": "cpu", "seed": 0},
    })
    train(cfg, progress=False)
    # Seeded weights in the layers adaLN-zero leaves at ~0, so each sample set shows its own RoPE setting.
    randomise_zero_weights(root / "run")
    rng = np.random.default_rng(0)
    labels = np.arange(32) % 4
    images = np.stack([render(int(k), 32, 32, rng) for k in labels])  # (32, 32, 32, 3) uint8, square like ADM's
    model, _ = train_classifier(
        LabeledImages(images, labels, ("a", "b", "c", "d")),
        ProxyTrainConfig(input_size=16, width=8, num_stages=2, epochs=1, batch_size=16, holdout_fraction=0.0),
        log=None,
    )
    save_proxy(model, root / "proxy.safetensors")
    write_sample_npz(root / "reference.npz", images, labels)  # images only: statistics computed from them
    return root


def sweep_argv(root: Path, out: Path, *extra) -> list:
    return ["sweep", str(root / "run"), "--reference", str(root / "reference.npz"), "--proxy", str(root / "proxy.safetensors"),
            "--num-images", "6", "--batch-size", "6", "--methods", "none,vision_ntk", "--steps", "2",
            "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def swept(assets):
    out = assets / "out"
    assert main(sweep_argv(assets, out)) == 0
    return out


def read_rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_a_row_per_method_and_resolution(swept):
    rows = read_rows(swept / "sweep.csv")
    assert len(rows) == 12 and len({(r["variant"], r["resolution"]) for r in rows}) == 12
    assert [r["resolution"] for r in rows if r["variant"] == "none"] == EXPECTED_64
    assert [r["split"] for r in rows[::2]] == [IN_DIST] * 3 + [OUT_DIST] * 3
    for r in rows:
        for key in ("proxy_fd", "proxy_class_accuracy", "proxy_precision", "proxy_recall"):
            assert math.isfinite(float(r[key])), (r["variant"], r["resolution"], key)
        assert int(r["num_images"]) == 6
    cell = {(r["variant"], r["resolution"]): r for r in rows}
    # Scale 1 (32x32 = the 8x8 training grid): one sample set, so one set of numbers, for both methods.
    assert cell[("vision_ntk", "32x32")]["sample_set"] == cell[("none", "32x32")]["sample_set"] == "none"
    assert cell[("vision_ntk", "32x32")]["proxy_fd"] == cell[("none", "32x32")]["proxy_fd"]
    assert cell[("vision_ntk", "32x32")]["shared"] == "True"
    assert cell[("vision_ntk", "20x40")]["sample_set"] == "vision_ntk"  # width 10 > 8 patches: scaled
    assert float(cell[("vision_ntk", "20x40")]["rope_scale_w"]) == pytest.approx(1.25)
    assert cell[("vision_ntk", "40x40")]["sample_set"] == "ntk"  # square grid: vision_ntk's tables are ntk's
    # 11 sample sets: 1 at 32x32, 2 at each of the other five resolutions.
    assert len(list((swept / "samples").glob("*/samples_*.npz"))) == 11
    # Same noise and labels (one seed), different RoPE tables: the pixels differ, the labels do not.
    none, ntk = (np.load(swept / "samples" / s / "samples_20x60.npz") for s in ("none", "vision_ntk"))
    assert none["arr_0"].shape == (6, 20, 60, 3) and np.array_equal(none["arr_1"], ntk["arr_1"])
    assert not np.array_equal(none["arr_0"], ntk["arr_0"])
    assert cell[("none", "20x60")]["proxy_fd"] != cell[("vision_ntk", "20x60")]["proxy_fd"]

    md = (swept / "sweep.md").read_text()
    assert "**PROXY**" in md and "never published FID numbers" in md
    assert "6 per (method, resolution)" in md and "guidance scale 1.5" in md and "euler, 2 steps" in md
    assert "sqrt(64/256) = 0.5" in md and "Non-square protocol" in md and "stretched" in md
    assert "| method | ID 32x32 | ID 20x40 | ID 16x48 | OOD 40x40 | OOD 28x56 | OOD 20x60 |" in md
    with Image.open(swept / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 400


def test_rerun_reuses_samples_and_evaluations(assets, swept):
    files = sorted(p for p in (swept / "samples").rglob("*") if p.is_file()) + sorted((swept / "evals").rglob("*.json"))
    shards = [p for p in files if p.name.startswith("shard_")]
    assert len(shards) == 11
    before = {p: p.stat().st_mtime_ns for p in files}
    old = read_rows(swept / "sweep.csv")
    assert main(sweep_argv(assets, swept)) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert read_rows(swept / "sweep.csv") == old


def test_rerun_with_other_sampling_settings_is_refused(assets, swept, capsys):
    assert main(sweep_argv(assets, swept, "--seed", "1")) == 2
    assert "drawn with other settings (seed: 0 before, 1 now)" in capsys.readouterr().err


def test_bad_method_and_missing_reference_fail_before_any_work(assets, tmp_path, capsys):
    assert main(sweep_argv(assets, tmp_path / "a", "--methods", "none,yarm")) == 2
    assert "unknown method(s) ['yarm']" in capsys.readouterr().err
    argv = sweep_argv(assets, tmp_path / "b")
    argv[argv.index("--reference") + 1] = str(tmp_path / "missing.npz")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "missing.npz does not exist" in err and "ImageFolder" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rerun_with_another_rope_reading_is_refused(assets, swept, capsys):
    assert main(sweep_argv(assets, swept, "--yarn-ramp", "code")) == 2
    assert "yarn_ramp: 'paper' before, 'code' now" in capsys.readouterr().err


def test_a_recipe_sweep_records_its_resolved_choices_on_every_row(assets, tmp_path):
    out = tmp_path / "released"
    argv = sweep_argv(assets, out, "--recipe", "released", "--sampler", "euler", "--resolutions", "40x40")
    argv[argv.index("--methods") + 1] = "none,yarn"
    assert main(argv) == 0
    rows = read_rows(out / "sweep.csv")
    assert [r["variant"] for r in rows] == ["none+attn_code", "yarn+attn_code"]  # FiTv2 run: the code's scale
    for r in rows:
        assert (r["recipe"], r["yarn_ramp"], r["ntk_exponent"], r["attn_scale"]) == ("released", "code", "axis", "code")
        assert (r["sampler"], r["steps"], r["guidance_channels"], r["precision"]) == ("euler", "2", "3", "fp32")
    md = (out / "sweep.md").read_text()
    assert "- Sampler: euler, 2 steps, classifier-free guidance scale 1.5 on the first 3 channels." in md
    assert "- Recipe: `released` (as the released whlzy/FiT code runs it); YaRN ramp `code`, NTK exponent `axis`" in md
    assert "network in fp32 (dense attention)" in md
    saved = json.loads((out / "settings.json").read_text())["settings"]
    assert (saved["yarn_ramp"], saved["guidance_channels"], saved["atol"]) == ("code", 3, None)
