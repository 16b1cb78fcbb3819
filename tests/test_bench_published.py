"""`maskfit bench --published-fit`: the published FiT's inputs match our layout, and the harness runs a
checkout's model and diffusion through one training step (here a small stand-in with the same interface)."""
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from maskfit.bench import run_bench
from maskfit.bench_published import published_inputs
from maskfit.tokens import pack, to_padded

STAND_IN_MODEL = '''
import torch
from torch import nn
from fit.model.sincos import get_2d_sincos_pos_embed_from_grid  # absent upstream: the harness stubs it

class FiT(nn.Module):
    """Stand-in with the published class's signature; it records what it was given."""
    seen = []

    def __init__(self, context_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                 class_dropout_prob, num_classes, learn_sigma, use_swiglu, use_swiglu_large, rel_pos_embed,
                 use_sit=False, **fitv2):
        super().__init__()
        c = in_channels * patch_size ** 2
        self.inp = nn.Linear(c, 8)
        self.out = nn.Linear(8, 2 * c if learn_sigma else c)
        self.use_sit = use_sit
        self.kwargs = dict(hidden_size=hidden_size, depth=depth, use_swiglu_large=use_swiglu_large, **fitv2)

    def forward(self, x, t, y, grid, mask, size=None):  # x (B, C, N) -> (B, C_out, N); SiT: (B, N, C) -> (B, N, C)
        FiT.seen.append((x.shape, grid.shape, mask.shape, size.shape, self.kwargs))
        h = self.inp(x if self.use_sit else x.transpose(1, 2))
        out = self.out(h) * mask[..., None]
        return out if self.use_sit else out.transpose(1, 2)
'''

STAND_IN_DIFFUSION = '''
import torch

class _Diffusion:
    num_timesteps = 1000

    def training_losses(self, model, x, t, model_kwargs):
        out = model(x, t, **model_kwargs)[:, : x.shape[1]]
        return {"loss": ((out - x) ** 2 * model_kwargs["mask"][:, None]).mean(dim=(1, 2))}

def create_diffusion(timestep_respacing, **kwargs):
    assert timestep_respacing == ""
    return _Diffusion()
'''


STAND_IN_TRANSPORT = '''
import torch

class _Transport:
    def training_losses(self, model, x1, model_kwargs):  # x1 (B, N, C)
        t = torch.rand(x1.shape[0])
        x0 = torch.randn_like(x1)
        xt = t[:, None, None] * x1 + (1 - t[:, None, None]) * x0
        out = model(xt, t, **model_kwargs)
        return {"loss": (((out - (x1 - x0)) * model_kwargs["mask"][..., None]) ** 2).mean(dim=(1, 2))}

def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None,
                     snr_type="uniform"):
    assert (path_type, prediction, snr_type) == ("Linear", "velocity", "lognorm")
    return _Transport()
'''


@pytest.fixture
def stand_in_checkout(tmp_path):
    (tmp_path / "fit" / "model").mkdir(parents=True)
    (tmp_path / "fit" / "scheduler" / "improved_diffusion").mkdir(parents=True)
    (tmp_path / "fit" / "model" / "fit_model.py").write_text(textwrap.dedent(STAND_IN_MODEL))
    (tmp_path / "fit" / "scheduler" / "improved_diffusion" / "__init__.py").write_text(STAND_IN_DIFFUSION)
    (tmp_path / "fit" / "scheduler" / "transport").mkdir(parents=True)
    (tmp_path / "fit" / "scheduler" / "transport" / "__init__.py").write_text(STAND_IN_TRANSPORT)
    yield tmp_path
    for name in [m for m in sys.modules if m == "fit" or m.startswith("fit.")]:
        del sys.modules[name]
    if str(tmp_path.resolve()) in sys.path:
        sys.path.remove(str(tmp_path.resolve()))


def test_published_inputs_match_our_padded_layout():
    grids = [(16, 16), (13, 18), (8, 31)]
    tokens = [torch.randn(h * w, 16) for h, w in grids]
    ours = to_padded(pack(tokens, grids, torch.zeros(3, dtype=torch.long), max_seqlen=256))
    x, grid, mask, size = published_inputs(grids, token_dim=16)
    n = max(h * w for h, w in grids)
    assert x.shape == (3, 16, n) and grid.shape == (3, 2, n) and mask.shape == (3, n)  # cut to the longest
    assert ours.layout.pos.shape[0] == 3 * n
    pos = ours.layout.pos.view(3, n, 2)  # (row, col); the published grid is (col, row)
    assert torch.equal(grid[:, 0], pos[..., 1]) and torch.equal(grid[:, 1], pos[..., 0])
    assert torch.equal(mask.bool(), ours.layout.valid.view(3, n))
    assert size[:, 0].tolist() == [list(g) for g in grids]
    assert (x * (1 - mask[:, None])).abs().sum() == 0  # padding is zeros


def test_published_inputs_refuse_an_image_over_the_budget():
    with pytest.raises(ValueError, match="300 tokens, over the budget 256"):
        published_inputs([(10, 30)], token_dim=16)


def _published_row(checkout, model: str, out) -> str:
    """`maskfit bench --published-fit CHECKOUT --models MODEL` on the CPU (1 step, batch 3): its JSON lines."""
    args = SimpleNamespace(sampling=False, models=model, modes="", designs="plain", batch=3, attention="dense",
                           no_compile=True, steps=1, warmup=1, device="cpu", out=str(out), profile=False,
                           compile_mode=None, decoder_depth=None, mixer_depth=None, published_fit=str(checkout))
    assert run_bench(args) == 0
    return out.read_text()


def test_bench_runs_a_checkout_beside_our_rows(stand_in_checkout, tmp_path, capsys):
    rows = _published_row(stand_in_checkout, "FiT-B/2", tmp_path / "rows.jsonl").splitlines()
    assert len(rows) == 1 and '"mode": "published"' in rows[0] and '"compiled": false' in rows[0]
    from fit.model.fit_model import FiT as StandIn

    shape_x, shape_grid, shape_mask, shape_size, kwargs = StandIn.seen[-1]
    assert shape_x[:2] == (3, 16) and shape_grid[:2] == (3, 2) and shape_size == (3, 1, 2)
    assert kwargs == dict(hidden_size=768, depth=12, use_swiglu_large=True)  # the papers' FiT-B/2: SwiGLU hidden 4d


def test_bench_runs_a_checkouts_fitv2_with_its_flow_transport(stand_in_checkout, tmp_path):
    assert '"model": "FiTv2-B/2"' in _published_row(stand_in_checkout, "FiTv2-B/2", tmp_path / "rows.jsonl")
    from fit.model.fit_model import FiT as StandIn

    shape_x, _, shape_mask, _, kwargs = StandIn.seen[-1]
    assert shape_x[0] == 3 and shape_x[2] == 16 and shape_x[1] == shape_mask[1]  # SiT layout (B, N, C)
    assert kwargs == dict(hidden_size=768, depth=15, use_swiglu_large=False, q_norm="layernorm", k_norm="layernorm",
                          qk_norm_weight=False, adaln_type="lora", adaln_lora_dim=192)  # FiTv2 Tab.I, B/2


def test_missing_checkout_is_one_clear_error(tmp_path):
    from maskfit.bench_published import load_published_fit

    with pytest.raises(FileNotFoundError, match="github.com/whlzy/FiT"):
        load_published_fit(tmp_path)


def test_unknown_preset_is_refused(stand_in_checkout):
    from maskfit.bench_published import bench_published_train_step

    with pytest.raises(ValueError, match="no settings for preset 'FiT-tiny'"):
        bench_published_train_step(stand_in_checkout, "FiT-tiny", batch_size=2, device="cpu")
