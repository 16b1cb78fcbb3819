"""GPU checks (skipped without CUDA): attention backends agree, bf16 layouts agree, compiled gradients agree
with eager ones, no host sync in a step,
CUDA-graph training replays the compiled step, FSDP's sharded checkpoints over NCCL resume and load,
sampling in bf16 with varlen agrees with dense fp32, and `maskfit sample` runs on CUDA by default."""
import json
import math

import pytest
import torch

from maskfit.models.attention import attention, prepare_attention
from maskfit.models.transformer import FiT, model_config
from maskfit.tokens import TokenBatch, masked_view, pack, to_padded

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DEV = torch.device("cuda")


def _per_image_reference(q, k, v, cu):
    out = torch.empty_like(q)
    for b in range(len(cu) - 1):
        s = slice(cu[b], cu[b + 1])
        if cu[b + 1] == cu[b]:
            continue
        scores = torch.einsum("thd,shd->hts", q[s].float(), k[s].float()) / math.sqrt(q.shape[-1])
        out[s] = torch.einsum("hts,shd->thd", scores.softmax(-1), v[s].float()).to(q.dtype)
    return out


@pytest.mark.parametrize("head_dim", [64, 72])
@pytest.mark.parametrize("backend", ["dense", "varlen", "flex"])
def test_backends_agree_with_per_image_attention(backend, head_dim):
    torch.manual_seed(0)
    lengths = [256, 17, 0, 200, 1, 0, 130]  # zero-length segments included
    grids = [(1, n) for n in lengths]
    batch = pack([torch.zeros(n, 1) for n in lengths], grids, torch.zeros(len(lengths), dtype=torch.long), max_seqlen=256)
    layout = batch.layout.to(DEV)
    T, H = layout.num_tokens, 4
    q, k, v = (torch.randn(T, H, head_dim, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, prepare_attention(layout, backend))
    ref = _per_image_reference(q, k, v, layout.cu_seqlens.tolist())
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("preset", ["FiT-B/2-dit", "FiTv2-B/2"])
def test_bf16_packed_padded_per_image_agree(preset):
    torch.manual_seed(0)
    model = FiT(model_config(preset, attention="varlen", depth=2)).to(DEV)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    grids = [(16, 16), (12, 20), (8, 32), (15, 17)]
    tokens = [torch.randn(h * w, 16) for h, w in grids]
    y = torch.tensor([1, 2, 3, 4])
    t = torch.tensor([10, 500, 999, 0]) if model.cfg.learn_sigma else torch.tensor([0.1, 0.5, 0.9, 0.0])
    packed = pack(tokens, grids, y, max_seqlen=256)
    padded = to_padded(packed, seq_len=256)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = model(packed.tokens.to(DEV), t.to(DEV), y.to(DEV), packed.layout.to(DEV)).float()
        b = model(padded.tokens.to(DEV), t.to(DEV), y.to(DEV), padded.layout.to(DEV)).float()
        single = model(tokens[1].to(DEV), t[1:2].to(DEV), y[1:2].to(DEV), pack([tokens[1]], [grids[1]], y[1:2]).layout.to(DEV)).float()
    b_real = b[padded.layout.valid.to(DEV)]
    scale = a.abs().mean()
    assert (a - b_real).abs().mean() < 0.02 * scale
    cu = packed.layout.cu_seqlens.tolist()
    assert (a[cu[1] : cu[2]] - single).abs().mean() < 0.02 * scale


@pytest.mark.parametrize("preset,design,backend,swiglu", [
    ("FiT-B/2-dit", "plain", "varlen", "autograd"), ("FiT-B/2-dit", "decoder", "varlen", "autograd"),
    ("FiTv2-B/2", "plain", "varlen", "autograd"), ("FiT-B/2-dit", "side_interp", "varlen", "autograd"),
    ("FiT-B/2-dit", "mixer", "varlen", "autograd"), ("FiTv2-B/2", "unmasked", "varlen", "autograd"),
    # SwiGLU's hand-written Triton backward (models/swiglu_backward.py, MASKFIT_SWIGLU_BACKWARD=triton)
    ("FiT-B/2-dit", "plain", "varlen", "triton"), ("FiTv2-B/2", "unmasked", "varlen", "triton"),
])
def test_compiled_masked_gradients_agree_with_eager(preset, design, backend, swiglu, monkeypatch):
    import maskfit.models.swiglu_backward as swiglu_backward

    monkeypatch.setattr(swiglu_backward, "BACKWARD", swiglu)
    if swiglu == "triton":
        swiglu_backward.grad_op()  # registered before tracing, as the import does under MASKFIT_SWIGLU_BACKWARD
    torch._dynamo.reset()  # compile afresh under this choice
    # The compiled step has its own kernels: the per-image window sums of the adaLN backward (models/segments.py)
    # and the RoPE tables as one op. Against fp32 gradients (dense attention, no autocast), the compiled bf16
    # gradients must be as close as the eager bf16 ones: rounding noise is the same order for both (0.05 of a
    # bias's norm was seen on the H200), a wrong sum would be O(1).
    # (the decoder failed this on the H200, 2026-12-01: Inductor miscompiled the mask-token fill, now
    # models/transformer.py with_mask_tokens; "unmasked" runs the full stream, no mask)
    torch.manual_seed(0)
    shape = dict(depth=2, mask_design="plain" if design == "unmasked" else design, side_decode_depth=1)
    cfg = model_config(preset, attention=backend, **shape)
    model = FiT(cfg).to(DEV)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fp32 = FiT(model_config(preset, attention="dense", **shape)).to(DEV)
    fp32.load_state_dict(model.state_dict())
    grids = [(16, 16), (12, 20), (8, 32), (15, 17), (3, 5)]
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(h * w, cfg.token_dim, generator=g) for h, w in grids]
    keep = [torch.randperm(h * w, generator=g)[: (h * w) // 2].sort().values for h, w in grids]
    y = torch.arange(len(grids))
    t = torch.tensor([10.0, 500.0, 999.0, 0.0, 250.0]) if cfg.learn_sigma else torch.tensor([0.1, 0.5, 0.9, 0.0, 0.3])
    batch = pack(tokens, grids, y, max_seqlen=256)
    layout = batch.layout.to(DEV)
    mask = None if design == "unmasked" else masked_view(batch.layout, keep, max_seqlen=256).to(DEV)
    x, t, y = batch.tokens.to(DEV), t.to(DEV), y.to(DEV)

    def grads(net, forward, bf16: bool):
        net.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x, t, y, layout, mask=mask).float()
        (out * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
        return {n: p.grad.float().clone() for n, p in net.named_parameters() if p.grad is not None}

    exact = grads(fp32, fp32, bf16=False)
    eager, compiled = grads(model, model, bf16=True), grads(model, torch.compile(model), bf16=True)
    assert eager.keys() == compiled.keys() == exact.keys()

    def error(got):  # relative to the fp32 gradient's norm, per parameter
        return {n: float((got[n] - ref).norm() / ref.norm().clamp_min(1e-12)) for n, ref in exact.items()}

    e_eager, e_compiled = error(eager), error(compiled)
    worse = {n: (round(e_compiled[n], 4), round(e_eager[n], 4)) for n in exact if e_compiled[n] > 2 * e_eager[n] + 0.01}
    assert not worse, f"compiled gradients further from fp32 than eager bf16 (compiled, eager): {worse}"
    assert max(e_compiled.values()) < 0.2


def test_the_swiglu_backward_kernel_equals_autograd_on_cuda():
    import torch.nn.functional as F

    from maskfit.models.swiglu_backward import grad_op

    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for T, h in ((37, 200), (61_696 // 64, 2048)):
            y = (3 * torch.randn(T, 2 * h, generator=g)).to(DEV, dtype).requires_grad_()
            dh = torch.randn(T, h, generator=g).to(DEV, dtype)
            with torch.autocast("cuda", enabled=False):
                yf = y.float().detach().requires_grad_()
                (expected,) = torch.autograd.grad(F.silu(yf[:, :h]) * yf[:, h:], yf, dh.float())
            torch.testing.assert_close(grad_op()(y.detach(), dh).float(), expected, atol=tol, rtol=tol)


def test_training_step_has_no_host_sync():
    from maskfit.config import config_from_dict
    from maskfit.train import build_diffusion, training_loss

    torch.manual_seed(0)
    model = FiT(model_config("FiT-B/2-dit", attention="varlen", depth=2, mask_design="decoder", decoder_depth=1)).to(DEV)
    diffusion = build_diffusion(config_from_dict({"diffusion": {"objective": "ddpm"}}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    grids = [(16, 16), (12, 20), (8, 32)]
    batch = pack([torch.randn(h * w, 16) for h, w in grids], grids, torch.tensor([1, 2, 3]), max_seqlen=256)
    keep = [torch.randperm(h * w)[: h * w // 2].sort().values for h, w in grids]
    batch = TokenBatch(batch.tokens, batch.y, batch.layout, mask=masked_view(batch.layout, keep, max_seqlen=256)).to(DEV)
    generator = torch.Generator(device=DEV).manual_seed(0)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = training_loss(model, diffusion, batch, batch.y, 0.1, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _real_path_config(tmp_path, objective: str, design: str, batching: str, compile: bool = False):
    from maskfit.config import config_from_dict

    preset = "FiT-tiny" if objective == "ddpm" else "FiTv2-tiny"
    data = {"source": "synthetic", "num_images": 64, "num_classes": 4, "token_budget": 64, "autoencoder": "identity",
            "layout": "packed", "batching": batching, "num_workers": 2}
    train = {"out_dir": str(tmp_path / "run"), "steps": 100, "device": "cuda", "compile": compile, "log_every": 1000}
    if batching == "tokens":
        data.update(tokens_per_step=512, max_images_per_step=16)
    else:
        train["batch_size"] = 8
    return config_from_dict({
        "model": {"preset": preset, "attention": "varlen", "overrides": {"patch_size": 4, "num_classes": 4}},
        "data": data, "diffusion": {"objective": objective},
        "mask": {"keep_ratio": 0.5, "design": design, "decoder_hidden": 64, "decoder_heads": 1}, "train": train,
    })


@pytest.mark.parametrize("batching", ["images", "tokens"])
@pytest.mark.parametrize("objective", ["ddpm", "flow"])
@pytest.mark.parametrize("design", ["plain", "decoder"])
def test_the_real_masked_training_step_has_no_host_sync(tmp_path, design, objective, batching):
    """What `maskfit train` runs per step (loader batch -> device -> train_step) never waits for the GPU."""
    from maskfit.data.pipeline import build_training_data
    from maskfit.train import build_training_run, run_patch_size, train_step

    cfg = _real_path_config(tmp_path, objective, design, batching)
    data = build_training_data(cfg, run_patch_size(cfg))
    run = build_training_run(cfg, data.channels)
    for step in range(2):  # warm-up: lazy initialisation may sync
        train_step(run, data.next_device_batch(step, run.device), step)
    torch.cuda.synchronize()
    flat = [data._next_flat(step) for step in (2, 3)]  # host-side loader work, before the check
    assert all(f.tokens.is_pinned() and f.ints.is_pinned() for f in flat)  # asynchronous copies
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, f in zip((2, 3), flat):
            loss, _, _ = train_step(run, f.to(run.device), step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_a_non_finite_step_is_skipped_on_cuda_without_a_host_sync(tmp_path):
    """A NaN batch through the real CUDA step: fused AdamW skips via found_inf, the EMA via a zero weight,
    the counters stay on the device; the weights, Adam state and EMA are unchanged bit for bit."""
    from maskfit.data.pipeline import build_training_data
    from maskfit.divergence import BadStepCount
    from maskfit.train import build_training_run, run_patch_size, train_step

    cfg = _real_path_config(tmp_path, "flow", "decoder", "images")
    data = build_training_data(cfg, run_patch_size(cfg))
    run = build_training_run(cfg, data.channels)
    assert run.optimizer.defaults["fused"]
    for step in range(2):  # warm-up: lazy initialisation may sync
        train_step(run, data.next_device_batch(step, run.device), step)
    good = data.next_device_batch(2, run.device)
    bad = TokenBatch(torch.full_like(good.tokens, float("nan")), good.y, good.layout, mask=good.mask)

    def snapshot():
        out = [t.clone() for t in (*run.model.state_dict().values(), *run.ema.state_dict().values())]
        return out + [t.clone() for s in run.optimizer.state.values() for t in s.values()]

    before = snapshot()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, _ = train_step(run, bad, 2)
        after = snapshot()
        train_step(run, good, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert run.bad_steps.read() == BadStepCount(0, 1, 1)  # one bad step, then a finite one
    assert not all(torch.equal(a, b) for a, b in zip(snapshot(), before))


def test_compiled_image_batching_compiles_once_for_every_stream_length(tmp_path):
    """Masked image batches change the stream length every step; marked dynamic, no step recompiles."""
    from maskfit.data.pipeline import build_training_data
    from maskfit.throughput import compile_stats
    from maskfit.train import build_training_run, run_patch_size, train_step

    torch._dynamo.reset()
    cfg = _real_path_config(tmp_path, "flow", "plain", "images", compile=True)
    data = build_training_data(cfg, run_patch_size(cfg))
    run = build_training_run(cfg, data.channels, dynamic_stream=True)
    lengths = set()
    for step in range(8):
        batch = data.next_device_batch(step, run.device)
        lengths.add(batch.mask.layout.num_tokens)
        train_step(run, batch, step)
        if step == 0:
            graphs_after_first = compile_stats()[0]
    assert len(lengths) > 1  # the synthetic sizes vary, so the kept stream does too
    assert compile_stats()[0] == graphs_after_first


@pytest.mark.parametrize("design", ["plain", "decoder"])
def test_cuda_graph_training_replays_the_default_compiled_step(tmp_path, design):
    """train.compile_mode='reduce-overhead' (token batching, 50 % kept, a fixed image count): the same losses as
    the default compiled step on the same batches, no recompile after the first step, no host sync once replaying.
    The decoder runs on the full stream, which token batching pads to a static length for it
    (maskfit.data.pipeline.static_full_stream)."""
    import dataclasses

    from maskfit.data.pipeline import build_training_data
    from maskfit.throughput import compile_stats
    from maskfit.train import build_training_run, run_patch_size, train_step

    losses = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        cfg = _real_path_config(tmp_path / mode, "flow", design, "tokens", compile=True)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile_mode=mode))
        data = build_training_data(cfg, run_patch_size(cfg))
        run = build_training_run(cfg, data.channels)
        out = []
        for step in range(6):
            batch = data.next_device_batch(step, run.device)
            if step == 4:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss, _, _ = train_step(run, batch, step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            out.append(loss.detach().clone())
            if step == 0:
                graphs_after_first = compile_stats()[0]
        assert compile_stats()[0] == graphs_after_first, mode
        losses[mode] = torch.stack(out).float().cpu()
    assert torch.allclose(losses["reduce-overhead"], losses["default"], rtol=1e-3, atol=1e-4), losses


def _sampling_model(attention: str) -> FiT:
    """A small FiTv2 (head dim 64, FlashAttention's common size) whose output depends on its input."""
    torch.manual_seed(0)
    model = FiT(model_config("FiTv2-tiny", hidden_size=128, num_heads=2, num_classes=4, attention=attention))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # past adaLN-zero's zero gates and final layer
    return model.to(DEV).eval().requires_grad_(False)


@pytest.mark.parametrize("subset_keep", [1.0, 0.5])  # 0.5: every call through the masked forward on half the tokens
def test_varlen_bf16_sampling_agrees_with_dense_fp32(subset_keep):
    from dataclasses import replace

    from maskfit.config import config_from_dict
    from maskfit.sample import SamplerOptions, sample_tokens
    from maskfit.sampling_run import resolve_precision, sampling_attention
    from maskfit.train import build_diffusion

    precision = resolve_precision("auto", DEV)
    assert (precision, sampling_attention("auto", DEV, precision)) == ("bf16", "varlen")  # the defaults on CUDA
    fast = _sampling_model("varlen")
    ref = FiT(replace(fast.cfg, attention="dense"))
    ref.load_state_dict(fast.state_dict())
    ref = ref.to(DEV).eval()
    diffusion = build_diffusion(config_from_dict({"diffusion": {"objective": "flow"}}))
    grids, labels = [(16, 16), (10, 24)], torch.tensor([1, 2])  # two resolutions packed in one stream
    noise = torch.randn(sum(h * w for h, w in grids), fast.cfg.token_dim, device=DEV,
                        generator=torch.Generator(device=DEV).manual_seed(0))  # sample_tokens' first draw

    def displacement(model, precision):
        options = SamplerOptions(method="euler", steps=4, cfg_scale=1.5, precision=precision, subset_keep=subset_keep)
        tokens = sample_tokens(model, diffusion, grids, labels, options, torch.Generator(device=DEV).manual_seed(0), DEV)
        assert all(t.dtype == torch.float32 for t in tokens)  # the sampler state stays fp32
        return torch.cat(tokens) - noise  # what the network added (the shared noise alone would agree)

    a, b = displacement(fast, "bf16"), displacement(ref, "fp32")
    scale = b.abs().mean()
    assert scale > 0.1 and not torch.equal(a, b)  # the network moved the state; bf16 really ran
    assert (a - b).abs().mean() < 0.03 * scale  # measured ~0.5 % (CPU bf16 autocast, the same model)


def test_maskfit_sample_runs_on_cuda_with_auto_attention(tmp_path):
    import json

    import numpy as np

    from maskfit.cli import main
    from maskfit.train import train
    from tests.test_train import tiny_run

    overrides = {"patch_size": 4, "num_classes": 4, "hidden_size": 128, "num_heads": 2}
    run = train(tiny_run(tmp_path / "run", steps=2, model={"preset": "FiTv2-tiny", "overrides": overrides}),
                progress=False).run_dir  # trained on the CPU, sampled on CUDA
    out = tmp_path / "samples"
    assert main(["sample", str(run), "-n", "3", "--batch-size", "3", "--steps", "2", "-r", "16", "-r", "16x32",
                 "--device", "cuda", "--attention", "auto", "--out", str(out)]) == 0
    record = json.loads((out / "sampling.json").read_text())
    assert (record["attention"], record["options"]["precision"]) == ("varlen", "bf16")
    assert np.load(out / "samples_16x16.npz")["arr_0"].shape == (3, 16, 16, 3)
    assert np.load(out / "samples_16x32.npz")["arr_0"].shape == (3, 16, 32, 3)
    # Mixed resolutions in one packed stream, as `maskfit bench --sampling` times it.
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "-r", "16", "-r", "24x16", "--pack",
                 "--device", "cuda", "--out", str(tmp_path / "packed")]) == 0
    assert np.load(tmp_path / "packed" / "samples_24x16.npz")["arr_0"].shape == (2, 24, 16, 3)


def test_fsdp_on_cuda_writes_sharded_checkpoints_that_resume_and_load_in_one_process(tmp_path):
    """torchrun, NCCL, FSDP2 on the GPU: a run stopped at step 2 and resumed from its shards (written by
    torch.distributed.checkpoint from CUDA DTensors) ends as the uninterrupted run; a plain process loads them."""
    from maskfit import checkpoint as ckpt_io
    from maskfit.runs import load_model_from_checkpoint
    from tests.test_distributed import _train, _weights

    cuda = {"device": "cuda", "precision": "fp32", "steps": 4}
    model = {"attention": "dense"}  # fp32: FlashAttention (varlen) runs in bf16 only
    straight = _train(tmp_path, "straight", 1, "fsdp", train=cuda, model=model)
    resumed = _train(tmp_path, "resumed", 1, "fsdp", train=cuda, model=model, extra=["--set", "train.steps=2"])
    _train(tmp_path, "resumed", 1, "fsdp", train=cuda, model=model)
    final = resumed / "checkpoints" / "step_0000004"
    assert ckpt_io.is_sharded(final) and not (final / "model.safetensors").exists()
    for name in ("model", "ema"):
        want, got = _weights(straight, 4, name), _weights(resumed, 4, name)
        for k in want:  # the adaLN gather's backward adds with atomics: equal to float rounding, not bitwise
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=f"{name} {k}")
    loaded, _ = load_model_from_checkpoint(resumed, device=DEV)
    for k, v in _weights(resumed, 4, "ema").items():
        torch.testing.assert_close(loaded.state_dict()[k].cpu(), v)


def test_the_real_loop_times_each_step_on_the_gpu_without_waiting_for_it(tmp_path):
    """RateWindow's CUDA events: each step's GPU time, read only after syncs. Steps run one after another on one
    stream, so their GPU times add up to no more than the window's wall time."""
    from maskfit.train import train

    cfg = _real_path_config(tmp_path, "flow", "decoder", "tokens")
    measured = train(cfg, progress=False, stop_after=8, measure_after=3).measured
    assert 0 < measured["gpu_ms_per_step"] <= measured["ms_per_step"] * 1.02
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["speed/gpu_ms_per_step"] > 0 for r in rows)
