"""tools/probes/: the gap probe's hybrid forward and numbers, the sharpness probe's (both back REPORT findings)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from maskfit.models.transformer import FiT, model_config
from maskfit.tokens import masked_view, pack

ROOT = Path(__file__).resolve().parents[1]


def _load_probe(file_name: str):
    """A probe script of tools/probes/ as a module (the probes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(file_name.removesuffix(".py"), ROOT / "tools/probes" / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probe():
    return _load_probe("decoder_mask_token_gap.py")


def _decoder_model():
    torch.manual_seed(0)
    model = FiT(model_config("FiT-tiny", patch_size=1, in_channels=4, num_classes=3, mask_design="decoder",
                             decoder_depth=1, decoder_hidden=32, decoder_heads=2))
    with torch.no_grad():  # adaLN-Zero and zero output layers would make every output 0
        for p in model.parameters():
            p.normal_(std=0.05)
    return model.eval()


def _batch(keep_all: bool):
    grids = [(3, 4), (2, 5)]
    g = torch.Generator().manual_seed(0)
    batch = pack([torch.randn(h * w, 4, generator=g) for h, w in grids], grids, torch.tensor([0, 2]))
    keep = [torch.arange(h * w) if keep_all else torch.arange(0, h * w, 2) for h, w in grids]
    view = masked_view(batch.layout, keep)
    return type(batch)(batch.tokens, batch.y, batch.layout, mask=view)


def test_full_encoder_forward_with_every_token_kept_is_the_sampling_forward():
    probe, model = _probe(), _decoder_model()
    batch = _batch(keep_all=True)
    t = torch.tensor([100, 900])
    with torch.no_grad():
        hybrid = probe.full_encoder_forward(model, batch.tokens, t, batch.y, batch.layout, batch.mask)
        sampling = model(batch.tokens, t, batch.y, batch.layout)
    assert torch.allclose(hybrid, sampling, atol=1e-6)
    # Half kept: mask tokens reach the decoder, so the kept tokens' outputs change.
    half = _batch(keep_all=False)
    with torch.no_grad():
        hybrid = probe.full_encoder_forward(model, half.tokens, t, half.y, half.layout, half.mask)
    assert not torch.allclose(hybrid[half.mask.index], sampling[half.mask.index], atol=1e-3)


@pytest.mark.parametrize("design", ["decoder", "plain"])
def test_gap_scores_each_way_at_each_timestep(design):
    probe = _probe()
    model = _decoder_model() if design == "decoder" else _plain_model()
    result = probe.gap(model, [_batch(keep_all=False)], torch.device("cpu"))
    assert set(result) == ({"unmasked", "masked", "full_encoder"} if design == "decoder" else {"unmasked", "masked"})
    for way in result.values():
        assert list(way) == list(probe.TIMESTEPS)
        assert all(v["eps_mse"] > 0 and v["x0_slope"] == v["x0_slope"] for v in way.values())
    again = probe.gap(model, [_batch(keep_all=False)], torch.device("cpu"))
    assert again == result  # fixed noise per (batch, t): the numbers are reproducible
    # Every token kept: the training forward is the sampling forward, and both score the same tokens.
    full = probe.gap(model, [_batch(keep_all=True)], torch.device("cpu"))
    for t in probe.TIMESTEPS:
        for metric in ("eps_mse", "x0_slope"):
            assert full["masked"][t][metric] == pytest.approx(full["unmasked"][t][metric], rel=1e-4)


def _plain_model():
    torch.manual_seed(0)
    model = FiT(model_config("FiT-tiny", patch_size=1, in_channels=4, num_classes=3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model.eval()


def test_x0_slope_is_the_per_image_regression_slope():
    probe = _probe()
    grids = [(2, 3), (1, 4)]
    g = torch.Generator().manual_seed(1)
    target = torch.randn(10, 4, generator=g)
    layout = pack([target[:6], target[6:]], grids, torch.tensor([0, 1])).layout
    counted = torch.ones(10, dtype=torch.bool)
    # Image 0 predicted as 2 x + 3, image 1 as -0.5 x + 1: slopes 2 and -0.5, mean 0.75.
    prediction = torch.cat([2 * target[:6] + 3, -0.5 * target[6:] + 1])
    assert probe.per_image_slope(prediction, target, counted, layout) == pytest.approx(0.75)
    # Tokens not counted do not enter: spoil image 1's last token and leave it out.
    spoiled = prediction.clone()
    spoiled[9] = 100.0
    counted[9] = False
    assert probe.per_image_slope(spoiled, target, counted, layout) == pytest.approx(0.75)


def _sharpness_probe():
    return _load_probe("sample_sharpness.py")


def test_grid_cells_returns_the_images_image_grid_laid_out():
    import numpy as np

    from maskfit.sample import grid_cells, image_grid

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 250, size=(6, 10, 3), dtype=np.uint8) for _ in range(11)]  # last row not full
    cells = grid_cells(image_grid(images, columns=4), height=6, width=10)
    assert cells.shape == (11, 6, 10, 3)
    np.testing.assert_array_equal(cells, np.stack(images))
    with pytest.raises(ValueError, match="holds no 40x30 cell"):
        grid_cells(image_grid(images[:1], columns=1), height=30, width=40)


def test_sharpness_probe_reads_the_64x64_grids_of_each_checkpoint(tmp_path):
    import tarfile

    import numpy as np

    from maskfit.sample import image_grid

    probe = _sharpness_probe()
    flat = np.full((2, 8, 8, 3), 128, dtype=np.uint8)
    checker = ((np.indices((8, 8)).sum(0) % 2) * 255).astype(np.uint8)  # 0/1 checkerboard: detail 4, contrast 0.5
    board = np.repeat(checker[None, :, :, None], 3, axis=-1)  # (1, 8, 8, 3)
    # An archive as tools/study.sh writes it: the 64x64 none grid of two checkpoints, one other size, one OOD grid.
    for step, image in ((10, board), (20, flat[:1])):
        folder = tmp_path / f"run_s0/eval/abc/step_{step:07d}/id/samples/none"
        folder.mkdir(parents=True)
        image_grid([image[0]] * 3, columns=2).save(folder / "grid_8x8.png")
        image_grid([image[0]] * 3, columns=2).save(folder / "grid_4x4.png")
    ood = tmp_path / "run_s0/eval/abc/step_0000020/ood/samples/none"
    ood.mkdir(parents=True)
    image_grid([board[0]], columns=1).save(ood / "grid_8x8.png")
    archive = tmp_path / "run_s0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "run_s0", arcname="run_s0")
    out = tmp_path / "sharp.jsonl"
    assert probe.main([str(archive), "--size", "8x8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["step"], r["laplacian"], r["contrast"]) for r in rows] == [(10, 4.0, 0.5), (20, 0.0, 0.0)]
    with pytest.raises(SystemExit, match="grid_16x16.png"):
        probe.main([str(archive), "--size", "16x16"])


def test_decoder_mask_attention_is_the_mask_share_when_attention_is_uniform():
    from maskfit.models import transformer

    probe, model = _probe(), _decoder_model()
    batch = _batch(keep_all=False)  # every other token kept: 6 of 12 and 5 of 10 dropped
    t = torch.tensor([500, 500])
    before = transformer.attention
    attended, share = probe.decoder_mask_attention(model, batch.tokens, t, batch.y, batch.layout, batch.mask)
    assert transformer.attention is before  # restored
    assert share == pytest.approx(0.5)
    assert not attended == pytest.approx(share, abs=1e-3)  # random weights do not attend uniformly
    with torch.no_grad():  # q = k = 0: every key gets the same weight, so the mask tokens get their share
        model.decoder_blocks[0].attn.qkv.weight[:64].zero_()
        model.decoder_blocks[0].attn.qkv.bias[:64].zero_()
    attended, share = probe.decoder_mask_attention(model, batch.tokens, t, batch.y, batch.layout, batch.mask)
    assert attended == pytest.approx(0.5, abs=1e-6) and share == pytest.approx(0.5)
    result = probe.gap(model, [batch], torch.device("cpu"))
    assert all(result["masked"][s]["mask_attention"] == pytest.approx(0.5, abs=1e-6) for s in probe.TIMESTEPS)


def test_bucketed_and_jagged_attention_equal_the_models_on_a_length_sorted_stream():
    import sys

    sys.path.insert(0, str(ROOT / "tools/probes"))  # the probe imports its folder's cuda_timing
    try:
        probe = _load_probe("attention_buckets.py")
    finally:
        sys.path.remove(str(ROOT / "tools/probes"))
    from maskfit.models.attention import attention, prepare_attention

    ordered, runs = probe.sorted_by_length([(3, 4), (2, 2), (4, 3), (2, 5), (1, 4)])
    assert [h * w for h, w in ordered] == [12, 12, 10, 4, 4] and runs == [(12, 2), (10, 1), (4, 2)]
    layout = probe.layout_for(ordered, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.num_tokens, 2, 8, generator=g) for _ in range(3))
    expected = attention(q, k, v, prepare_attention(layout, "dense"))
    torch.testing.assert_close(probe.bucketed_attention(q, k, v, runs, "math"), expected)
    torch.testing.assert_close(probe.jagged_attention(q, k, v, layout, probe.BACKENDS["math"]), expected)


def test_per_image_std_and_the_trajectory_of_a_model_that_predicts_no_noise():
    probe = _probe()
    grids = [(1, 2), (2, 2)]
    x = torch.tensor([[0.0, 2.0], [2.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # (T=6, C=2)
    layout = pack([x[:2], x[2:]], grids, torch.tensor([0, 1])).layout
    assert probe.per_image_std(x, layout) == pytest.approx((4 / 3) ** 0.5 / 2)  # image 0: std of 0,2,2,0; image 1: 0
    # A fresh FiT outputs 0 (zero-initialised final layer): epsilon 0, so DDIM scales x_T by sqrt(ᾱ_prev / ᾱ_t)
    # each step and every x0 prediction is x_T / sqrt(ᾱ_999): the same std at every step, and as the samples'.
    model = FiT(model_config("FiT-tiny", patch_size=1, in_channels=4, num_classes=3)).eval()
    stds = probe.trajectory(model, token_budget=16, device=torch.device("cpu"))
    from maskfit.diffusion.gaussian import GaussianDiffusion

    acp_last = float(GaussianDiffusion().schedule.alphas_cumprod[-1])
    g = torch.Generator().manual_seed(7)  # the probe's fixed noise
    noise = torch.cat([torch.randn(16, 4, generator=g) for _ in range(probe.TRAJECTORY_IMAGES)])
    layout = pack(list(noise.split(16)), [(4, 4)] * probe.TRAJECTORY_IMAGES,
                  torch.zeros(probe.TRAJECTORY_IMAGES, dtype=torch.long)).layout
    expected = probe.per_image_std(noise, layout) / acp_last**0.5
    assert len(stds) == probe.TRAJECTORY_STEPS + 1 and max(k for k in stds if k != "final") == 999
    assert all(v == pytest.approx(expected, rel=1e-4) for v in stds.values())


def test_swiglu_probe_split_form_matches_the_model():
    """tools/probes/swiglu_backward.py: its two matmuls on the weight's halves give the model's SwiGLU output and
    gradients."""
    probe = _load_probe("swiglu_backward.py")
    from maskfit.models.transformer import SwiGLU

    torch.manual_seed(0)
    model, split = SwiGLU(16, 24), probe.SplitSwiGLU(16, 24)
    split.load_state_dict(model.state_dict())
    x = torch.randn(7, 16)
    outs = []
    for layer in (model, split):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.square().sum().backward()
        outs.append([out, xi.grad, *(p.grad for p in layer.parameters())])
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want)


def test_swiglu_probe_triton_kernel_matches_autograd(monkeypatch):
    """Its Triton backward kernel gives autograd's derivative of silu(gate) * value (Triton's interpreter on the
    CPU; skipped where triton is not installed, as in the project's venv)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    probe = _load_probe("swiglu_backward.py")
    if probe.triton is None:
        pytest.skip("triton is not installed: the kernel's check needs its interpreter")
    probe.check_kernel()
