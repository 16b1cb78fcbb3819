"""The loss on dropped tokens of full-grid masked designs (MaskDiT decoder, MDT side-interpolator).

DDPM: kept tokens keep ε (+ VB); dropped tokens, whose x_t the model never saw, are fitted to x_t (MaskDiT)
or x0 with weight aux / n_dropped, and the VB term ignores them. Flow keeps the velocity target everywhere.
"""
import pytest
import torch
from torch import nn

from maskfit.config import MaskSection, config_from_dict
from maskfit.diffusion.flow import RectifiedFlow
from maskfit.diffusion.gaussian import GaussianDiffusion
from maskfit.models.transformer import FiT, model_config
from maskfit.tokens import masked_view, pack, to_padded
from maskfit.train import training_loss

D = 8  # values per token
GRIDS = [(2, 3), (3, 3), (1, 4)]
AUX = 0.1


def masked_batch(layout_kind: str, seed: int = 0):
    """Three images, about half of each image's tokens kept, float64; packed or padded (with padding slots)."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(h * w, D, generator=g, dtype=torch.float64) for h, w in GRIDS]
    batch = pack(tokens, GRIDS, torch.tensor([0, 1, 2]))
    if layout_kind == "padded":
        batch = to_padded(batch, seq_len=10)
    keep = [torch.randperm(h * w, generator=g)[: (h * w) // 2].sort().values for h, w in GRIDS]
    batch.mask = masked_view(batch.layout, keep)
    return batch


class FixedOutput(nn.Module):
    """Stands in for a masked model: returns a fixed (trainable) output and records the x_t and t it got."""

    predicts_dropped_tokens = FiT.predicts_dropped_tokens

    def __init__(self, num_tokens: int, out_dim: int, design: str = "decoder", seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.out = nn.Parameter(torch.randn(num_tokens, out_dim, generator=g, dtype=torch.float64))
        self.cfg = model_config("FiT-tiny", mask_design=design)

    def forward(self, x, t, y, layout, mask=None):
        self.seen = (x.detach(), t.detach())
        return self.out * 1.0  # (T, D_out)


def kept_and_dropped(batch):
    T = batch.layout.num_tokens
    real = torch.ones(T, dtype=torch.bool) if batch.layout.valid is None else batch.layout.valid
    kept = torch.zeros(T, dtype=torch.bool)
    kept[batch.mask.index] = True
    return kept, real & ~kept


def mean_over_images(per_token, which, seq_id):
    """Mean over images of each image's mean over its tokens in ``which``, written out by hand."""
    per_image = [per_token[which & (seq_id == b)].mean() for b in range(len(GRIDS))]
    return torch.stack(per_image).mean()


def ddpm_step(batch, model, aux_target, seed=0):
    diff = GaussianDiffusion()
    gen = torch.Generator().manual_seed(seed)
    return diff, training_loss(model, diff, batch, batch.y, AUX, gen, aux_target=aux_target)


@pytest.mark.parametrize("layout_kind", ["packed", "padded"])
@pytest.mark.parametrize("aux_target", ["noisy_input", "x0"])
def test_ddpm_loss_on_dropped_tokens_is_aux_weight_times_mse_to_the_target(layout_kind, aux_target):
    batch = masked_batch(layout_kind)
    model = FixedOutput(batch.layout.num_tokens, 2 * D)
    diff, (loss, logs) = ddpm_step(batch, model, aux_target)
    x0, seq_id = batch.tokens, batch.layout.seq_id
    x_t, t = model.seen
    t_tok = t[seq_id]
    ab = diff.schedule.alphas_cumprod[t_tok][:, None]  # (T, 1) ᾱ_t
    noise = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()  # invert DDPM eq. 4
    eps, v = model.out.detach()[:, :D], model.out.detach()[:, D:]
    kept, dropped = kept_and_dropped(batch)
    target = x_t if aux_target == "noisy_input" else x0

    aux = AUX * mean_over_images(((eps - target) ** 2).mean(1), dropped, seq_id)
    mse = mean_over_images(((eps - noise) ** 2).mean(1), kept, seq_id)  # the kept-token loss as before
    vb = mean_over_images(diff.vb_terms(x0, x_t, t_tok, eps, v), kept, seq_id)
    torch.testing.assert_close(logs["aux"], aux)
    torch.testing.assert_close(logs["mse"], mse)
    torch.testing.assert_close(logs["vb"], vb)
    torch.testing.assert_close(loss, mse + vb + aux)


def test_an_image_without_dropped_tokens_adds_zero_aux_but_still_counts_in_the_image_mean():
    batch = masked_batch("packed")
    h, w = GRIDS[2]
    starts = batch.layout.cu_seqlens.long()
    keep = [batch.mask.index[(batch.mask.index >= starts[b]) & (batch.mask.index < starts[b + 1])] - starts[b]
            for b in range(2)] + [torch.arange(h * w)]  # image 2 keeps every token
    batch.mask = masked_view(batch.layout, keep)
    model = FixedOutput(batch.layout.num_tokens, 2 * D)
    _, (loss, logs) = ddpm_step(batch, model, "noisy_input")
    x_t, _ = model.seen
    err = ((model.out.detach()[:, :D] - x_t) ** 2).mean(1)  # (T,)
    _, dropped = kept_and_dropped(batch)
    seq_id = batch.layout.seq_id
    per_image = [err[dropped & (seq_id == b)].mean() for b in range(2)]  # image 2 has none
    torch.testing.assert_close(logs["aux"], AUX * sum(per_image) / 3)  # mean over all 3 images
    torch.testing.assert_close(loss, logs["mse"] + logs["vb"] + logs["aux"])


def test_the_vb_term_ignores_the_variance_outputs_of_dropped_tokens():
    batch = masked_batch("packed")
    model = FixedOutput(batch.layout.num_tokens, 2 * D)
    _, (loss, logs) = ddpm_step(batch, model, "noisy_input")
    loss.backward()
    grad = model.out.grad
    kept, dropped = kept_and_dropped(batch)
    assert bool((grad[dropped, D:] == 0).all())  # the variance head learns nothing where x_t was unseen
    assert bool((grad[kept, D:] != 0).any()) and bool((grad[dropped, :D] != 0).all())  # but it does elsewhere

    with torch.no_grad():
        model.out[dropped, D:] += 5.0
    _, (_, moved) = ddpm_step(batch, model, "noisy_input")  # same seed: same t and noise
    for term in ("vb", "mse", "aux"):
        torch.testing.assert_close(moved[term], logs[term], rtol=0, atol=0)


def test_flow_keeps_the_velocity_target_on_dropped_tokens():
    batch = masked_batch("padded")
    model = FixedOutput(batch.layout.num_tokens, D)
    gen = torch.Generator().manual_seed(0)
    loss, logs = training_loss(model, RectifiedFlow(), batch, batch.y, AUX, gen)
    x1, seq_id = batch.tokens, batch.layout.seq_id
    x_t, t = model.seen
    t_tok = t[seq_id][:, None]  # (T, 1)
    noise = (x_t - t_tok * x1) / (1 - t_tok)  # invert x_t = t·x1 + (1 − t)·x0
    err = ((model.out.detach() - (x1 - noise)) ** 2).mean(1)  # (T,) velocity error on every token
    kept, dropped = kept_and_dropped(batch)
    expected = mean_over_images(err, kept, seq_id) + AUX * mean_over_images(err, dropped, seq_id)
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"loss"}


@pytest.mark.parametrize("design", ["decoder", "side_interp"])
def test_a_full_grid_ddpm_training_step_runs_through_training_loss(design):
    torch.manual_seed(0)
    cfg = model_config(
        "FiT-tiny", patch_size=1, in_channels=D, num_classes=3, mask_design=design,
        decoder_depth=1, decoder_hidden=32, decoder_heads=2, side_decode_depth=1,
    )
    model = FiT(cfg)
    with torch.no_grad():  # leave the zero init, so the output (and the aux term) depends on the inputs
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = masked_batch("packed")
    batch.tokens = batch.tokens.float()
    diff = GaussianDiffusion()
    terms = {}
    for aux_target in ("noisy_input", "x0"):
        loss, logs = training_loss(model, diff, batch, batch.y, AUX, torch.Generator().manual_seed(0), aux_target)
        assert set(logs) == {"loss", "mse", "vb", "aux"}
        torch.testing.assert_close(loss.detach(), logs["mse"] + logs["vb"] + logs["aux"])
        terms[aux_target] = logs
    assert float(terms["x0"]["aux"]) != float(terms["noisy_input"]["aux"])  # the target reached the loss
    torch.testing.assert_close(terms["x0"]["mse"], terms["noisy_input"]["mse"])
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert model.mask_token.grad is not None and float(model.mask_token.grad.abs().sum()) > 0


def test_aux_target_errors_name_the_value():
    with pytest.raises(ValueError, match="mask.aux_target='eps' is not one of"):
        MaskSection(aux_target="eps")
    config_from_dict({"mask": {"aux_target": "x0"}})  # DDPM (the default objective) takes either target
    with pytest.raises(ValueError, match="applies to diffusion.objective='ddpm' only"):
        config_from_dict({"diffusion": {"objective": "flow"}, "mask": {"aux_target": "x0"}})
    batch = masked_batch("packed")
    with pytest.raises(ValueError, match="aux_target='eps'; choose one of"):
        ddpm_step(batch, FixedOutput(batch.layout.num_tokens, 2 * D), "eps")


def test_train_passes_the_configured_aux_target(tmp_path, monkeypatch):
    import maskfit.train as train_mod

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("aux_target", args[6] if len(args) > 6 else "noisy_input"))
        return training_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "training_loss", recording)
    cfg = config_from_dict({
        "model": {"preset": "FiT-tiny", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": {"num_images": 8, "num_classes": 4, "token_budget": 16, "autoencoder": "identity",
                 "layout": "packed"},
        "mask": {"keep_ratio": 0.5, "design": "decoder", "decoder_hidden": 32, "decoder_heads": 2,
                 "aux_target": "x0"},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 1, "batch_size": 4, "device": "cpu"},
    })
    train_mod.train(cfg, progress=False)
    assert seen == ["x0"]
