"""End to end through the command line: prepare a latent cache with a (tiny) SD-VAE, train, sample."""
import json

import numpy as np
import pytest
import torch

from maskfit.cli import main

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    )
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return path


def test_prepare_train_sample_with_a_vae(tmp_path, vae_dir, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "model": {"preset": "FiTv2-tiny", "overrides": {"num_classes": 4}},
        "data": {"source": "synthetic", "num_images": 12, "num_classes": 4, "token_budget": 16,
                 "autoencoder": "sd-vae", "vae_path": str(vae_dir), "layout": "padded"},
        "diffusion": {"objective": "flow"},
        "train": {"out_dir": str(run), "steps": 2, "batch_size": 4, "ckpt_every": 2, "device": "cpu"},
    }))
    assert main(["prepare", str(config), "--out", str(cache), "--device", "cpu"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert sum(shard["count"] for shard in manifest["shards"]) == 12
    assert main(["train", str(config), "--quiet", "--set", "data.source=latents",
                 "--set", f"data.root={json.dumps(str(cache))}"]) == 0
    out = tmp_path / "samples"
    # Latent factor 2 (tiny VAE) x patch 2: pixel sizes must be multiples of 4; 12x20 is a 3x5 grid.
    assert main(["sample", str(run), "-r", "12x20", "-r", "8", "-n", "3", "--steps", "2", "--batch-size", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    arr = np.load(out / "samples_12x20.npz")["arr_0"]
    assert arr.shape == (3, 12, 20, 3) and arr.dtype == np.uint8
    assert (out / "grid_8x8.png").exists()
    # An interrupted run resumes: finished shards are kept, not redrawn.
    shard = out / "12x20" / "shard_00000.npz"
    before = shard.stat().st_mtime_ns
    assert main(["sample", str(run), "-r", "12x20", "-n", "3", "--steps", "2", "--batch-size", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert shard.stat().st_mtime_ns == before


def test_sample_rejects_sizes_the_patch_grid_does_not_divide(tmp_path, capsys):
    from maskfit.sample import check_resolution

    with pytest.raises(ValueError, match=r"cannot sample 250x256.*multiples of 16.*height 240 or 256"):
        check_resolution(250, 256, 16)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"model": {"preset": "FiT-Q/2"}, "train": {"out_dir": str(tmp_path / "r")}}))
    assert main(["train", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "maskfit train: error: unknown model preset 'FiT-Q/2'" in err and "Traceback" not in err


def test_models_lists_every_preset_with_its_size(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "FiT-B/2 " in out and "158.7M" in out and "FiTv2-XL/2" in out and "671.0M" in out


def test_packed_mixed_resolution_sampling_matches_one_resolution_per_stream(tmp_path):
    """Images sampled in one packed stream of several resolutions equal the same draws made alone."""
    from maskfit.config import config_from_dict
    from maskfit.models.transformer import FiT, model_config
    from maskfit.sample import SamplerOptions, sample_tokens
    from maskfit.train import build_diffusion

    torch.manual_seed(0)
    model = FiT(model_config("FiTv2-tiny", num_classes=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diffusion = build_diffusion(config_from_dict({"diffusion": {"objective": "flow"}}))
    grids, labels = [(3, 5), (4, 4), (2, 6)], torch.tensor([0, 1, 2])
    options = SamplerOptions(method="euler", steps=3, cfg_scale=2.0)
    mixed = sample_tokens(model, diffusion, grids, labels, options, torch.Generator().manual_seed(0), torch.device("cpu"))
    # The packed draw's noise is one (T, D) tensor; replay each image's slice of it alone.
    noise = torch.randn(sum(h * w for h, w in grids), model.cfg.token_dim, generator=torch.Generator().manual_seed(0))
    start = 0
    for (h, w), label, got in zip(grids, labels, mixed):
        n = h * w
        from maskfit.sample import guided_denoiser
        from maskfit.tokens import pack

        layout = pack([torch.empty(n, 0)], [(h, w)], label[None]).layout
        alone = diffusion.sample(guided_denoiser(model, diffusion, options), noise[start : start + n], label[None],
                                 layout, steps=3, method="euler")
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
        start += n


def test_sample_cli_with_an_aspect_distribution(tmp_path):
    from maskfit.train import train
    from tests.test_train import tiny_run

    result = train(tiny_run(tmp_path / "run", steps=2), progress=False)
    out = tmp_path / "mixed"
    assert main(["sample", str(result.run_dir), "--distribution", "imagenet", "-n", "6", "--steps", "2",
                 "--batch-size", "4", "--out", str(out), "--device", "cpu"]) == 0
    files = sorted(out.glob("samples_*.npz"))
    assert files and sum(len(np.load(f)["arr_0"]) for f in files) == 6
    for f in files:  # every file holds one size, the one its name says
        h, w = map(int, f.stem.split("_")[1].split("x"))
        assert np.load(f)["arr_0"].shape[1:3] == (h, w)
