"""The study's infrastructure (issue 12): our held-out split, EMA warm-up, image-count checkpoints,
`maskfit experiment` end to end (tiny model, tiny folder, CPU, resume), the study variants and the report.

Everything here is plumbing on tiny inputs; no number is a study result.
"""
import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskfit import checkpoint as ckpt_io
from maskfit.cli import main
from maskfit.config import config_from_dict, load_config
from maskfit.data.pipeline import build_dataset
from maskfit.data.split import holdout_key, select_split
from maskfit.evaluate.cli import load_image_folder
from maskfit.evaluate.proxy import ProxyTrainConfig, save_proxy, train_classifier
from maskfit.train import ema_decay_at, train
from tests.test_train import tiny_run

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, classes: int = 3, per_class: int = 7, size=(32, 32)) -> Path:
    """ImageNet layout, class c tinted in channel c with seeded noise (PNG: exact pixels)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 56, (size[1], size[0], 3))
            img[..., c % 3] += 180
            Image.fromarray(img.astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return root


# --------------------------------------------------------------------------------------------------
# The held-out split
# --------------------------------------------------------------------------------------------------


def _files(root: Path):
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    return [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())]


def test_split_is_per_class_disjoint_deterministic_and_order_free(tmp_path):
    root = make_folder(tmp_path / "data", classes=3, per_class=7)
    files = _files(root)
    train_side = select_split(files, root, "train", 0.3)
    held = select_split(files, root, "holdout", 0.3)
    assert {p for p, _ in train_side}.isdisjoint(p for p, _ in held)
    assert sorted(train_side + held) == sorted(files)
    assert [sum(c == k for _, c in held) for k in range(3)] == [2, 2, 2]  # round(0.3 * 7) = 2 per class
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    assert sorted(select_split(shuffled, root, "holdout", 0.3)) == sorted(held)
    # Pinned: the study's references depend on exactly this rule (salted SHA-256 of the relative path).
    assert [p.relative_to(root).as_posix() for p, c in held if c == 0] == ["class0/img01.png", "class0/img02.png"]
    keyed = sorted((holdout_key(f"class0/img{i:02d}.png"), i) for i in range(7))
    assert sorted(i for _, i in keyed[:2]) == [1, 2]  # the two smallest keys of the class


def test_split_is_the_same_in_the_dataset_the_classifier_and_a_reencoded_copy(tmp_path):
    from maskfit.data.reencode import reencode_folder

    root = make_folder(tmp_path / "data", classes=2, per_class=6)
    held = {p.relative_to(root).as_posix() for p, _ in select_split(_files(root), root, "holdout", 0.2)}
    cfg = config_from_dict({"data": {"source": "folder", "root": str(root), "split": "holdout", "holdout_fraction": 0.2,
                                     "autoencoder": "identity", "token_budget": 16}})
    ds = build_dataset(cfg.data, 4, seed=0)
    assert {p.relative_to(root).as_posix() for p, _ in ds.samples} == held
    train_ds = build_dataset(dataclasses.replace(cfg.data, split="train"), 4, seed=0)
    assert len(train_ds) + len(ds) == 12 and len(ds) == 2  # round(0.2 * 6) = 1 per class
    folder = load_image_folder(root, split="train", holdout_fraction=0.2)
    assert len(folder.images) == 10 and list(np.bincount(folder.labels)) == [5, 5]
    copy = tmp_path / "copy"
    manifest = reencode_folder(root, copy, quality=90)
    assert manifest["images"] == 12 and manifest["pixel_abs_diff_max"] > 0  # JPEG is lossy: the manifest says by how much
    again = {p.relative_to(copy).as_posix() for p, _ in select_split(_files(copy), copy, "holdout", 0.2)}
    assert held == again  # same relative names, same split
    with pytest.raises(FileExistsError, match="--overwrite"):
        reencode_folder(root, copy)


def test_split_errors_name_the_value_and_the_fix(tmp_path):
    root = make_folder(tmp_path / "data", classes=2, per_class=3)
    with pytest.raises(ValueError, match="class 0 .* holds out 0"):
        select_split(_files(root), root, "holdout", 0.1)  # round(0.3) = 0 held out
    with pytest.raises(ValueError, match="data.split='train' splits an image folder"):
        config_from_dict({"data": {"source": "synthetic", "split": "train"}})
    with pytest.raises(ValueError, match="data.split='val'"):
        config_from_dict({"data": {"source": "folder", "split": "val"}})
    with pytest.raises(ValueError, match="holdout_fraction=1.0"):
        config_from_dict({"data": {"source": "folder", "split": "train", "holdout_fraction": 1.0}})


# --------------------------------------------------------------------------------------------------
# EMA warm-up and image-count checkpoints (train.py)
# --------------------------------------------------------------------------------------------------


def test_ema_warmup_decay_values():
    assert ema_decay_at(0, 0.9999, True) == 0.0  # the first update copies the model (diffusers' get_decay)
    assert ema_decay_at(1, 0.9999, True) == pytest.approx(2 / 11)
    assert ema_decay_at(9, 0.9999, True) == pytest.approx(10 / 19)
    assert ema_decay_at(2000, 0.9999, True) == pytest.approx(2001 / 2010)
    assert ema_decay_at(10**6, 0.9999, True) == 0.9999  # capped by ema_decay
    assert ema_decay_at(0, 0.9999, False) == ema_decay_at(5000, 0.9999, False) == 0.9999
    assert isinstance(ema_decay_at(7, 0.999, True), float)  # a host number: no tensor, no device sync


def _flat(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(str(path))
    return torch.cat([state[k].flatten() for k in sorted(state)])


@pytest.mark.parametrize("warmup", [True, False])
def test_early_ema_weights_follow_the_model_only_with_warmup(tmp_path, warmup):
    extra = {"optim": {"lr": 1e-2, "ema_decay": 0.9999, "ema_warmup": warmup},
             "train": {"ckpt_every": 1, "keep_checkpoints": 0}}
    cfg = tiny_run(tmp_path / "run", steps=4, **extra)
    train(cfg, progress=False)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    first, last = ckpts[0], ckpts[-1]
    model1, ema1 = _flat(first / "model.safetensors"), _flat(first / "ema.safetensors")
    model4, ema4 = _flat(last / "model.safetensors"), _flat(last / "ema.safetensors")
    if warmup:
        assert torch.equal(ema1, model1)  # decay 0 at the first update
        assert (ema4 - model4).norm() < 0.5 * (ema1 - model4).norm()  # it keeps up with the model
    else:
        moved = (model4 - ema4).norm()
        assert (ema4 - ema1).norm() < 1e-3 * moved  # 0.9999: the EMA is still its initial weights


def test_checkpoints_at_image_marks_are_all_kept_with_their_seconds(tmp_path):
    cfg = tiny_run(tmp_path / "run", steps=6, train={"ckpt_every": 100, "ckpt_at_images": [12, 30, 1000],
                                                     "keep_checkpoints": 0, "log_every": 100})
    train(cfg, progress=False)  # batch 8: images seen 8, 16, ... cross 12 at step 2 and 30 at step 4
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_0000002", "step_0000004", "step_0000006"]  # 6 = train.steps
    states = [ckpt_io.load_state(c) for c in ckpts]
    assert [s["images_seen"] for s in states] == [16, 32, 48]
    seconds = [s["train_seconds"] for s in states]
    assert all(0 < a < b for a, b in zip(seconds, seconds[1:]))


def test_bad_marks_and_keep_counts_are_errors():
    with pytest.raises(ValueError, match=r"train.ckpt_at_images=\[0\]"):
        config_from_dict({"train": {"ckpt_at_images": [0]}})
    with pytest.raises(ValueError, match="keep_checkpoints=-1"):
        config_from_dict({"train": {"keep_checkpoints": -1}})


# --------------------------------------------------------------------------------------------------
# maskfit experiment
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    data = make_folder(root / "data", classes=3, per_class=10)
    config = root / "tiny.toml"
    config.write_text(f"""
[model]
preset = "FiTv2-tiny"
overrides = {{ patch_size = 4, num_classes = 3 }}
[data]
source = "folder"
root = "{data}"
split = "train"
holdout_fraction = 0.2
token_budget = 16
random_aspect_crop = true
autoencoder = "identity"
layout = "packed"
[diffusion]
objective = "flow"
[optim]
ema_warmup = true
[train]
steps = 1000
batch_size = 4
log_every = 2
""")
    folder = load_image_folder(data, size=16, split="train", holdout_fraction=0.2)
    proxy, _ = train_classifier(folder, ProxyTrainConfig(input_size=16, width=8, num_stages=2, epochs=1, batch_size=8,
                                                         holdout_fraction=0.0), log=None)
    save_proxy(proxy, root / "proxy.safetensors")
    return root


def experiment_argv(root: Path, out: Path, *extra) -> list:
    return ["experiment", str(root / "tiny.toml"), "--out", str(out), "--proxy", str(root / "proxy.safetensors"),
            # 12 images (3 steps of 4) stop the run long before its budget: a fixed length on any CPU
            "--budget-seconds", "60", "--set", "train.max_images=12", "--eval-at-images", "8",
            "--resolutions", "16x16,24x24", "--mark-resolutions", "16x16", "--ood-methods", "none,vision_ntk",
            "--num-images", "6", "--sample-batch-size", "6", "--steps", "1", "--device", "cpu", "--quiet", *extra]


@pytest.fixture(scope="module")
def experiment(assets):
    out = assets / "exp"
    assert main(experiment_argv(assets, out)) == 0
    return out


def test_experiment_writes_one_line_per_checkpoint_resolution_and_method(experiment):
    lines = [json.loads(l) for l in (experiment / "results.jsonl").read_text().splitlines()]
    final = [l for l in lines if l["is_final"]]
    assert sorted((l["resolution"], l["method"]) for l in final) == [
        ("16x16", "none"), ("24x24", "none"), ("24x24", "vision_ntk")]
    assert {l["split"] for l in final} == {"ID", "OOD"}
    marked = [l for l in lines if l["marks"] == [8]]
    assert [(l["resolution"], l["method"], l["images_seen"], l["step"]) for l in marked] == [("16x16", "none", 8, 2)]
    training = json.loads((experiment / "training.json").read_text())
    for l in lines:
        assert l["proxy_fd"] is not None and math.isfinite(l["proxy_fd"]) and 0 <= l["proxy_class_accuracy"] <= 1
        assert (l["design"], l["keep_ratio"], l["weights"], l["ema_warmup"]) == ("packed", 1.0, "ema", True)
        assert (l["sampler"], l["sampler_steps"], l["cfg_scale"], l["labels"], l["num_samples"]) == ("euler", 1, 1.5, "per-class", 6)
        assert l["config_digest"] and l["proxy_sha256"] and l["reference"]["split"] == "holdout"
        ckpt = next(c for c in training["checkpoints"] if c["name"] == l["checkpoint"])
        assert l["train_seconds"] == ckpt["train_seconds"] and l["images_per_s"] > 0
    assert final[0]["images_seen"] == 12 and final[0]["step"] == 3  # stopped at train.max_images
    # The references: the held-out images (round(0.2 * 10) = 2 per class), brought to each size.
    ref = np.load(experiment / "reference" / "ref_24x24.npz")
    assert ref["arr_0"].shape == (6, 24, 24, 3) and list(np.bincount(ref["arr_1"])) == [2, 2, 2]


def test_experiment_rerun_skips_training_and_finished_lines(assets, experiment, monkeypatch, capsys):
    import maskfit.train

    before = (experiment / "results.jsonl").read_text()
    monkeypatch.setattr(maskfit.train, "train", lambda *a, **k: pytest.fail("a finished training ran again"))
    assert main(experiment_argv(assets, experiment)) == 0
    assert '"lines_written": 0' in capsys.readouterr().out
    assert (experiment / "results.jsonl").read_text() == before
    # Other training settings in the same folder are refused, naming what differs.
    assert main(experiment_argv(assets, experiment, "--budget-seconds", "30")) == 2
    assert "budget_seconds" in capsys.readouterr().err


def test_also_cfg_samples_the_final_checkpoint_unguided_and_reports_it_apart(assets, tmp_path, capsys):
    from maskfit.study_report import report_block

    out = tmp_path / "cfg"
    assert main(experiment_argv(assets, out, "--also-cfg", "1.0", "--raw-final", "yes")) == 0
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    unguided = [l for l in lines if l["cfg_scale"] == 1.0]
    final_main = [l for l in lines if l["cfg_scale"] == 1.5 and l["weights"] == "ema" and l["is_final"]]
    assert [(l["resolution"], l["method"], l["is_final"], l["weights"]) for l in unguided] == [("16x16", "none", True, "ema")]
    assert unguided[0]["checkpoint"] == final_main[0]["checkpoint"]
    assert len({unguided[0]["eval_id"], final_main[0]["eval_id"]}) == 2
    block = report_block(lines, tmp_path / "plots", tmp_path / "REPORT.md")
    guided_fd = next(l["proxy_fd"] for l in final_main if l["resolution"] == "16x16")
    assert "### The final checkpoint with CFG 1 beside CFG 1.5" in block
    assert f"| cfg | {guided_fd:.2f} / {unguided[0]['proxy_fd']:.2f} |" in block
    assert "### The final checkpoint's raw weights beside its EMA" in block  # each extra in its own table
    # Every line carries the samples' pixel statistics over the references', and the report tables them.
    assert all(l["detail_ratio"] > 0 and l["contrast_ratio"] > 0 for l in lines)
    assert "| run (samples' detail ÷ references', closer to 1 is better) |" in block
    assert "[2]" not in block  # neither extra is a second group of the run's tables
    capsys.readouterr()
    assert main(experiment_argv(assets, tmp_path / "dry", "--dry-run", "--also-cfg", "1")) == 0
    assert "and the final checkpoint with CFG 1 at the marks' resolutions" in capsys.readouterr().out
    assert main(experiment_argv(assets, tmp_path / "dry", "--dry-run", "--also-cfg", "0.5")) == 2
    assert "--also-cfg 0.5: a guidance scale is >= 1" in capsys.readouterr().err


def test_also_attn_scale_samples_a_masked_run_with_scaled_logits_and_reports_it_apart(assets, tmp_path, capsys,
                                                                                      monkeypatch):
    import maskfit.sampling_run
    from maskfit.experiment import eval_id
    from maskfit.study_report import report_block

    sampled_with = []
    original = maskfit.sampling_run.sample_resolution

    def recording(model, diffusion, autoencoder, size, multiple, p, options, *args, **kwargs):
        sampled_with.append((size, options.rope.attn_scale, options.rope.train_keep))
        return original(model, diffusion, autoencoder, size, multiple, p, options, *args, **kwargs)

    monkeypatch.setattr(maskfit.sampling_run, "sample_resolution", recording)
    out = tmp_path / "attn"
    assert main(experiment_argv(assets, out, "--set", "mask.keep_ratio=0.5", "--also-attn-scale", "kept")) == 0
    # The sampler got the scale with the run's kept fraction, once: the final checkpoint at the mark resolution.
    assert [s for s in sampled_with if s[1] != "none"] == [((16, 16), "kept", 0.5)]
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    scaled = [l for l in lines if l["attn_scale"] == "kept"]
    final_main = [l for l in lines if l["attn_scale"] == "none" and l["is_final"] and l["resolution"] == "16x16"]
    assert [(l["resolution"], l["method"], l["is_final"], l["cfg_scale"]) for l in scaled] == [("16x16", "none", True, 1.5)]
    assert scaled[0]["checkpoint"] == final_main[0]["checkpoint"] and scaled[0]["eval_id"] != final_main[0]["eval_id"]
    assert (out / "eval" / scaled[0]["eval_id"] / scaled[0]["checkpoint"] / "id" / "samples" / "none+attn_kept").is_dir()
    block = report_block(lines, tmp_path / "plots", tmp_path / "REPORT.md")
    assert "### The final checkpoint with attention scale `kept` beside none" in block
    assert f"{final_main[0]['proxy_fd']:.2f} / {scaled[0]['proxy_fd']:.2f} |" in block
    assert "### The final checkpoint with attention scale `kept` beside none: contrast" in block
    assert "[2]" not in block  # the extra is not a second group of the run's tables
    # Settings made before the attention scale existed keep their ids; an unmasked run skips the extra.
    ev = {"num_images": 6, "sampler": "euler", "steps": 1, "cfg_scale": 1.5, "seed": 0, "batch_size": 6,
          "weights": "ema", "proxy_sha256": "x", "labels": "per-class", "reference_rule_version": 2}
    assert eval_id(dict(ev, attn_scale="none")) == eval_id(ev) != eval_id(dict(ev, attn_scale="kept"))
    capsys.readouterr()
    assert main(experiment_argv(assets, tmp_path / "dry", "--dry-run", "--also-attn-scale", "kept")) == 0
    assert "attention scale" not in capsys.readouterr().out
    assert main(experiment_argv(assets, tmp_path / "dry2", "--dry-run", "--set", "mask.keep_ratio=0.5",
                                "--also-attn-scale", "kept")) == 0
    assert "and the final checkpoint with attention scale 'kept' at the marks' resolutions" in capsys.readouterr().out


def test_also_subset_sampling_samples_a_masked_run_as_it_trained_and_reports_it_apart(assets, tmp_path, capsys,
                                                                                     monkeypatch):
    import maskfit.sampling_run
    from maskfit.experiment import eval_id
    from maskfit.study_report import report_block

    sampled_with = []
    original = maskfit.sampling_run.sample_resolution

    def recording(model, diffusion, autoencoder, size, multiple, p, options, *args, **kwargs):
        sampled_with.append((size, options.subset_keep))
        return original(model, diffusion, autoencoder, size, multiple, p, options, *args, **kwargs)

    monkeypatch.setattr(maskfit.sampling_run, "sample_resolution", recording)
    out = tmp_path / "subsets"
    assert main(experiment_argv(assets, out, "--set", "mask.keep_ratio=0.5", "--also-subset-sampling")) == 0
    # Once, with the run's keep ratio: the final checkpoint at the mark resolution; every other set on the full grid.
    assert [s for s in sampled_with if s[1] != 1.0] == [((16, 16), 0.5)]
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    subset = [l for l in lines if l["subset_keep"] == 0.5]
    final_main = [l for l in lines if l["subset_keep"] == 1.0 and l["is_final"] and l["resolution"] == "16x16"]
    assert [(l["resolution"], l["method"], l["is_final"], l["attn_scale"]) for l in subset] == [
        ("16x16", "none", True, "none")]
    assert subset[0]["checkpoint"] == final_main[0]["checkpoint"] and subset[0]["eval_id"] != final_main[0]["eval_id"]
    block = report_block(lines, tmp_path / "plots", tmp_path / "REPORT.md")
    assert "### The final checkpoint sampled on token subsets beside the full grid" in block
    assert f"{final_main[0]['proxy_fd']:.2f} / {subset[0]['proxy_fd']:.2f} |" in block
    assert "### The final checkpoint sampled on token subsets beside the full grid: contrast" in block
    assert "[2]" not in block
    # Ids made before subset sampling existed stay; an unmasked run, or one masked by another strategy, skips it.
    ev = {"num_images": 6, "sampler": "euler", "steps": 1, "cfg_scale": 1.5, "seed": 0, "batch_size": 6,
          "weights": "ema", "proxy_sha256": "x", "labels": "per-class", "reference_rule_version": 2}
    assert eval_id(dict(ev, subset_keep=1.0)) == eval_id(ev) != eval_id(dict(ev, subset_keep=0.5))
    capsys.readouterr()
    for extra in ([], ["--set", "mask.keep_ratio=0.5", "--set", 'mask.strategy="block"']):
        assert main(experiment_argv(assets, tmp_path / f"dry{len(extra)}", "--dry-run", "--also-subset-sampling",
                                    *extra)) == 0
        assert "token subsets" not in capsys.readouterr().out
    for design in ("plain", "decoder"):
        assert main(experiment_argv(assets, tmp_path / f"dry_{design}", "--dry-run", "--set", "mask.keep_ratio=0.5",
                                    "--set", f'mask.design="{design}"', "--also-subset-sampling")) == 0
        assert "and the final checkpoint on token subsets of 0.5 at the marks' resolutions" in capsys.readouterr().out


def test_unmasked_finetune_resumes_the_masked_run_with_every_token(assets, tmp_path):
    import argparse

    from maskfit.experiment import add_experiment_arguments, experiment_config, run_training

    parser = argparse.ArgumentParser()
    add_experiment_arguments(parser)
    # Phase 1 stops at train.max_images (2 steps of 4), phase 2 after its first step: a fixed length on any CPU.
    args = parser.parse_args([str(assets / "tiny.toml"), "--out", str(tmp_path / "ft"), "--proxy", "unused",
                              "--set", "mask.keep_ratio=0.5", "--set", "mask.design=\"decoder\"",
                              "--set", "mask.decoder_hidden=64", "--set", "mask.decoder_heads=1",
                              "--set", "train.max_images=8", "--device", "cpu"])
    cfg, _ = experiment_config(args, tmp_path / "ft")
    training = run_training(cfg, tmp_path / "ft", budget=60.0, finetune=0.25, progress=False, log=lambda *_: None)
    assert [(p["phase"], p["final_step"], p["budget_seconds"]) for p in training["phases"]] == [
        ("main", 2, 45.0), ("unmasked_finetune", 3, 15.0)]
    final = training["checkpoints"][-1]
    assert (final["step"], final["images_seen"], final["phase"]) == (3, 12, "unmasked_finetune")
    main_end = training["checkpoints"][-2]
    assert final["train_seconds"] == pytest.approx(main_end["train_seconds"] + final["phase_seconds"], abs=1e-3)
    saved = json.loads((tmp_path / "ft" / "run" / "checkpoints" / "step_0000003" / "config.json").read_text())
    assert saved["mask"]["keep_ratio"] == 1.0 and saved["mask"]["design"] == "decoder"  # same model, no mask


def test_raw_final_samples_the_final_raw_weights_at_the_mark_resolutions_and_reports_them_apart(assets, tmp_path,
                                                                                               capsys):
    from maskfit.study_report import report_block

    out = tmp_path / "raw"
    assert main(experiment_argv(assets, out, "--raw-final", "yes")) == 0
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    raw = [l for l in lines if l["weights"] == "raw"]
    final_ema = [l for l in lines if l["weights"] == "ema" and l["is_final"]]
    assert [(l["resolution"], l["method"], l["is_final"]) for l in raw] == [("16x16", "none", True)]
    assert raw[0]["checkpoint"] == final_ema[0]["checkpoint"] and raw[0]["eval_id"] != final_ema[0]["eval_id"]
    block = report_block(lines, tmp_path / "plots", tmp_path / "REPORT.md")
    assert "### The final checkpoint's raw weights beside its EMA" in block
    ema_fd = next(l["proxy_fd"] for l in final_ema if l["resolution"] == "16x16")
    assert f"| raw | {ema_fd:.2f} / {raw[0]['proxy_fd']:.2f} |" in block
    assert "[2]" not in block  # the raw lines are not a second group of the run's tables
    # auto: only a run that ends with an unmasked fine-tune, whose EMA still remembers the masked phase
    capsys.readouterr()
    assert main(experiment_argv(assets, tmp_path / "dry", "--dry-run", "--set", "mask.keep_ratio=0.5",
                                "--finetune-unmasked", "0.25")) == 0
    assert "and the final checkpoint's raw weights at the marks' resolutions" in capsys.readouterr().out
    assert main(experiment_argv(assets, tmp_path / "dry", "--dry-run")) == 0
    assert "raw weights" not in capsys.readouterr().out


def test_experiment_dry_run_estimates_and_does_nothing(assets, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(experiment_argv(assets, out, "--dry-run", "--assume-sampling-tflops", "1")) == 0
    text = capsys.readouterr().out
    assert "estimate:" in text and "3 sample sets at the final checkpoint, 1 at each mark" in text
    assert not out.exists()


def test_experiment_refuses_a_reference_from_the_training_side(assets, tmp_path, capsys):
    argv = experiment_argv(assets, tmp_path / "bad", "--set", "data.split=\"all\"", "--dry-run")
    assert main(argv) == 2
    assert "the reference would hold training images" in capsys.readouterr().err


def test_reference_images_are_cropped_to_the_ratio_and_never_upscaled():
    from maskfit.data.datasets import item_rng
    from maskfit.experiment import reference_image

    ramp = np.tile(np.arange(128, dtype=np.uint8)[:, None, None], (1, 128, 3))  # row index as the pixel value
    img = Image.fromarray(ramp)
    band = reference_image(img, 64, 128, item_rng(0, 0, 3), 0.25)  # 64x128 needs the whole 128x64 band: no resize
    assert band.shape == (64, 128, 3)
    y0 = int(band[0, 0, 0])
    assert np.array_equal(band, ramp[y0:y0 + 64])
    square = reference_image(img, 64, 64, item_rng(0, 0, 3), 0.25)
    assert square.shape == (64, 64, 3)


def test_sweep_needs_every_per_resolution_reference(assets, experiment, capsys):
    run_ckpt = next((experiment / "run" / "checkpoints").glob("step_*"))
    argv = ["sweep", str(run_ckpt), "--reference", str(experiment / "reference" / "missing_{resolution}.npz"),
            "--proxy", str(assets / "proxy.safetensors"), "--resolutions", "16x16", "--device", "cpu",
            "--out", str(assets / "sweep_missing")]
    assert main(argv) == 2
    assert "missing_16x16.npz" in capsys.readouterr().err


def test_sampling_estimate_arithmetic():
    from maskfit.experiment import estimate_seconds, evaluations_per_image, sampling_flops
    from maskfit.models.transformer import model_config
    from maskfit.throughput import design_flops

    assert evaluations_per_image("euler", 50, 1.5) == 100
    assert evaluations_per_image("heun", 50, 1.5) == 200
    assert evaluations_per_image("ddim", 50, 1.0) == 50
    mcfg = model_config("FiT-B/2", patch_size=4, in_channels=3, num_classes=10)
    flops = sampling_flops(mcfg, [(16, 16), (24, 24)], 10, 100)
    assert flops == pytest.approx(1000 * (design_flops(mcfg, 256, 256) + design_flops(mcfg, 576, 576)) / 3)
    est = estimate_seconds(240, [1e15, 1e15], 2, 100.0, False)
    assert est["sampling_s"] == 20.0 and est["total_s"] == 240 + est["startup_s"] + 20 + est["sweep_overhead_s"]


# --------------------------------------------------------------------------------------------------
# The study's configs
# --------------------------------------------------------------------------------------------------


def test_every_study_variant_is_a_valid_run_config():
    from maskfit.experiment import design_label, is_masked, load_variants
    from maskfit.train import resolved_model_config

    variants = load_variants(ROOT / "configs/study/variants.toml")
    designs = {}
    for name, v in variants.items():
        cfg = load_config(ROOT / "configs/study/base.toml", v.get("set", []))
        mcfg = resolved_model_config(cfg, 3)
        assert (mcfg.patch_size, cfg.data.token_budget, cfg.data.split) == (4, 256, "train"), name
        assert not v.get("finetune_unmasked") or is_masked(cfg), name
        designs[name] = (design_label(cfg), cfg.mask.keep_ratio, cfg.diffusion.objective)
    assert designs["fit_padded"] == ("padded", 1.0, "ddpm") and designs["packed"] == ("packed", 1.0, "ddpm")
    assert designs["decoder50_ft"] == ("decoder", 0.5, "ddpm") and variants["decoder50_ft"]["finetune_unmasked"] == 0.1
    assert designs["v2_plain50"] == ("plain", 0.5, "flow")


def test_unknown_variant_keys_are_errors(tmp_path):
    from maskfit.experiment import load_variants

    path = tmp_path / "v.toml"
    path.write_text("[a]\nset = []\nfinetune = 0.1\n")
    with pytest.raises(ValueError, match=r"\[a\] has unknown key\(s\) \['finetune'\]"):
        load_variants(path)


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def synthetic_line(variant: str, seed: int, resolution: str, method: str, fd: float, final: bool = True,
                   marks=(), seconds: float = 240.0, images: int = 500_000, digest: str = "d1") -> dict:
    h, w = (int(v) for v in resolution.split("x"))
    return {
        "result_version": 1, "run": f"{variant}_s{seed}", "variant": variant, "description": "", "config_digest": digest,
        "design": "plain" if "50" in variant else "packed", "layout": "packed", "objective": "ddpm", "model": "FiT-B/2",
        "keep_ratio": 0.5 if "50" in variant else 1.0, "keep_count": None,
        "strategy": "uniform" if "50" in variant else None, "ratio_distribution": "constant",
        "resolution_dependent": False, "finetune_unmasked": 0.0, "seed": seed, "budget_seconds": 240.0,
        "ema_decay": 0.9999, "ema_warmup": True, "batch_size": 256, "device": "NVIDIA H200", "torch": "x",
        "git_commit": None, "checkpoint": "step_1", "step": 1, "images_seen": images, "phase": "main",
        "is_final": final, "marks": list(marks), "train_seconds": seconds, "images_per_s": images / seconds,
        "images_per_s_steady": 2000.0 + seed, "peak_mem_gib": 30.0, "compile_seconds": 0.0, "weights": "ema",
        "sampler": "ddim", "sampler_steps": 50, "cfg_scale": 1.5, "guidance_channels": "all", "labels": "per-class",
        "sample_seed": 0, "num_samples": 250, "precision": "bf16", "eval_id": "e1", "proxy_sha256": "ab" * 32,
        "reference": {}, "resolution": resolution, "height": h, "width": w, "tokens": h * w // 16,
        "split": "ID" if h * w <= 4096 else "OOD", "method": method, "sample_set": method, "shared_sample_set": False,
        "proxy_fd": fd, "proxy_precision": 0.5, "proxy_recall": 0.25, "proxy_class_accuracy": 0.8,
    }


def test_report_tables_and_plots_from_synthetic_lines(tmp_path):
    from maskfit.study_report import BEGIN, END, write_report

    results = tmp_path / "study" / "results"
    results.mkdir(parents=True)
    lines = []
    for seed, fd in ((0, 10.0), (1, 12.0), (2, 14.0)):
        lines += [synthetic_line("packed", seed, "64x64", "none", fd),
                  synthetic_line("packed", seed, "96x96", "vision_yarn", fd + 5),
                  synthetic_line("packed", seed, "64x64", "none", fd + 20, final=False, marks=[250_000],
                                 seconds=120.0, images=250_000)]
    lines += [synthetic_line("plain50", 0, "64x64", "none", 9.0), synthetic_line("plain50", 0, "96x96", "vision_yarn", 11.0),
              synthetic_line("plain50", 0, "64x64", "none", 15.0, final=False, marks=[250_000], seconds=70.0, images=260_000),
              synthetic_line("plain50", 1, "64x64", "none", 30.0, digest="d2")]  # another config: its own group
    (results / "a.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    report = tmp_path / "REPORT.md"
    report.write_text(f"# Hand-written title\n\n{BEGIN}\nold tables\n{END}\n\n## Findings\n\nkept\n")
    write_report(results, report)
    text = report.read_text()
    assert text.startswith("# Hand-written title") and text.rstrip().endswith("kept") and "old tables" not in text
    assert "| packed | 12.00 ± 2.00 (n=3) | 17.00 ± 2.00 (n=3) |" in text  # mean ± sample std over 3 seeds
    assert "| plain50 [1] | 9.00 | 11.00 |" in text and "| plain50 [2] | 30.00 | – |" in text
    assert "ID 64x64 none | OOD 96x96 vision_yarn" in text
    assert "**250,000 images**" in text and "| packed | 32.00 ± 2.00 (n=3) |" in text
    assert "At a glance" not in text  # one run with three seeds: nothing to set beside it
    for name in ("fd_vs_gpu_time", "fd_vs_images_seen", "fd_vs_resolution", "throughput_memory"):
        assert (tmp_path / "study" / "plots" / f"{name}.png").stat().st_size > 1000
        assert f"](study/plots/{name}.png)" in text
    # The curves: only 64x64 was evaluated before the end (96x96 has one point per run, a table's business)
    from maskfit.study_report import _collect, curve_points, group_labels

    curves = curve_points(_collect(lines, group_labels(lines)), ["packed", "plain50 [1]"],
                          [("64x64", "none"), ("96x96", "vision_yarn")], "train_seconds")
    assert list(curves) == [("64x64", "none")]
    assert curves[("64x64", "none")]["packed"] == [(120.0, 32.0, 2.0), (240.0, 12.0, 2.0)]
    # FD against resolution: one panel per run, all on one logarithmic y axis (runs compare across panels)
    from maskfit.study_report import plot_resolution

    fig = plot_resolution(_collect(lines, group_labels(lines)), ["packed", "plain50 [1]", "plain50 [2]"],
                          [("64x64", "none"), ("96x96", "vision_yarn")], tmp_path / "res.png")
    assert len(fig.axes) == 3 and {ax.get_ylim() for ax in fig.axes} == {fig.axes[0].get_ylim()}
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    low, high = fig.axes[0].get_ylim()
    assert low < 9.0 and high > 30.0  # spans every run's points (plain50 [1] at 9, plain50 [2] at 30)


def test_glance_table_sets_the_runs_with_three_seeds_side_by_side(tmp_path):
    from maskfit.study_report import write_report

    results = tmp_path / "study" / "results"
    results.mkdir(parents=True)
    lines = [synthetic_line(variant, seed, "64x64", "none", fd + seed, images=images)
             for variant, fd, images in (("packed", 10.0, 200_000), ("plain50_ft", 8.0, 360_000)) for seed in range(3)]
    lines += [synthetic_line("plain75", 0, "64x64", "none", 7.0)]  # one seed: not at a glance
    (results / "a.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    write_report(results, tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    glance = text[text.index("### At a glance"):text.index("### Runs")]
    assert "| | packed (3 seeds) | plain50_ft (3 seeds) |" in glance and "plain75" not in glance
    assert "| images seen | 200,000 ± 0 | 360,000 ± 0 |" in glance  # equal across seeds: a spread of 0
    assert "| ID 64x64 none | 11.00 ± 1.00 | 9.00 ± 1.00 |" in glance
    # ... and drawn: one series per run at the table's means, bars the sample std
    assert "](study/plots/glance.png)" in glance and (tmp_path / "study" / "plots" / "glance.png").stat().st_size > 1000
    from maskfit.study_report import _collect, glance_runs, group_labels, label_of, plot_glance, split_extra

    main_lines, _ = split_extra(lines)
    labels = group_labels(main_lines)
    row_labels = list(dict.fromkeys(label_of(l, labels) for l in main_lines))
    chosen = glance_runs(main_lines, labels, row_labels)
    assert [label for label, _ in chosen] == ["packed", "plain50_ft"]
    fig = plot_glance(chosen, row_labels, _collect(main_lines, labels), [("64x64", "none")], tmp_path / "g.png")
    series = fig.axes[0].containers  # errorbar containers, one per run
    assert [list(c.lines[0].get_ydata()) for c in series] == [[11.0], [9.0]]
    assert fig.axes[0].get_ylim()[0] == 0


def test_report_without_results_says_so_and_creates_the_template(tmp_path):
    from maskfit.study_report import main as report_main

    (tmp_path / "results").mkdir()
    assert report_main([str(tmp_path / "results"), "--out", str(tmp_path / "REPORT.md")]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "No result lines yet" in text and "## Findings" in text
    assert report_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "R.md")]) == 2


# --------------------------------------------------------------------------------------------------
# GPU (skipped here): the warm-up keeps the step free of host syncs
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ema_warmup_step_has_no_host_sync(tmp_path):
    from maskfit.data.pipeline import build_training_data
    from maskfit.train import build_training_run, run_patch_size, train_step
    from tests.test_gpu import _real_path_config

    cfg = _real_path_config(tmp_path, "flow", "plain", "images")
    cfg.optim.ema_warmup = True
    data = build_training_data(cfg, run_patch_size(cfg))
    run = build_training_run(cfg, data.channels)
    for step in range(2):
        train_step(run, data.next_device_batch(step, run.device), step)
    torch.cuda.synchronize()
    flat = [data._next_flat(step) for step in (2, 3)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, f in zip((2, 3), flat):
            train_step(run, f.to(run.device), step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_git_dirty_reports_a_tree_that_differs_from_its_commit(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from maskfit.experiment import _git_dirty

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.chdir(tmp_path)
    assert _git_dirty() is None  # not a repository
    run = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    run("add", "f.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    assert _git_dirty() is False
    (tmp_path / "untracked.txt").write_text("u")  # untracked files are not the code that ran
    assert _git_dirty() is False
    (tmp_path / "f.txt").write_text("b")
    assert _git_dirty() is True


def _grid_archive(path: Path, run: str, steps=(10, 20), extra: bool = True) -> None:
    """An archive shaped like tools/study.sh run's: grids of two checkpoints, 8 x 2 images of HxW with 2-px borders,
    under the main evaluation ``abc``; then, as ``--also-cfg`` adds, the last checkpoint's 64x64 grid under another
    evaluation ``xyz`` (colour 250, 0, 0)."""
    import io
    import tarfile

    from PIL import Image

    def add(tar, name, size, colour):
        h, w = size
        buf = io.BytesIO()
        Image.new("RGB", (2 + 8 * (w + 2), 2 + 2 * (h + 2)), colour).save(buf, format="PNG")
        info = tarfile.TarInfo(name)
        info.size = buf.tell()
        buf.seek(0)
        tar.addfile(info, buf)

    with tarfile.open(path, "w:gz") as tar:
        for step in steps:
            for split, (h, w), method in (("id", (64, 64), "none"), ("id", (48, 80), "none"),
                                          ("ood", (96, 96), "vision_yarn"), ("ood", (96, 96), "none")):
                add(tar, f"{run}/eval/abc/step_{step:07d}/{split}/samples/{method}/grid_{h}x{w}.png", (h, w), (step, h, w))
        if extra:
            add(tar, f"{run}/eval/xyz/step_{steps[-1]:07d}/id/samples/none/grid_64x64.png", (64, 64), (250, 0, 0))


def test_sample_sheet_takes_the_final_checkpoint_one_row_per_set_in_protocol_order(tmp_path):
    from PIL import Image

    from maskfit.study_report import write_report
    from maskfit.study_sheets import main as sheets_main, read_sheet, sheet_strip

    _grid_archive(tmp_path / "packed_s0.tar.gz", "packed_s0")
    study = tmp_path / "study"
    assert sheets_main([str(tmp_path / "packed_s0.tar.gz"), "--out", str(study / "sheets")]) == 0
    order = (study / "sheets" / "packed_s0.txt").read_text()
    assert order.startswith("step 20 (eval abc);")  # the last checkpoint, not the first; its main evaluation
    assert order.index("48x80 none") < order.index("64x64 none") < order.index("96x96 none") < order.index("96x96 vision_yarn")
    sheet = Image.open(study / "sheets" / "packed_s0.jpg")
    assert sheet.size == (2 + 8 * 98, 4 * 2 + 50 + 66 + 98 + 98 + 3 * 6)  # widest strip; one row (h + 2 + 2) per set, gaps
    assert abs(sheet.getpixel((10, 10))[0] - 20) <= 3  # drawn from step 20's grids (JPEG tolerance)
    # Each strip cuts back out where it was laid: the 64x64 one is the main evaluation's (20, 64, 64), not xyz's.
    step, keys, read = read_sheet(study / "sheets" / "packed_s0.jpg")
    assert step == 20 and keys[:2] == [(48, 80, "none"), (64, 64, "none")]
    strip = np.asarray(sheet_strip(read, keys, (64, 64, "none")), dtype=float)
    assert strip.shape == (2 + 64 + 2, 2 + 8 * 66, 3)
    assert np.abs(strip[10:-10, 10:-10] - [20, 64, 64]).max() <= 6
    # The final checkpoint's extra evaluation (xyz) has a sheet of its own, its strips named by eval id ...
    assert (study / "sheets" / "packed_s0.extras.txt").read_text() == "step 20; strips top to bottom: 64x64 none (eval xyz)\n"
    extras = np.asarray(Image.open(study / "sheets" / "packed_s0.extras.jpg"), dtype=float)
    assert extras.shape == (2 + 64 + 2, 2 + 8 * 66, 3) and np.abs(extras[10:-10, 10:-10] - [250, 0, 0]).max() <= 8
    (study / "results").mkdir()
    main = [synthetic_line("packed", 0, res, "none", 5.0) for res in ("64x64", "48x80")]
    subsets = {**synthetic_line("packed", 0, "64x64", "none", 7.0), "eval_id": "xyz", "subset_keep": 0.5}
    (study / "results" / "a.jsonl").write_text("".join(json.dumps(l) + "\n" for l in [*main, subsets]))
    write_report(study / "results", tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert "![samples of packed_s0](study/sheets/packed_s0.jpg)" in text and "step 20 (eval abc); strips top to bottom" in text
    assert "![samples of packed_s0.extras]" not in text  # not listed as a run's sheet
    # ... which the report names by the setting that evaluation changed
    assert ("**packed_s0, extra evaluations of the same checkpoint** (step 20; strips top to bottom: 64x64 none "
            "(token subsets of 0.5))") in text
    assert "![extra evaluations of packed_s0](study/sheets/packed_s0.extras.jpg)" in text
    # a sheet rewritten from an archive without extras drops the old extras sheet
    _grid_archive(tmp_path / "plain.tar.gz", "packed_s0", extra=False)
    assert sheets_main([str(tmp_path / "plain.tar.gz"), "--out", str(study / "sheets")]) == 0
    assert not (study / "sheets" / "packed_s0.extras.jpg").exists()
    assert sheets_main([str(tmp_path / "missing.tar.gz"), "--out", str(study / "sheets")]) == 2


def test_config_digest_ignores_execution_only_fields_and_code_digest_follows_the_sources(tmp_path, monkeypatch):
    import maskfit.experiment as experiment
    from maskfit.config import load_config

    base = load_config("configs/study/base.toml")
    other = load_config("configs/study/base.toml", overrides=["data.decode_once=false"])
    assert base.data.decode_once and not other.data.decode_once
    assert experiment.config_digest(base) == experiment.config_digest(other)  # bit-identical batches: one recipe
    # how the same step executes (compile mode, DDP buckets, checkpoint format) leaves the recipe as it is
    executed_otherwise = load_config("configs/study/base.toml", overrides=[
        "train.compile=true", 'train.compile_mode="max-autotune-no-cudagraphs"', "train.ddp_bucket_mb=25",
        'train.checkpoint_format="full"'])
    assert experiment.config_digest(executed_otherwise) == experiment.config_digest(
        load_config("configs/study/base.toml", overrides=["train.compile=true"]))
    assert experiment.config_digest(base) != experiment.config_digest(
        load_config("configs/study/base.toml", overrides=["mask.keep_ratio=0.5"]))
    # the digests the study's committed result lines carry (study/results), from today's base config and variants
    # (tools/study.sh points data.root at the carried copy)
    carried = load_config("configs/study/base.toml", overrides=['data.root=".carry/imagenette/train-128"'])
    assert experiment.config_digest(carried) == "97ee2ce26c12bf6c"  # packed_s0..s2
    decoder = ['data.root=".carry/imagenette/train-128"', "mask.keep_ratio=0.5", 'mask.design="decoder"']
    assert experiment.config_digest(load_config("configs/study/base.toml", overrides=decoder)) == "130dfdaed3cd8743"
    # a field added later (LATER_RECIPE_DEFAULTS) keeps those digests at its earlier value, and enters them otherwise
    with_embedding = load_config("configs/study/base.toml", overrides=[*decoder, "mask.decoder_pos_embed=true"])
    assert experiment.config_digest(with_embedding) != "130dfdaed3cd8743"
    # code_digest hashes the package folder it lives in: a copy with one byte changed gets another digest
    pkg = tmp_path / "maskfit"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(experiment, "__file__", str(pkg / "experiment.py"))
    first = experiment.code_digest()
    (pkg / "a.py").write_text("x = 2\n")
    assert experiment.code_digest() != first and len(first) == 16


def test_balanced_indices_take_the_classes_in_turn_without_replacement():
    from maskfit.study_floor import balanced_indices

    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    idx = balanced_indices(labels, 6, np.random.default_rng(0))
    assert [labels[i] for i in idx] == [0, 1, 2, 0, 1, 2] and len(set(idx.tolist())) == 6
    with pytest.raises(ValueError, match="class 1 has fewer than 3 training images"):
        balanced_indices(labels, 8, np.random.default_rng(0))


def test_real_image_floor_scores_training_images_against_the_holdout_reference(assets, tmp_path):
    from maskfit.study_floor import main as floor_main
    from maskfit.study_floor import summarise

    out = tmp_path / "floor.jsonl"
    assert floor_main([str(assets / "tiny.toml"), "--proxy", str(assets / "proxy.safetensors"), "--resolutions",
                       "16x16,24x24", "--num-images", "6", "--draws", "2", "--out", str(out)]) == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(l["resolution"], l["draw"]) for l in lines] == [("16x16", 0), ("24x24", 0), ("16x16", 1), ("24x24", 1)]
    assert all(l["num_samples"] == 6 and l["proxy_fd"] >= 0 and 0 <= l["proxy_class_accuracy"] <= 1 for l in lines)
    # The same draw at the same size is the same images with the same crops: a second run writes the same numbers
    again = tmp_path / "again.jsonl"
    assert floor_main([str(assets / "tiny.toml"), "--proxy", str(assets / "proxy.safetensors"), "--resolutions",
                       "16x16,24x24", "--num-images", "6", "--draws", "2", "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()
    summary = summarise(lines)
    assert set(summary) == {"16x16", "24x24"} and summary["16x16"]["proxy_fd"][1] >= 0
    assert floor_main([str(assets / "tiny.toml"), "--proxy", str(assets / "proxy.safetensors"), "--draws", "1",
                       "--out", str(out)]) == 2


def test_report_shows_the_real_image_floor_beside_the_results(tmp_path):
    from maskfit.study_report import write_report

    study = tmp_path / "study"
    (study / "results").mkdir(parents=True)
    (study / "results" / "a.jsonl").write_text(json.dumps(synthetic_line("packed", 0, "64x64", "none", 5.0)) + "\n")
    floor = [{"resolution": "64x64", "draw": d, "num_samples": 200, "proxy_fd": fd, "proxy_precision": 0.9,
              "proxy_recall": 0.8, "proxy_class_accuracy": 0.7} for d, fd in enumerate((1.0, 2.0, 3.0))]
    (study / "floor.jsonl").write_text("".join(json.dumps(l) + "\n" for l in floor))
    write_report(study / "results", tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert "### Real-image floor" in text and "3 draws" in text
    assert "| proxy FD | 2.00 ± 1.00 |" in text  # mean ± sample std of 1, 2, 3


def test_report_tables_the_decoder_probe_per_checkpoint(tmp_path):
    from maskfit.study_report import write_report

    study = tmp_path / "study"
    (study / "results").mkdir(parents=True)
    (study / "results" / "a.jsonl").write_text(json.dumps(synthetic_line("decoder", 0, "64x64", "none", 5.0)) + "\n")
    (study / "gap").mkdir()
    probe = [{"checkpoint": "/tmp/study/decoder50_s0/run/checkpoints/step_0000391", "weights": "ema", "way": way,
              "t": t, "eps_mse": base + t / 10000} for way, base in (("unmasked", 0.3), ("masked", 0.1),
                                                                     ("full_encoder", 0.2)) for t in (50, 950)]
    (study / "gap" / "decoder50_s0_decoder_gap.jsonl").write_text("".join(json.dumps(l) + "\n" for l in probe))
    write_report(study / "results", tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert "### Does the decoder lean on mask tokens?" in text
    # means over t = 50 and 950: 0.3 + 0.05 = 0.35 unmasked; t = 950 in brackets
    assert "| decoder50_s0 | step_0000391 | ema | 0.3500 (0.3950) | 0.1500 (0.1950) | 0.2500 (0.2950) |" in text


def test_study_queue_names_known_variants_and_next_skips_the_runs_with_results(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    from maskfit.experiment import load_variants

    root = Path(__file__).resolve().parents[1]
    variants = load_variants(root / "configs/study/variants.toml")
    queue = [l.strip() for l in (root / "study/queue.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert len(queue) == len(set(queue))
    for spec in queue:
        name, seed = spec.split(":")
        assert name in variants and seed.isdigit(), spec
    env = dict(os.environ, STUDY_WORK=str(tmp_path))  # this machine's work folder: nothing started here

    def pending():
        done = subprocess.run(["bash", "tools/study.sh", "next", "100"], cwd=root, capture_output=True, text=True,
                              check=True, env=env)
        return done.stdout.split()

    expected = [s for s in queue if not (root / "study/results" / f"{s.replace(':', '_s')}.jsonl").exists()]
    assert pending() == expected
    if expected:  # a run started on this machine (a warm device's work folder) is not handed out again
        (tmp_path / expected[0].replace(":", "_s")).mkdir()
        assert pending() == expected[1:]


def test_differences_are_called_only_beyond_both_spreads():
    from maskfit.study_report import difference_cell, welch_p

    assert difference_cell([9.0], [6.0], 2) == "+3.00 (n=1/1)"
    assert difference_cell([9.0, 9.2, 8.8], [6.0, 6.2, 5.8], 2).endswith("**called**")  # |3| > 0.2 + 0.2
    near = difference_cell([6.5, 7.5, 6.0], [6.0, 7.0, 6.4], 2)  # Δ 0.2 against spreads of ~0.76 + ~0.50
    assert near.startswith("+0.20") and "called" not in near
    assert welch_p([1.0, 1.1, 0.9], [5.0, 5.1, 4.9]) < 0.001 and welch_p([1.0], [2.0, 3.0]) is None
    assert difference_cell([], [1.0], 2) == "–"


def test_paired_differences_use_the_shared_seeds_only():
    from maskfit.study_report import paired_cell, paired_p

    # seed luck shared by both runs (seed 1 bad for both): unpaired the gap is lost in the spread, paired it is not
    run, ref = {0: 7.0, 1: 9.5, 2: 7.6, 5: 100.0}, {0: 6.5, 1: 9.0, 2: 7.0}
    assert paired_cell(run, ref, 2) == "+0.53 ± 0.06 (n=3, p=0.00)"  # seed 5 has no pair: left out
    assert paired_p([0.5, 0.5, 0.6]) < 0.01 and paired_p([0.5]) is None
    assert paired_cell({0: 1.0}, {0: 2.0, 1: 3.0}, 2) == "–"  # one pair: nothing to say


def test_report_reads_every_run_against_the_reference_runs(tmp_path):
    from maskfit.study_report import write_report

    results = tmp_path / "study" / "results"
    results.mkdir(parents=True)
    lines = []
    for seed, (packed, plain) in enumerate(((6.0, 9.0), (6.2, 9.2), (5.8, 8.8))):
        lines += [synthetic_line("packed", seed, "64x64", "none", packed), synthetic_line("plain50", seed, "64x64", "none", plain)]
    (results / "a.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    write_report(results, tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert "### Differences at equal GPU time" in text and "proxy FD minus packed's" in text
    assert "| plain50 | +3.00 (p=0.00) **called** |" in text
    assert "proxy FD minus packed's, paired by seed" in text and "| plain50 | +3.00 ± 0.00 (n=3" in text


def test_gap_table_means_over_t_and_high_noise_ratios(tmp_path):
    """The decoder probe's table: mean over t, t = 950 in brackets, unmasked ÷ masked at t = 750 and 950."""
    from maskfit.study_report import gap_table

    values = {"unmasked": {50: 0.2, 250: 0.04, 500: 0.01, 750: 0.003, 950: 0.0006},
              "masked": {50: 0.3, 250: 0.04, 500: 0.01, 750: 0.002, 950: 0.0002},
              "full_encoder": {50: 0.3, 250: 0.04, 500: 0.01, 750: 0.002, 950: 0.0002}}
    lines = [{"checkpoint": "/tmp/x/run/checkpoints/step_0000010", "weights": "ema", "way": way, "t": t, "eps_mse": v}
             for way, per_t in values.items() for t, v in per_t.items()]
    (tmp_path / "dec_s0_decoder_gap.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    # A plain control in the newer file name, with x0 slopes and no full-encoder way.
    plain = [{"checkpoint": "/tmp/y/run/checkpoints/step_0000020", "weights": "raw", "way": way, "t": t,
              "eps_mse": values[way][t], "x0_slope": {"unmasked": 0.25, "masked": 0.5}[way]}
             for way in ("unmasked", "masked") for t in values[way]]
    (tmp_path / "pl_s1_gap.jsonl").write_text("".join(json.dumps(l) + "\n" for l in plain))
    table = gap_table(tmp_path)
    rows = [line for line in table if line.startswith(("| dec_s0 |", "| pl_s1 |"))]
    assert rows == [
        "| dec_s0 | step_0000010 | ema | 0.0507 (0.0006) | 0.0704 (0.0002) | 0.0704 (0.0002) | 1.50 / 3.00 | – |",
        "| pl_s1 | step_0000020 | raw | 0.0507 (0.0006) | 0.0704 (0.0002) | – | 1.50 / 3.00 | 0.250 / 0.500 |",
    ]
    assert gap_table(tmp_path / "missing") == []


def test_study_collect_files_a_device_runs_results_and_regenerates_the_report(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    device = tmp_path / "device"
    device.mkdir()
    (device / "packed_s0.jsonl").write_text(json.dumps(synthetic_line("packed", 0, "64x64", "none", 5.0)) + "\n")
    probe = [{"checkpoint": "/tmp/study/decoder50_s0/run/checkpoints/step_0000391", "weights": "ema", "way": way,
              "t": t, "eps_mse": 0.1} for way in ("unmasked", "masked") for t in (750, 950)]
    (device / "decoder50_s0_gap.jsonl").write_text("".join(json.dumps(l) + "\n" for l in probe))
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**__import__("os").environ, "PYTHON": sys.executable, "PYTHONPATH": str(root / "src")}

    def collect(*dirs):
        return subprocess.run(["bash", str(root / "tools/study.sh"), "collect", *map(str, dirs)], cwd=repo, env=env,
                              capture_output=True, text=True)

    done = collect(device)
    assert done.returncode == 0, done.stderr
    assert (repo / "study/results/packed_s0.jsonl").read_text() == (device / "packed_s0.jsonl").read_text()
    assert (repo / "study/gap/decoder50_s0_gap.jsonl").exists()
    report = (repo / "REPORT.md").read_text()
    assert "| packed |" in report and "| decoder50_s0 | step_0000391 | ema |" in report
    assert collect(device).returncode == 0  # the same files again: nothing changes
    (device / "packed_s0.jsonl").write_text(json.dumps(synthetic_line("packed", 0, "64x64", "none", 6.0)) + "\n")
    refused = collect(device)
    assert refused.returncode == 1 and "study/results/packed_s0.jsonl exists with other content" in refused.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no NAME_sSEED.jsonl" in collect(empty).stderr


def test_trajectory_table_reads_the_probes_sampler_path_lines(tmp_path):
    from maskfit.study_report import gap_table, trajectory_table

    ckpt = "/tmp/study/decoder50_s0/run/checkpoints/step_0000391"
    lines = [{"checkpoint": ckpt, "weights": w, "way": "trajectory", "t": t, "x0_std": t / 1000 + (w == "raw")}
             for w in ("ema", "raw") for t in (999, 749, 500, 250, 125, 42, 0, 83)]
    lines += [{"checkpoint": ckpt, "weights": "ema", "way": "trajectory_final", "x0_std": 0.25},
              {"checkpoint": None, "weights": None, "way": "data", "x0_std": 0.5}]
    (tmp_path / "decoder50_s0_gap.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    table = trajectory_table(tmp_path)
    assert "| decoder50_s0 | step_0000391 | 0.999 | 0.749 | 0.500 | 0.250 | 0.125 | 0.042 | 0.000 | 0.250 | 0.500 |" in table
    assert gap_table(tmp_path) == []  # no epsilon lines: no gap table, and no error


def test_run_styles_differ_for_the_first_thirty_runs():
    from maskfit.study_report import run_style

    styles = [tuple(sorted(run_style(j).items())) for j in range(30)]
    assert len(set(styles)) == 30
    # same colour ten apart, told apart by the line and the marker
    assert run_style(0)["color"] == run_style(10)["color"]
    assert run_style(0)["linestyle"] != run_style(10)["linestyle"] and run_style(0)["marker"] != run_style(10)["marker"]
