"""Faults users met: unsafe checkpoint loading, private checkpoint files, raw tracebacks for bad files and
values, a corrupt training image that made a run impossible to resume, optional packages missing."""
import os
import pickle
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from maskfit import checkpoint as ckpt_io
from maskfit.cli import main
from maskfit.config import save_config
from maskfit.train import load_model_from_checkpoint, train
from tests.test_train import tiny_run


def same_weights(run_a: Path, run_b: Path) -> bool:
    a, b = ckpt_io.latest_checkpoint(run_a), ckpt_io.latest_checkpoint(run_b)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 6-step run (checkpoints at 3 and 6) and the same run stopped after step 3."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny_run(root / "straight"), progress=False)
    train(tiny_run(root / "stopped"), progress=False, stop_after=3)
    return root


def error_line(capsys) -> str:
    """The CLI's one error line (progress bars may share stderr); never a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("maskfit ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def copy_run(runs: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


# ----------------------------------------------------------------------------------------------------
# Unsafe: a crafted state.pt / optimizer.pt ran os.system on resume (torch.load weights_only=False)
# ----------------------------------------------------------------------------------------------------


class Payload:
    """What an attacker puts in a shared run folder: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["state.pt", "optimizer.pt"])
def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(runs, tmp_path, name):
    run = copy_run(runs, "stopped", tmp_path)
    marker = tmp_path / "payload_ran"
    file = ckpt_io.latest_checkpoint(run) / name
    torch.save({"step": 3, "rng": Payload(marker)}, file)
    with pytest.raises(ValueError, match=rf"refusing to load {file}: .*posix\.system.*could run any code"):
        train(tiny_run(run), progress=False)
    assert not marker.exists()


def test_checkpoint_state_is_plain_data_that_weights_only_loading_reads(runs):
    ckpt = ckpt_io.latest_checkpoint(runs / "stopped")
    for name in ("state.pt", "optimizer.pt"):
        torch.load(ckpt / name, weights_only=True)  # no allowlist: tensors, numbers, strings, lists, dicts only
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert set(state["rng"]) >= {"torch", "numpy", "python"} and isinstance(state["data"], dict)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    np.random.seed(5)
    random.seed(5)
    np.random.standard_normal()  # numpy now caches a Gaussian: has_gauss and gauss are part of the state
    torch.save(ckpt_io.rng_state(), tmp_path / "rng.pt")
    expected = (np.random.random(3), random.random(), np.random.standard_normal(), torch.rand(2))
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    ckpt_io.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (np.random.random(3), random.random(), np.random.standard_normal(), torch.rand(2))
    assert np.array_equal(got[0], expected[0]) and got[1:3] == expected[1:3] and torch.equal(got[3], expected[3])


def test_a_checkpoint_written_before_the_plain_rng_format_still_resumes_exactly(runs, tmp_path):
    """Old state.pt files hold numpy's RNG tuple with an ndarray: read under a narrow numpy allowlist."""
    run = copy_run(runs, "stopped", tmp_path)
    ckpt = ckpt_io.latest_checkpoint(run)
    state = ckpt_io.load_state(ckpt)
    np.random.seed(11)
    old_numpy = np.random.get_state()  # ('MT19937', ndarray (624,) uint32, pos, has_gauss, gauss)
    state["rng"]["numpy"] = old_numpy
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt / "state.pt", weights_only=True)  # the old format really needs the allowlist
    ckpt_io.set_rng_state(ckpt_io.load_state(ckpt)["rng"])
    restored = np.random.get_state()
    assert restored[0] == old_numpy[0] and np.array_equal(restored[1], old_numpy[1]) and restored[2:] == old_numpy[2:]
    train(tiny_run(run), progress=False)
    assert same_weights(run, runs / "straight")


# ----------------------------------------------------------------------------------------------------
# Checkpoint folders and files followed the process umask nowhere (tempfile's 0700 / 0600)
# ----------------------------------------------------------------------------------------------------


def modes(root: Path) -> dict:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_run_files_follow_the_process_umask(tmp_path, umask, file_mode, dir_mode):
    from maskfit.evaluate.adm_npz import write_reference_npz, write_sample_npz
    from maskfit.evaluate.metrics import GaussianStats
    from maskfit.evaluate.proxy import ProxyClassifier, ProxyConfig, save_proxy

    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        ckpt_io.save_checkpoint(run, 1, model, model, optimizer, {"data": {"epoch": 0}}, {"a": 1})
        save_config(tiny_run(run), run / "config.json")
        images = np.zeros((2, 8, 8, 3), np.uint8)
        write_sample_npz(tmp_path / "samples.npz", images)
        write_reference_npz(tmp_path / "ref.npz", "net", GaussianStats(np.zeros(2), np.eye(2)))
        save_proxy(ProxyClassifier(ProxyConfig(num_classes=2, width=4, num_stages=1)), tmp_path / "proxy.safetensors")
    finally:
        os.umask(old)
    found = modes(tmp_path)
    expected = {name: (dir_mode if (tmp_path / name).is_dir() else file_mode) for name in found}
    assert found == expected
    assert {"run/checkpoints/step_0000001/state.pt", "run/checkpoints/latest", "run/config.json", "samples.npz",
            "ref.npz", "proxy.safetensors"} <= set(found)


def test_a_latent_cache_follows_the_process_umask(tmp_path):
    from maskfit.data.datasets import SyntheticDataset
    from maskfit.data.latents import IdentityAutoencoder, build_latent_cache
    from maskfit.data.synthetic import SyntheticSizes

    old = os.umask(0o022)
    try:
        dataset = SyntheticDataset(4, 2, sizes=SyntheticSizes(token_budget=16, patch_px=4))
        build_latent_cache(dataset, IdentityAutoencoder(), tmp_path / "cache", batch_size=4, progress=False)
    finally:
        os.umask(old)
    found = modes(tmp_path)
    assert found and all(mode == (0o755 if (tmp_path / name).is_dir() else 0o644) for name, mode in found.items())
    assert any(name.endswith(".safetensors") for name in found)  # safetensors itself writes 0600


# ----------------------------------------------------------------------------------------------------
# Raw tracebacks: a corrupt checkpoint file, .npz or image; --overwrite; a sampling batch out of memory
# ----------------------------------------------------------------------------------------------------


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "optimizer.pt", "state.pt"])
def test_a_corrupt_checkpoint_file_is_named_with_the_older_checkpoint_to_resume_from(runs, tmp_path, capsys, name):
    run = copy_run(runs, "straight", tmp_path)
    bad = run / "checkpoints" / "step_0000006"
    truncate(bad / name)
    config = tmp_path / "run.json"
    save_config(tiny_run(run), config)
    assert main(["train", str(config), "--quiet"]) == 2
    err = error_line(capsys)
    assert f"checkpoint file {bad / name} cannot be read" in err
    assert f"to resume from step_0000003, delete {bad} and write step_0000003 into {run / 'checkpoints' / 'latest'}" in err
    # The advice works: the run resumes from step 3 and ends where the uninterrupted run ended.
    shutil.rmtree(bad)
    (run / "checkpoints" / "latest").write_text("step_0000003")
    assert main(["train", str(config), "--quiet"]) == 0
    assert same_weights(run, runs / "straight")


def test_a_corrupt_checkpoint_config_is_named_when_sampling(runs, tmp_path, capsys):
    run = copy_run(runs, "straight", tmp_path)
    bad = run / "checkpoints" / "step_0000006" / "config.json"
    bad.write_text('{"model": {"preset": "FiTv2-ti')  # cut off mid-write
    assert main(["sample", str(run), "-n", "1", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "s")]) == 2
    err = error_line(capsys)
    assert f"checkpoint file {bad} cannot be read (JSONDecodeError" in err and "step_0000003" in err
    with pytest.raises(ValueError, match="no older complete checkpoint"):
        shutil.rmtree(run / "checkpoints" / "step_0000003")
        load_model_from_checkpoint(run)


def eval_argv(samples: Path, reference: Path, *extra) -> list:
    return ["eval", str(samples), "--reference", str(reference), "--device", "cpu",
            "--inception-weights", str(samples.parent / "no_weights_needed_before_the_inputs_pass.pth"), *extra]


@pytest.mark.parametrize("which", ["samples", "reference"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_npz_in_eval_is_one_line_naming_it(tmp_path, capsys, which, damage):
    from maskfit.evaluate.adm_npz import write_sample_npz

    files = {k: write_sample_npz(tmp_path / f"{k}.npz", np.zeros((4, 8, 8, 3), np.uint8)) for k in ("samples", "reference")}
    bad = files[which]
    if damage == "garbage":
        bad.write_bytes(b"not a zip file at all" * 10)
    else:
        truncate(bad)
    assert main(eval_argv(files["samples"], files["reference"])) == 2
    err = error_line(capsys)
    assert f"{bad} is not a readable .npz" in err and "corrupt or truncated" in err and "maskfit sample" in err


def test_a_corrupt_proxy_classifier_in_eval_is_one_line_naming_it(tmp_path, capsys):
    from maskfit.evaluate.adm_npz import write_sample_npz
    from maskfit.evaluate.proxy import ProxyClassifier, ProxyConfig, save_proxy

    samples = write_sample_npz(tmp_path / "samples.npz", np.zeros((4, 8, 8, 3), np.uint8))
    proxy = tmp_path / "proxy.safetensors"
    save_proxy(ProxyClassifier(ProxyConfig(num_classes=2, width=4, num_stages=1)), proxy)
    truncate(proxy)
    assert main(eval_argv(samples, samples, "--proxy", str(proxy))) == 2
    assert f"proxy classifier {proxy} cannot be read (SafetensorError" in error_line(capsys)


def test_a_damaged_image_member_of_an_npz_is_named(tmp_path):
    """The zip's directory is intact but the images' bytes are not (a flipped bit): the CRC check fails."""
    from maskfit.evaluate.adm_npz import NpzImageReader, write_sample_npz

    path = write_sample_npz(tmp_path / "samples.npz", np.zeros((4, 8, 8, 3), np.uint8))
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside arr_0's pixels (stored, not compressed)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"samples\.npz is not a readable \.npz \(BadZipFile: Bad CRC-32"):
        list(NpzImageReader(path).batches(4))


def image_folder(root: Path, per_class: int = 8, size=(16, 16)) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    return root


def test_an_empty_image_in_a_reference_or_classifier_folder_is_one_line(tmp_path, capsys):
    from maskfit.evaluate.adm_npz import write_sample_npz

    folder = image_folder(tmp_path / "ref", per_class=2)
    (folder / "b" / "01.png").write_bytes(b"")
    samples = write_sample_npz(tmp_path / "samples.npz", np.zeros((4, 16, 16, 3), np.uint8))
    assert main(eval_argv(samples, folder)) == 2
    err = error_line(capsys)
    assert f"image file {folder / 'b' / '01.png'} is empty (0 bytes)" in err
    assert main(["train-classifier", "--data", str(folder), "--out", str(tmp_path / "p.safetensors"), "--epochs", "1",
                 "--device", "cpu"]) == 2
    assert f"{folder / 'b' / '01.png'} is empty" in error_line(capsys)


def test_prepare_into_a_non_empty_folder_names_the_overwrite_flag(tmp_path, capsys):
    config = tmp_path / "run.json"
    save_config(tiny_run(tmp_path / "run", data={"num_images": 4}), config)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "old.txt").write_text("something")
    argv = ["prepare", str(config), "--out", str(cache), "--device", "cpu"]
    assert main(argv) == 2
    err = error_line(capsys)
    assert f"cache folder {cache} is not empty" in err and "--overwrite" in err
    assert main([*argv, "--overwrite"]) == 0  # the flag the message names exists
    assert (cache / "manifest.json").is_file()


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"),
    RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 85899345920 bytes."),
])
def test_a_sampling_batch_out_of_memory_names_the_resolution_and_the_batch_size(runs, tmp_path, capsys, monkeypatch, error):
    import maskfit.sampling_run as sampling_run

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(sampling_run, "sample_tokens", out_of_memory)
    common = ["-n", "8", "--batch-size", "8", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "s")]
    assert main(["sample", str(runs / "straight"), "-r", "16x32", *common]) == 2
    err = error_line(capsys)
    assert "sampling 16x32 (32 tokens per image) with --batch-size 8 ran out of memory on cpu" in err
    assert "lower --batch-size (e.g. --batch-size 4)" in err
    packed = [*common[:-1], str(tmp_path / "packed")]  # a folder of its own: one sampling.json per folder
    assert main(["sample", str(runs / "straight"), "-r", "16", "-r", "16x32", "--pack", *packed]) == 2
    assert "packed batch 0 (8 images, the largest 16x32 = 32 tokens)" in error_line(capsys)


def test_other_runtime_errors_in_sampling_are_not_called_out_of_memory(runs, tmp_path, capsys, monkeypatch):
    import maskfit.sampling_run as sampling_run

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(sampling_run, "sample_tokens", broken)
    assert main(["sample", str(runs / "straight"), "-n", "1", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "s")]) == 2
    assert error_line(capsys) == "maskfit sample: error: mat1 and mat2 shapes cannot be multiplied"


def test_a_corrupt_image_met_mid_run_says_replace_and_the_run_then_resumes(tmp_path):
    folder = image_folder(tmp_path / "images")
    cfg = tiny_run(tmp_path / "run", data={"source": "folder", "root": str(folder)})
    train(cfg, progress=False, stop_after=3)
    bad = folder / "a" / "03.png"
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated copy
    with pytest.raises(ValueError, match=rf"image file {bad} is corrupt.*replace it with any valid image under the same name"):
        train(cfg, progress=False)
    # Deleting it instead would shift the folder's order: the checkpoint's data state refuses that.
    moved = bad.rename(tmp_path / "aside.png")
    with pytest.raises(ValueError, match="different order"):
        train(cfg, progress=False)
    # Following the message (a valid image under the same name) resumes the run.
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(bad)
    moved.unlink()
    assert train(cfg, progress=False).step == 6


# ----------------------------------------------------------------------------------------------------
# Also: bit-exact resume and thread counts; a plain install without scipy / matplotlib
# ----------------------------------------------------------------------------------------------------


def test_resume_is_bit_exact_with_two_threads_under_deterministic_algorithms(tmp_path):
    """What the README promises beyond one thread. Without deterministic algorithms the backward of the
    token gathers (index_put_ with accumulate) adds with atomics on several CPU threads, in an order that
    changes from run to run: then even two uninterrupted runs differ in the last bits."""
    model = {"overrides": {"patch_size": 4, "num_classes": 4, "hidden_size": 64, "num_heads": 2, "ffn_hidden": 256}}

    def cfg(out):
        return tiny_run(out, model=model, data={"token_budget": 64})

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(2)
        torch.use_deterministic_algorithms(True)
        train(cfg(tmp_path / "straight"), progress=False)
        train(cfg(tmp_path / "resumed"), progress=False, stop_after=3)
        train(cfg(tmp_path / "resumed"), progress=False)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert same_weights(tmp_path / "straight", tmp_path / "resumed")


def block(monkeypatch, *packages: str) -> None:
    """Simulate a plain `pip install maskfit`: importing these packages (and their submodules) fails."""
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            monkeypatch.setitem(sys.modules, name, None)
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("scipy.linalg", "scipy.special", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        if name.split(".")[0] in packages:
            monkeypatch.setitem(sys.modules, name, None)


def test_metrics_without_scipy_name_the_eval_extra(monkeypatch):
    from maskfit.evaluate import metrics
    from maskfit.extras import MissingPackageError

    block(monkeypatch, "scipy")
    stats = metrics.GaussianStats(np.zeros(2), np.eye(2))
    with pytest.raises(MissingPackageError, match=r"Fréchet distance \(FID, sFID\) needs scipy.*pip install 'maskfit\[eval\]'"):
        metrics.frechet_distance(stats, stats)
    with pytest.raises(ImportError, match=r"Inception Score needs scipy"):  # still an ImportError for callers
        metrics.inception_score(np.full((4, 2), 0.5))


def test_eval_without_scipy_fails_first_in_one_line(tmp_path, capsys, monkeypatch):
    from maskfit.evaluate.adm_npz import write_sample_npz

    block(monkeypatch, "scipy")
    samples = write_sample_npz(tmp_path / "samples.npz", np.zeros((4, 8, 8, 3), np.uint8))
    assert main(eval_argv(samples, samples)) == 2
    err = error_line(capsys)
    assert "pip install 'maskfit[eval]'" in err


@pytest.mark.parametrize("package", ["matplotlib", "scipy"])
def test_sweep_without_an_eval_package_fails_before_any_sampling(runs, tmp_path, capsys, monkeypatch, package):
    block(monkeypatch, package)
    out = tmp_path / "sweep"
    assert main(["sweep", str(runs / "straight"), "--reference", str(runs), "--proxy", str(tmp_path / "p.safetensors"),
                 "-n", "2", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 2
    err = error_line(capsys)
    assert f"needs {package}" in err and "pip install 'maskfit[eval]'" in err
    assert not out.exists()


def test_every_command_imports_without_the_optional_packages():
    import subprocess

    code = ("import sys\n"
            "for name in ('scipy', 'matplotlib', 'torchdiffeq', 'diffusers', 'tensorboard'):\n"
            "    sys.modules[name] = None\n"
            "import maskfit.cli, maskfit.sweep, maskfit.evaluate.report, maskfit.evaluate.bench, maskfit.bench\n"
            "for command in ('models', 'train', 'sample', 'sweep', 'prepare', 'eval', 'train-classifier', 'bench',"
            " 'demo', 'import-published'):\n"
            "    try:\n"
            "        maskfit.cli.build_parser().parse_args([command, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
