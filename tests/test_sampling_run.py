"""`maskfit sample`'s bookkeeping: labels across batches, refusing to resume with other settings, the
attention backend and precision it samples with, and the published recipes (--recipe and its flags)."""
import json

import numpy as np
import pytest
import torch

from maskfit.cli import main
from maskfit.sampling_run import (
    labels_for,
    resolve_precision,
    resolve_sampling_choices,
    sampling_attention,
)
from maskfit.train import load_model_from_checkpoint, train
from tests.test_train import tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train(tiny_run(tmp_path_factory.mktemp("run"), steps=2), progress=False).run_dir


def test_per_class_and_listed_labels_continue_across_batches():
    g = torch.Generator().manual_seed(0)
    assert labels_for("per-class", 3, 1000, g, start=32).tolist() == [32, 33, 34]  # not 0, 1, 2 again
    assert labels_for("per-class", 4, 3, g, start=2).tolist() == [2, 0, 1, 2]
    assert labels_for("5,7", 3, 10, g, start=1).tolist() == [7, 5, 7]
    assert labels_for("uniform", 100, 4, g, start=8).unique().tolist() == [0, 1, 2, 3]


def test_per_class_sampling_covers_every_class_in_order(run_dir, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", str(run_dir), "-n", "6", "--batch-size", "2", "--steps", "1", "--labels", "per-class",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert np.load(out / "samples_16x16.npz")["arr_1"].tolist() == [0, 1, 2, 3, 0, 1]  # 4 classes, 3 batches


def test_resuming_with_other_settings_is_refused_per_resolution(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    common = ["-n", "2", "--batch-size", "2", "--steps", "1", "--out", str(out), "--device", "cpu"]
    assert main(["sample", str(run_dir), *common]) == 0
    assert main(["sample", str(run_dir), *common, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "drawn with other settings (seed: 0 before, 1 now)" in err and "Use another --out" in err
    assert main(["sample", str(run_dir), *common, "--cfg-scale", "3"]) == 2  # inside the sampler options
    assert "cfg_scale" in capsys.readouterr().err
    # Another resolution has its own shard folder: adding it to the same --out is fine.
    assert main(["sample", str(run_dir), *common, "-r", "8x24"]) == 0


def test_attention_backend_at_sampling_time(run_dir, capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sampling_attention("auto", cpu, "fp32") == "dense"  # same math, the CPU's kernel
    assert sampling_attention("auto", cuda, "bf16") == "varlen"  # any stream length, no recompilation
    assert sampling_attention("auto", cuda, "fp32") == "dense"  # FlashAttention has no fp32 kernel
    assert sampling_attention("flex", cpu, "fp32") == "flex"
    with pytest.raises(ValueError, match="attention 'varlen' needs a CUDA device.*--attention dense"):
        sampling_attention("varlen", cpu, "bf16")
    with pytest.raises(ValueError, match="'varlen' is FlashAttention, which runs in bf16 only.*--precision bf16"):
        sampling_attention("varlen", cuda, "fp32")
    model, _ = load_model_from_checkpoint(run_dir, attention="flex")
    assert model.cfg.attention == "flex"
    assert main(["sample", str(run_dir), "-n", "1", "--attention", "varlen", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_training_with_varlen_on_a_cpu_names_the_fix(tmp_path):
    cfg = tiny_run(tmp_path, model={"preset": "FiTv2-tiny", "overrides": {"patch_size": 4, "num_classes": 4},
                                    "attention": "varlen"})
    with pytest.raises(ValueError, match="attention 'varlen' needs a CUDA device.*model.attention='dense'"):
        train(cfg, progress=False)


def test_an_interrupted_run_redraws_only_the_missing_batch(run_dir, tmp_path):
    out = tmp_path / "s"
    args = ["sample", str(run_dir), "-n", "6", "--batch-size", "2", "--steps", "1", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    first = np.load(out / "samples_16x16.npz")["arr_0"]
    shards = sorted((out / "16x16").glob("shard_*.npz"))
    assert len(shards) == 3
    kept = {s.name: s.stat().st_mtime_ns for s in shards if s.name != "shard_00001.npz"}
    # As if the run died while drawing batch 1: that shard and the final file were never written.
    (out / "16x16" / "shard_00001.npz").unlink()
    (out / "samples_16x16.npz").unlink()
    assert main(args) == 0
    assert {name: (out / "16x16" / name).stat().st_mtime_ns for name in kept} == kept  # not redrawn
    np.testing.assert_array_equal(np.load(out / "samples_16x16.npz")["arr_0"], first)  # batch 1 drawn identically


def test_a_run_that_trained_on_does_not_reuse_older_samples(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_run(run, steps=2), progress=False)
    args = ["sample", str(run), "-n", "2", "--batch-size", "2", "--steps", "1", "--out", str(tmp_path / "s"),
            "--device", "cpu"]
    assert main(args) == 0
    train(tiny_run(run, steps=4), progress=False)  # resumes; `latest` now names step 4
    assert main(args) == 2
    assert "step_0000002" in capsys.readouterr().err  # the message names the checkpoint that changed


# --------------------------------------------------------------------------------------------------
# Recipes: --recipe paper|released and the flags it sets
# --------------------------------------------------------------------------------------------------


def _sample_args(*argv):
    from maskfit.cli import build_parser

    return build_parser().parse_args(["sample", "RUN", *argv])


def test_recipes_resolve_to_the_published_sets():
    common = {"atol": None, "rtol": None}
    dopri5 = {"sampler": "dopri5", "steps": None, "atol": 1e-6, "rtol": 1e-3}  # FiTv2 §V-A, fit.md §2.6
    released = _sample_args("--recipe", "released")
    assert resolve_sampling_choices(released, "ddpm") == {
        "recipe": "released", "sampler": "ddpm", "steps": 250, **common, "guidance_channels": 3,
        "yarn_ramp": "code", "ntk_exponent": "axis", "attn_scale": "none",  # the v1 script has no attention scale
    }
    assert resolve_sampling_choices(released, "flow") == {
        "recipe": "released", **dopri5, "guidance_channels": 3, "yarn_ramp": "code", "ntk_exponent": "axis",
        "attn_scale": "code",
    }
    paper = _sample_args("--recipe", "paper")
    assert resolve_sampling_choices(paper, "ddpm") == {
        "recipe": "paper", "sampler": "ddpm", "steps": 250, **common, "guidance_channels": None,
        "yarn_ramp": "paper", "ntk_exponent": "head", "attn_scale": "none",
    }
    assert resolve_sampling_choices(paper, "flow") == {
        "recipe": "paper", **dopri5, "guidance_channels": None, "yarn_ramp": "paper", "ntk_exponent": "head",
        "attn_scale": "paper",
    }
    # No recipe: the project's defaults, as before recipes existed.
    assert resolve_sampling_choices(_sample_args(), "flow") == {
        "recipe": None, "sampler": "euler", "steps": 50, **common, "guidance_channels": None,
        "yarn_ramp": "paper", "ntk_exponent": "axis", "attn_scale": "none",
    }


def test_explicit_flags_override_the_recipe():
    args = _sample_args("--recipe", "released", "--yarn-ramp", "paper", "--ntk-exponent", "head",
                        "--attn-scale", "none", "--guidance-channels", "all", "--sampler", "euler")
    assert resolve_sampling_choices(args, "flow") == {
        "recipe": "released", "sampler": "euler", "steps": 50, "atol": None, "rtol": None,
        "guidance_channels": None, "yarn_ramp": "paper", "ntk_exponent": "head", "attn_scale": "none",
    }
    args = _sample_args("--recipe", "paper", "--sampler", "ddim", "--steps", "20", "--guidance-channels", "2")
    choices = resolve_sampling_choices(args, "ddpm")
    assert (choices["sampler"], choices["steps"], choices["guidance_channels"]) == ("ddim", 20, 2)
    assert choices["ntk_exponent"] == "head"  # the flags not given still come from the recipe


def test_sampler_choices_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="--steps 50 has no effect with dopri5.*drop --steps"):
        resolve_sampling_choices(_sample_args("--recipe", "released", "--steps", "50"), "flow")
    with pytest.raises(ValueError, match="--sampler euler is FiTv2's, but this run's objective is 'ddpm'; use one of ddpm|ddim"):
        resolve_sampling_choices(_sample_args("--sampler", "euler"), "ddpm")


@pytest.mark.parametrize("argv, flag", [
    (["--recipe", "official"], "--recipe"),
    (["--yarn-ramp", "linear"], "--yarn-ramp"),
    (["--ntk-exponent", "dim"], "--ntk-exponent"),
    (["--attn-scale", "log"], "--attn-scale"),
    (["--precision", "fp16"], "--precision"),
    (["--guidance-channels", "0"], "--guidance-channels"),
    (["--guidance-channels", "three"], "--guidance-channels"),
    (["--sampler", "dpm"], "--sampler"),
    (["--subset-keep", "0"], "--subset-keep"),
    (["--subset-keep", "1.5"], "--subset-keep"),
])
def test_bad_sampling_values_are_argparse_errors(argv, flag, capsys):
    for command in (["sample", "RUN"], ["sweep", "RUN", "--reference", "REF"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, *argv])
        assert exit_info.value.code == 2
        assert f"argument {flag}" in capsys.readouterr().err


def test_a_bad_sweep_attention_scale_list_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "RUN", "--reference", "REF", "--attn-scale", "paper,log"])
    assert "unknown value(s) ['log']" in capsys.readouterr().err


def randomise_zero_weights(run_dir, scale: float = 0.3) -> None:
    """Random values in a run's near-zero EMA weights. adaLN-zero: after a few steps the zero-initialised layers
    (gates, final projection) are still ~0, so the network ignores attention and no RoPE setting, guidance
    channel or precision could change a pixel; with these the tests can see each choice reach the model."""
    from safetensors.torch import load_file, save_file

    from maskfit import checkpoint as ckpt_io

    ema_file = ckpt_io.latest_checkpoint(run_dir) / "ema.safetensors"
    weights, gen = load_file(str(ema_file)), torch.Generator().manual_seed(0)
    for key, value in weights.items():
        if value.abs().max() < 1e-3:
            weights[key] = scale * torch.randn(value.shape, generator=gen)
    save_file(weights, str(ema_file))


@pytest.fixture(scope="module")
def lively_run(tmp_path_factory):
    run = train(tiny_run(tmp_path_factory.mktemp("lively"), steps=2), progress=False).run_dir
    randomise_zero_weights(run)
    return run


def _draw(run, out, *argv, n: int = 2):
    """n 24x24 images (a 6x6 grid: 1.5x the 4x4 training grid, so extrapolation is active)."""
    assert main(["sample", str(run), "-n", str(n), "--batch-size", "5", "--steps", "2", "-r", "24", "--device", "cpu",
                 "--out", str(out), *argv]) == 0
    return np.load(out / "samples_24x24.npz")["arr_0"]


@pytest.mark.parametrize("base, flag, a, b", [
    (["--extrapolation", "yarn"], "--yarn-ramp", "paper", "code"),
    (["--extrapolation", "ntk"], "--ntk-exponent", "axis", "head"),
    ([], "--attn-scale", "none", "paper"),
    ([], "--guidance-channels", "all", "1"),
    ([], "--precision", "fp32", "bf16"),
])
def test_each_sampling_choice_reaches_the_model(lively_run, tmp_path, base, flag, a, b):
    default = _draw(lively_run, tmp_path / "default", *base)
    first = _draw(lively_run, tmp_path / "a", *base, flag, a)
    second = _draw(lively_run, tmp_path / "b", *base, flag, b)
    np.testing.assert_array_equal(first, default)  # ``a`` is the default: the same pixels
    assert not np.array_equal(first, second), f"{flag} {a} and {b} gave the same pixels"
    saved = json.loads((tmp_path / "b" / "24x24" / "settings.json").read_text())["settings"]
    recorded = {"--yarn-ramp": saved["options"]["rope"]["yarn_ramp"],
                "--ntk-exponent": saved["options"]["rope"]["ntk_exponent"],
                "--attn-scale": saved["options"]["rope"]["attn_scale"],
                "--guidance-channels": str(saved["options"]["guidance_channels"]),
                "--precision": saved["options"]["precision"]}[flag]
    assert recorded == b


def test_recipe_released_is_recorded_for_v1_and_v2_runs_and_a_change_is_refused(lively_run, tmp_path, capsys):
    v1 = train(tiny_run(tmp_path / "v1", objective="ddpm", steps=2), progress=False).run_dir
    out = tmp_path / "v1_samples"
    assert main(["sample", str(v1), "-n", "1", "--steps", "2", "--device", "cpu", "--out", str(out),
                 "--recipe", "released"]) == 0
    record = json.loads((out / "sampling.json").read_text())
    assert record["recipe"] == "released" and record["attention"] == "dense"
    o = record["options"]
    assert (o["method"], o["steps"], o["guidance_channels"], o["precision"]) == ("ddpm", 2, 3, "fp32")
    assert (o["rope"]["yarn_ramp"], o["rope"]["ntk_exponent"], o["rope"]["attn_scale"]) == ("code", "axis", "none")

    out = tmp_path / "v2_samples"
    argv = ["--recipe", "released", "--sampler", "euler", "--extrapolation", "vision_yarn"]
    _draw(lively_run, out, *argv)
    o = json.loads((out / "24x24" / "settings.json").read_text())["settings"]["options"]
    assert (o["method"], o["steps"], o["atol"], o["guidance_channels"]) == ("euler", 2, None, 3)
    assert (o["rope"]["yarn_ramp"], o["rope"]["ntk_exponent"], o["rope"]["attn_scale"]) == ("code", "axis", "code")
    # The same folder with another YaRN ramp: the old images are not passed off as these.
    assert main(["sample", str(lively_run), "-n", "2", "--batch-size", "5", "--steps", "2", "-r", "24",
                 "--device", "cpu", "--out", str(out), *argv, "--yarn-ramp", "paper"]) == 2
    assert "'yarn_ramp': 'code'" in capsys.readouterr().err


def test_an_evaluation_report_says_how_its_samples_were_drawn(lively_run, tmp_path):
    from maskfit.evaluate.proxy import ProxyClassifier, ProxyConfig
    from maskfit.evaluate.report import evaluate_samples, format_markdown

    _draw(lively_run, tmp_path / "s", "--recipe", "paper", "--sampler", "heun", "--extrapolation", "ntk", n=5)
    torch.manual_seed(0)
    network = ProxyClassifier(ProxyConfig(num_classes=4, input_size=16, width=4, num_stages=2))
    reference = np.random.default_rng(0).integers(0, 255, (4, 24, 24, 3), dtype=np.uint8)
    result = evaluate_samples(tmp_path / "s" / "samples_24x24.npz", reference, network, batch_size=4,
                              pr_precision="float32")
    assert result["sampling"]["recipe"] == "paper"
    assert result["sampling"]["options"]["rope"]["ntk_exponent"] == "head"
    md = format_markdown(result)
    assert "recipe paper; heun, 2 steps; CFG 1.5 on all channels; RoPE ntk (attention scale paper, " in md
    assert "YaRN ramp paper, NTK exponent head); network in fp32 (dense attention)" in md
    # An array (or a file without sampling.json beside it) has no record, and the report says nothing about it.
    assert evaluate_samples(np.load(tmp_path / "s" / "samples_24x24.npz")["arr_0"], reference, network,
                            batch_size=4, pr_precision="float32")["sampling"] is None


# --------------------------------------------------------------------------------------------------
# Precision: the network in bf16 where it pays, the sampler in fp32 always
# --------------------------------------------------------------------------------------------------


def test_precision_auto_is_fp32_on_a_cpu_and_bf16_on_cuda(run_dir, tmp_path):
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # allowed, if slow
    out = tmp_path / "s"
    assert main(["sample", str(run_dir), "-n", "1", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads((out / "sampling.json").read_text())
    assert record["options"]["precision"] == "fp32" and record["attention"] == "dense"


def _tiny_flow_model():
    from maskfit.config import config_from_dict
    from maskfit.models.transformer import FiT, model_config
    from maskfit.train import build_diffusion

    torch.manual_seed(0)
    model = FiT(model_config("FiTv2-tiny", num_classes=4)).eval().requires_grad_(False)
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))  # past adaLN-zero: a network whose output depends on its input
    return model, build_diffusion(config_from_dict({"diffusion": {"objective": "flow"}}))


def test_the_sampler_gets_fp32_from_a_bf16_network():
    from maskfit.sample import SamplerOptions, guided_denoiser, sample_tokens
    from maskfit.tokens import pack

    model, diffusion = _tiny_flow_model()
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    grids, labels = [(3, 5), (4, 4)], torch.tensor([0, 1])
    layout = pack([torch.empty(h * w, 0) for h, w in grids], grids, labels).layout
    x = torch.randn(layout.num_tokens, model.cfg.token_dim)
    for precision, network_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        fn = guided_denoiser(model, diffusion, SamplerOptions(cfg_scale=2.0, precision=precision))
        out = fn(x, torch.full((2,), 0.5), labels, layout)
        assert seen == [network_dtype] and out.dtype == torch.float32  # cast before the CFG mix and the sampler
        tokens = sample_tokens(model, diffusion, grids, labels, SamplerOptions(steps=2, precision=precision),
                               torch.Generator().manual_seed(0), torch.device("cpu"))
        assert all(t.dtype == torch.float32 for t in tokens)
    with pytest.raises(ValueError, match="precision='fp16'; choose one of"):
        SamplerOptions(precision="fp16")
    # FlashAttention has no fp32 kernel: a varlen model sampled in fp32 is refused before any kernel runs.
    model.cfg.attention = "varlen"
    with pytest.raises(ValueError, match="attention is 'varlen' \\(FlashAttention, bf16 only\\) but precision='fp32'"):
        sample_tokens(model, diffusion, grids, labels, SamplerOptions(), torch.Generator(), torch.device("cpu"))


def test_bf16_sampling_on_a_cpu_agrees_with_fp32_loosely():
    from maskfit.sample import SamplerOptions, sample_tokens

    model, diffusion = _tiny_flow_model()
    grids, labels = [(3, 5), (4, 4)], torch.tensor([0, 1])
    noise = torch.randn(sum(h * w for h, w in grids), model.cfg.token_dim, generator=torch.Generator().manual_seed(0))

    def draw(precision):
        options = SamplerOptions(steps=4, cfg_scale=1.5, precision=precision)
        tokens = sample_tokens(model, diffusion, grids, labels, options, torch.Generator().manual_seed(0),
                               torch.device("cpu"))
        return torch.cat(tokens) - noise  # what the network added to the noise (the noise alone would agree)

    fp32, bf16 = draw("fp32"), draw("bf16")
    assert fp32.abs().mean() > 0.1  # the network moved the state
    assert not torch.equal(fp32, bf16)  # bf16 really ran
    assert (bf16 - fp32).abs().mean() < 0.03 * fp32.abs().mean()


def test_the_sampling_bench_times_what_maskfit_sample_runs(monkeypatch):
    import maskfit.sample as sample_module
    from maskfit.bench import bench_sampling

    real, seen = sample_module.sample_tokens, []

    def spy(*args, **kwargs):
        seen.append(args[4].precision)  # the SamplerOptions maskfit sample would build
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_module, "sample_tokens", spy)
    r = bench_sampling("FiTv2-tiny", num_images=3, batch=3, steps=1, device="cpu")
    assert (r.precision, r.attention, r.compiled) == ("fp32", "dense", False)  # auto, resolved as the command does
    assert seen == ["fp32", "fp32"]  # one warm-up batch, one timed batch
    assert bench_sampling("FiTv2-tiny", num_images=3, batch=3, steps=1, device="cpu", precision="bf16").precision == "bf16"
    assert seen[-1] == "bf16"
    with pytest.raises(ValueError, match="attention 'varlen' needs a CUDA device"):
        bench_sampling("FiTv2-tiny", num_images=3, batch=3, steps=1, device="cpu", attention="varlen")


def test_compiled_sampling_draws_what_eager_draws_over_two_stream_lengths():
    # `maskfit sample --compile` compiles model.forward once with dynamic shapes (compile_for_sampling); under bf16
    # autocast it must draw the eager samples (a miscompiled stream, as the decoder's mask-token fill was, is O(1)).
    from maskfit.sample import SamplerOptions, sample_tokens
    from maskfit.sampling_run import compile_for_sampling

    model, diffusion = _tiny_flow_model()
    options = SamplerOptions(steps=3, cfg_scale=1.5, precision="bf16")
    draws = {}
    for name in ("eager", "compiled"):
        if name == "compiled":
            torch._dynamo.reset()
            compile_for_sampling(model)
        for grids in ([(3, 5), (4, 4)], [(2, 6), (5, 5), (4, 3)]):  # 31 and 49 tokens: one graph, two lengths
            labels = torch.arange(len(grids))
            tokens = sample_tokens(model, diffusion, grids, labels, options, torch.Generator().manual_seed(0),
                                   torch.device("cpu"))
            draws[name, len(grids)] = torch.cat(tokens)
    for n in (2, 3):
        eager, compiled = draws["eager", n], draws["compiled", n]
        assert (compiled - eager).abs().mean() < 0.02 * eager.abs().mean(), n


def test_a_samples_folder_records_the_kept_fraction_only_where_the_attention_scale_reads_it():
    # Folders sampled before train_keep existed resume (it changes no pixel unless attn_scale is "kept").
    from maskfit.models.rope import RopeExtrapolation
    from maskfit.sampling_run import rope_settings

    assert "train_keep" not in rope_settings(RopeExtrapolation(attn_scale="paper", train_keep=0.5))
    assert rope_settings(RopeExtrapolation(attn_scale="kept", train_keep=0.5))["train_keep"] == 0.5


def test_the_kept_attention_scale_reaches_the_model_with_the_runs_fraction_or_the_one_given(lively_run, tmp_path,
                                                                                          capsys):
    # An unmasked run kept every token: "kept" is FiTv2 eq. 15 (paper reading), pixel for pixel; a fraction of 0.5
    # given on the command line scales the logits further and is recorded with the samples.
    paper = _draw(lively_run, tmp_path / "paper", "--attn-scale", "paper")
    np.testing.assert_array_equal(_draw(lively_run, tmp_path / "kept", "--attn-scale", "kept"), paper)
    half = _draw(lively_run, tmp_path / "half", "--attn-scale", "kept", "--kept-fraction", "0.5")
    assert not np.array_equal(half, paper)
    saved = json.loads((tmp_path / "half" / "24x24" / "settings.json").read_text())["settings"]
    assert (saved["options"]["rope"]["attn_scale"], saved["options"]["rope"]["train_keep"]) == ("kept", 0.5)
    base = ["sample", str(lively_run), "-n", "1", "--steps", "2", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "x"), "--kept-fraction", "0.5"]) == 2
    assert "--kept-fraction 0.5 is read by --attn-scale kept only (this run samples with 'none')" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "y"), "--attn-scale", "kept", "--kept-fraction", "0"]) == 2
    assert "--kept-fraction 0: the kept fraction is in (0, 1], e.g. 0.5" in capsys.readouterr().err


def test_subset_sampling_reaches_the_model_and_is_recorded_only_when_on(lively_run, tmp_path):
    # --subset-keep 1 is the full grid, pixel for pixel, and its folder records nothing new (older folders resume);
    # 0.5 runs the network on random halves of each image and says so in the folder's settings.
    default = _draw(lively_run, tmp_path / "default")
    np.testing.assert_array_equal(_draw(lively_run, tmp_path / "one", "--subset-keep", "1"), default)
    half = _draw(lively_run, tmp_path / "half", "--subset-keep", "0.5")
    assert not np.array_equal(half, default)
    settings = lambda name: json.loads((tmp_path / name / "24x24" / "settings.json").read_text())["settings"]
    assert "subset_keep" not in settings("one")["options"]
    assert settings("half")["options"]["subset_keep"] == 0.5
