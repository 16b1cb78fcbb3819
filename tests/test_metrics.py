"""ADM-compatible metrics on synthetic data and random-weight networks (no Inception weights needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from maskfit.evaluate import metrics as M
from maskfit.evaluate.adm_npz import (
    ADM_FEATURE_NETWORK,
    NpzImageReader,
    read_labels,
    read_reference,
    write_reference_npz,
    write_sample_npz,
)
from maskfit.evaluate.inception import (
    INCEPTION_SHA256_PREFIX,
    INCEPTION_URLS,
    InceptionWeightsError,
    build_random_inception,
    load_inception,
    resize_bilinear_tf1,
    sha256_file,
)
from maskfit.evaluate.proxy import LabeledImages, ProxyTrainConfig, load_proxy, save_proxy, train_classifier
from maskfit.evaluate.report import evaluate_samples, format_markdown, write_report


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: one thread is as fast, and two OpenMP threads on a busy 2-core machine
    # spin against each other (measured 60x slower); restored for other test modules.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# --------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------


def test_feature_statistics_match_numpy_float64():
    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    stats = M.feature_statistics(x, chunk_rows=64)  # several chunks
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    np.testing.assert_allclose(stats.mu, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)


def test_fid_of_identical_statistics_is_zero():
    x = np.random.default_rng(1).normal(size=(500, 32))
    stats = M.feature_statistics(x)
    assert abs(M.frechet_distance(stats, stats)) < 1e-9


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    got = M.frechet_distance(M.GaussianStats(mu1, np.diag(var1)), M.GaussianStats(mu2, np.diag(var2)))
    # d² = |mu1 - mu2|² + Σ (σ1 + σ2 - 2 sqrt(σ1 σ2)) for diagonal covariances (variances σ)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_rejects_mismatched_dimensions():
    a = M.GaussianStats(np.zeros(4), np.eye(4))
    b = M.GaussianStats(np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="different feature spaces"):
        M.frechet_distance(a, b)


# --------------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------------


def test_inception_score_of_one_hot_uniform_predictions_equals_class_count():
    k = 10
    probs = np.eye(k)[np.arange(10_000) % k]  # each 5000-split holds every class equally often
    assert M.num_is_splits(len(probs)) == 2
    assert M.inception_score(probs) == pytest.approx(k, rel=1e-12)


def test_inception_score_of_uniform_predictions_is_one_and_uses_unbiased_softmax():
    assert M.inception_score(np.full((50, 7), 1 / 7)) == pytest.approx(1.0, abs=1e-12)
    logits = torch.tensor([[40.0, 0.0, 0.0], [0.0, 40.0, 0.0], [0.0, 0.0, 40.0]])
    assert M.inception_score(M.class_probabilities(logits)) == pytest.approx(3.0, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Precision / Recall
# --------------------------------------------------------------------------------------------------


def test_precision_recall_identical_clouds_is_one_one():
    x = np.random.default_rng(3).normal(size=(60, 16)).astype(np.float32)
    for precision in ("adm", "float32"):
        pr = M.precision_recall(x, x.copy(), precision=precision)
        assert (pr.precision, pr.recall) == (1.0, 1.0)


def test_precision_recall_disjoint_far_clouds_is_zero_zero():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    far = rng.normal(size=(50, 8)).astype(np.float32) + 100.0
    pr = M.precision_recall(ref, far, block_size=16)
    assert (pr.precision, pr.recall) == (0.0, 0.0)


def test_precision_recall_sub_cloud_hand_computed():
    # Reference: 100 points on a line at 0..99; samples: the first 50 of them. Every sample is a
    # reference point -> precision 1. A sample's ball (k=3) has radius 2 inside the run and 3 at its
    # ends, so sample 49 covers references 50..52: recall = 53 / 100.
    line = np.stack([np.arange(100.0), np.zeros(100)], axis=1).astype(np.float32)
    pr = M.precision_recall(line, line[:50], precision="float32", block_size=32)
    assert pr.precision == 1.0
    assert pr.recall == pytest.approx(0.53)


def test_manifold_radii_blocked_equals_brute_force():
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(70, 5)).astype(np.float32))
    d = torch.cdist(x.double(), x.double()) ** 2
    expected = d.sort(1).values[:, 3]  # 4th smallest including self = 3rd neighbour
    got = M.manifold_radii(x, k=3, block_size=16, precision="float32")
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_float16_distances_fall_back_to_float32_on_overflow():
    a = torch.full((3, 4), 300.0)  # |a|² = 360 000 overflows float16 (max 65 504)
    b = torch.zeros(2, 4)
    d = M.pairwise_sq_distances(a, b, "adm")
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d, torch.full((3, 2), 360_000.0))


# --------------------------------------------------------------------------------------------------
# Inception network
# --------------------------------------------------------------------------------------------------


def test_tf1_resize_matches_hand_computed_example():
    # TF1 ResizeBilinear, align_corners=False, no half-pixel centres: src = dst * in/out.
    # 2 -> 4: src = 0, 0.5, 1, 1.5 -> (lower, upper) = (0,0), (0,1), (1,1), (1,1).
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    expected = torch.tensor(
        [[0.0, 5.0, 10.0, 10.0], [10.0, 15.0, 20.0, 20.0], [20.0, 25.0, 30.0, 30.0], [20.0, 25.0, 30.0, 30.0]]
    )
    torch.testing.assert_close(resize_bilinear_tf1(x, (4, 4))[0, 0], expected)
    # Downscale 4 -> 3 along x only (non-square): src = 0, 4/3, 8/3.
    row = torch.tensor([0.0, 30.0, 60.0, 90.0])[None, None, None]
    torch.testing.assert_close(resize_bilinear_tf1(row, (1, 3))[0, 0, 0], torch.tensor([0.0, 40.0, 80.0]))


@pytest.fixture(scope="module")
def random_inception():
    return build_random_inception(seed=0)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_inception_output_shapes_and_heads(random_inception, hw):
    net = random_inception
    captured = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o))
    images = torch.randint(0, 256, (2, *hw, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = net(images)
    hook.remove()
    assert out.pool3.shape == (2, 2048) and out.spatial.shape == (2, 2023) and out.logits.shape == (2, 1008)
    # sFID features: Mixed_6d's 1x1 branch (TF mixed_6/conv), first 7 channels, flattened H, W, C.
    torch.testing.assert_close(out.spatial, captured["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(out.logits, out.pool3 @ net.fc.weight.T)  # IS logits carry no bias


def test_inception_weights_missing_or_wrong_give_one_clear_error(tmp_path):
    missing = tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(InceptionWeightsError) as err:
        load_inception(missing)
    assert "not found" in str(err.value) and str(missing) in str(err.value) and INCEPTION_URLS[0] in str(err.value)

    bogus = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    bogus.write_bytes(b"not the weights")
    with pytest.raises(InceptionWeightsError) as err:
        load_inception(bogus)
    msg = str(err.value)
    assert sha256_file(bogus) in msg and INCEPTION_SHA256_PREFIX in msg and INCEPTION_URLS[0] in msg and str(bogus) in msg


def test_inception_state_dict_round_trip_with_pinned_sha(tmp_path, random_inception):
    path = tmp_path / "inception.pth"
    state = {k: v for k, v in random_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)  # torchvision names, no num_batches_tracked: like the pytorch-fid file
    digest = sha256_file(path)
    loaded = load_inception(path, expected_sha256=digest)
    assert loaded.weights_sha256 == digest and not loaded.training
    for key, value in state.items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


# --------------------------------------------------------------------------------------------------
# ADM .npz formats
# --------------------------------------------------------------------------------------------------


def test_sample_npz_round_trip_streams_batches(tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (7, 5, 9, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7)
    path = write_sample_npz(tmp_path / "samples.npz", images, labels)
    reader = NpzImageReader(path)
    batches = list(reader.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1] and reader.image_hw == (5, 9)
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(read_labels(path), labels)
    # ADM's own loader sees the same arrays.
    with np.load(path) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, arr_0=images)
    np.testing.assert_array_equal(np.concatenate(list(NpzImageReader(compressed).batches(4, limit=6))), images[:6])


def test_sample_npz_rejects_non_adm_layouts(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_sample_npz(tmp_path / "a.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="NCHW"):
        write_sample_npz(tmp_path / "b.npz", np.zeros((2, 3, 4, 4), np.uint8))


def test_reference_npz_adm_layout_and_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = rng.normal(size=4), np.eye(4) * 2
    mu_s, sigma_s = rng.normal(size=3), np.eye(3)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    adm = tmp_path / "VIRTUAL_toy.npz"
    np.savez(adm, arr_0=images, mu=mu.astype(np.float32), sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    ref = read_reference(adm)
    assert ref.feature_network == ADM_FEATURE_NETWORK and ref.num_images == 5 and ref.image_hw == (8, 8)
    assert ref.pool3.mu.dtype == np.float64
    np.testing.assert_array_equal(ref.spatial.sigma, sigma_s)
    ours = write_reference_npz(tmp_path / "ours.npz", "proxy:abc", pool3=M.GaussianStats(mu, sigma))
    back = read_reference(ours)
    assert back.feature_network == "proxy:abc" and back.num_images == 0 and back.spatial is None
    np.testing.assert_array_equal(back.pool3.mu, mu)


# --------------------------------------------------------------------------------------------------
# Proxy classifier and the report
# --------------------------------------------------------------------------------------------------


def _toy_colour_set(n_per_class: int, size: int, seed: int) -> LabeledImages:
    """Three trivially separable classes: noisy red, green and blue squares."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    images = rng.integers(0, 60, (len(labels), size, size, 3))
    images[np.arange(len(labels)), :, :, labels] += 180
    return LabeledImages(images.astype(np.uint8), labels, ("red", "green", "blue"))


@pytest.fixture(scope="module")
def toy_proxy():
    data = _toy_colour_set(40, 16, seed=0)
    cfg = ProxyTrainConfig(input_size=16, width=8, num_stages=2, epochs=4, batch_size=32, lr=1e-2, holdout_fraction=0.25)
    model, summary = train_classifier(data, cfg, device="cpu", log=None)
    return model, summary


def test_proxy_classifier_learns_separable_toy_set_and_takes_any_size(toy_proxy, tmp_path):
    model, summary = toy_proxy
    assert summary.num_holdout == 30 and summary.holdout_accuracy == 1.0
    wide = _toy_colour_set(2, 16, seed=1).images.repeat(2, axis=2)[:, :12]  # 12x32, non-square
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(wide)))
    assert out.features.shape == (6, model.config.feature_dim)
    assert out.logits.argmax(1).tolist() == [0, 0, 1, 1, 2, 2]
    path = tmp_path / "proxy.safetensors"
    digest = save_proxy(model, path, summary)
    loaded = load_proxy(path)
    assert loaded.weights_sha256 == digest and loaded.class_names == ["red", "green", "blue"]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(torch.from_numpy(np.ascontiguousarray(wide))).features, out.features)


def test_evaluate_samples_with_proxy_reports_protocol(toy_proxy, tmp_path):
    model, _ = toy_proxy
    reference = _toy_colour_set(30, 16, seed=2)
    samples = _toy_colour_set(20, 16, seed=3)
    wide = np.ascontiguousarray(samples.images.repeat(2, axis=2))  # 16x32 samples vs square reference
    path = write_sample_npz(tmp_path / "samples.npz", wide, samples.labels)
    result = evaluate_samples(path, reference.images, model, batch_size=16, pr_precision="float32")
    m = result["metrics"]
    assert m["proxy_class_accuracy"] == 1.0 and m["proxy_fd"] >= 0.0
    assert 0.0 <= m["proxy_precision"] <= 1.0 and 0.0 <= m["proxy_recall"] <= 1.0
    assert not result["comparable_to_published"] and result["samples"]["width"] == 32
    json_path, md_path = write_report(result, tmp_path)
    md = md_path.read_text()
    assert "raw 16x32" in md and "stretched" in md and "IS non-square" in md and "PROXY METRICS" in md
    assert json_path.exists() and "Proxy Fréchet distance" in format_markdown(result)


def test_reference_activations_are_computed_once_with_a_cache(toy_proxy, tmp_path, monkeypatch):
    from maskfit.evaluate import report
    from maskfit.evaluate.adm_npz import reference_from_images

    model, _ = toy_proxy
    reference = reference_from_images(_toy_colour_set(10, 16, seed=2).images)
    samples = _toy_colour_set(4, 16, seed=3)
    path = write_sample_npz(tmp_path / "samples.npz", samples.images, samples.labels)
    calls = []
    real_extract = report.extract_features
    monkeypatch.setattr(report, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    cache: dict = {}
    first = evaluate_samples(path, reference, model, batch_size=16, pr_precision="float32", reference_cache=cache)
    second = evaluate_samples(path, reference, model, batch_size=16, pr_precision="float32", reference_cache=cache)
    assert len(calls) == 3  # reference + samples, then samples only
    assert first["metrics"] == second["metrics"]


def test_a_reference_cache_never_serves_another_references_activations(toy_proxy, tmp_path):
    """References given as paths are read anew on every call; a cache keyed by id() alone handed the freed first
    reference's activations to the next one that reused its id (it corrupted the study's real-image floor)."""
    model, _ = toy_proxy
    samples = _toy_colour_set(6, 16, seed=3)
    path = write_sample_npz(tmp_path / "samples.npz", samples.images, samples.labels)
    refs = [write_sample_npz(tmp_path / f"ref{i}.npz", _toy_colour_set(4, 16, seed=10 + i).images) for i in range(6)]
    fresh = [evaluate_samples(path, r, model, batch_size=16, pr_precision="float32")["metrics"] for r in refs]
    cache: dict = {}
    for _ in range(3):  # as the floor's draws: every reference again, each read anew from its path
        cached = [evaluate_samples(path, r, model, batch_size=16, pr_precision="float32",
                                   reference_cache=cache)["metrics"] for r in refs]
        assert cached == fresh
    assert len({m["proxy_fd"] for m in fresh}) == len(refs)  # the references differ, so must their distances


def test_image_stats_known_values_and_batches():
    from maskfit.evaluate.image_stats import ImageStats, detail_and_contrast

    flat = np.full((2, 8, 8, 3), 128, dtype=np.uint8)
    assert detail_and_contrast(flat) == (0.0, 0.0)
    checker = ((np.indices((8, 8)).sum(0) % 2) * 255).astype(np.uint8)  # 0/1 checkerboard
    board = np.repeat(checker[None, :, :, None], 3, axis=-1)  # (1, 8, 8, 3)
    assert detail_and_contrast(board) == pytest.approx((4.0, 0.5))  # |4x - 4(1 - x)| = 4 inside
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 6, 9, 3)).astype(np.uint8)
    stats = ImageStats()
    assert list(stats.passing([images[:3], images[3:]])) and stats.count == 7
    assert stats.result() == pytest.approx(detail_and_contrast(images))  # each image counts once, in any batches
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) images, got shape \(6, 9, 3\)"):
        stats.update(images[0])


def test_evaluation_reports_detail_and_contrast_against_the_references(toy_proxy, tmp_path):
    model, _ = toy_proxy
    reference = _toy_colour_set(10, 16, seed=2)
    same = write_sample_npz(tmp_path / "same.npz", reference.images, reference.labels)
    m = evaluate_samples(same, reference.images, model, batch_size=8, pr_precision="float32")["metrics"]
    assert m["detail_ratio"] == pytest.approx(1.0) and m["contrast_ratio"] == pytest.approx(1.0)
    # A 3x3 box blur removes most of the toy images' pixel noise (detail) and some of their spread (contrast).
    padded = np.pad(reference.images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, i:i + 16, j:j + 16] for i in range(3) for j in range(3)) / 9
    path = write_sample_npz(tmp_path / "blurred.npz", blurred.round().astype(np.uint8), reference.labels)
    m = evaluate_samples(path, reference.images, model, batch_size=8, pr_precision="float32")["metrics"]
    assert m["detail_ratio"] < 0.5 and m["contrast_ratio"] < 1.0
