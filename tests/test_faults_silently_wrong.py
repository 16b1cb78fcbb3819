"""Nothing silently wrong: each test is a case that once ran to the end with a wrong result (or a bare traceback).

Two processes on one run or sample folder (real subprocesses: a lock per folder, released by the kernel on
kill -9), settings records that match the images beside them, config and CLI values refused with the value and
the fix named, a config change on resume kept in the run's history, broken evaluation statistics refused.
"""
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import maskfit
from maskfit.cli import main
from maskfit.config import config_from_dict, save_config
from maskfit.locks import LOCK_NAME
from tests.test_train import tiny_run

SRC = str(Path(maskfit.__file__).resolve().parents[1])


# --------------------------------------------------------------------------------------------------
# One process per folder (real subprocesses)
# --------------------------------------------------------------------------------------------------


def _start(argv, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "maskfit.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def _wait_for_lock(folder: Path, proc: subprocess.Popen, log: Path, then: str = LOCK_NAME,
                   timeout: float = 120.0) -> None:
    """Until ``proc`` holds ``folder``'s lock (its pid in the lock file) and ``folder/then`` exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the first process exited ({proc.returncode}) before taking the lock: {log.read_text()}")
        lock = folder / LOCK_NAME
        if lock.exists() and f'"pid": {proc.pid}' in lock.read_text() and (folder / then).exists():
            return
        time.sleep(0.05)
    pytest.fail(f"the first process did not take the lock of {folder} in {timeout} s")


def _kill9(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no finally blocks, no atexit; only the kernel cleans up
    proc.wait(timeout=30)


def test_a_second_train_on_a_run_folder_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "run.json"
    save_config(tiny_run(run, steps=100_000, train={"log_every": 10**6, "ckpt_every": 10**6}), config)
    first = _start(["train", str(config), "--quiet"], tmp_path / "first.log")
    try:
        _wait_for_lock(run, first, tmp_path / "first.log")
        assert main(["train", str(config), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"run folder {run} is in use by another maskfit process (pid {first.pid} on host " in err
        assert socket.gethostname() in err and "use another folder" in err
    finally:
        _kill9(first)
    # The kernel dropped the killed process's lock: the next run goes ahead at once.
    assert main(["train", str(config), "--quiet", "--set", "train.steps=1"]) == 0


def test_a_second_sample_into_one_folder_is_refused_and_its_settings_are_untouched(tmp_path, capsys):
    from maskfit.train import train

    run = train(tiny_run(tmp_path / "run", steps=2), progress=False).run_dir
    out = tmp_path / "samples"
    common = ["--steps", "2", "--batch-size", "1", "--device", "cpu", "--out", str(out)]
    first = _start(["sample", str(run), "-n", "100000", "--seed", "0", *common], tmp_path / "first.log")
    try:
        _wait_for_lock(out, first, tmp_path / "first.log", then="16x16/shard_00000.npz")  # drawing
        assert main(["sample", str(run), "-n", "2", "--seed", "1", *common]) == 2
        err = capsys.readouterr().err
        assert f"sample folder {out} is in use by another maskfit process (pid {first.pid} on host" in err
    finally:
        _kill9(first)
    # The refused run wrote nothing: the folder's records still describe the first run's images.
    assert json.loads((out / "sampling.json").read_text())["seed"] == 0
    assert json.loads((out / "16x16" / "settings.json").read_text())["settings"]["seed"] == 0
    # No stale lock after kill -9: the next run gets past the lock at once, to the settings check that guards
    # the first run's shards.
    assert main(["sample", str(run), "-n", "2", "--seed", "1", *common]) == 2
    err = capsys.readouterr().err
    assert "seed: 0 before, 1 now" in err and "in use" not in err


def test_a_forked_worker_does_not_keep_its_parents_folder_locked(tmp_path):
    import multiprocessing

    from maskfit.locks import FolderBusyError, folder_lock

    with folder_lock(tmp_path, "run folder"):
        with pytest.raises(FolderBusyError, match=f"run folder {tmp_path} is in use .*pid {os.getpid()} on host"):
            with folder_lock(tmp_path, "run folder"):
                pass
        # A DataLoader worker is forked with the lock's descriptor; flock would keep the lock while any copy is open.
        context = multiprocessing.get_context("fork")
        started = context.Event()
        worker = context.Process(target=lambda: (started.set(), time.sleep(60)))
        worker.start()
        assert started.wait(30)  # the worker runs (its at-fork hooks ran)
    try:
        with folder_lock(tmp_path, "run folder"):  # the parent let go: the folder is free though the worker lives
            assert worker.is_alive()
    finally:
        worker.kill()
        worker.join()


def test_sample_files_are_written_through_unique_temporary_names(tmp_path):
    from maskfit.sample import save_adm_npz

    # Before: every writer of x.npz used x.npz.tmp.npz, so two writers replaced each other's half-written file.
    (tmp_path / "x.npz.tmp.npz").mkdir()  # a name a fixed-temp-name writer cannot use
    images = [np.zeros((4, 4, 3), np.uint8)] * 2
    save_adm_npz(tmp_path / "x.npz", images, np.array([0, 1]))
    assert np.load(tmp_path / "x.npz")["arr_1"].tolist() == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz", "x.npz.tmp.npz"]  # no temporary left


# --------------------------------------------------------------------------------------------------
# sampling.json describes the images beside it
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    from maskfit.train import train

    return train(tiny_run(tmp_path_factory.mktemp("run"), steps=2), progress=False).run_dir


def test_a_refused_sample_rerun_leaves_the_settings_records_as_they_were(sample_run, tmp_path, capsys):
    out = tmp_path / "s"
    common = ["-n", "2", "--batch-size", "2", "--steps", "1", "--device", "cpu", "--out", str(out)]
    assert main(["sample", str(sample_run), *common]) == 0
    before = (out / "sampling.json").read_text()
    assert main(["sample", str(sample_run), *common, "--seed", "1"]) == 2
    assert "seed: 0 before, 1 now" in capsys.readouterr().err
    assert (out / "sampling.json").read_text() == before
    # Another resolution with other settings would make sampling.json describe only some of the images beside
    # it: refused too. With the same settings it is added to the record.
    assert main(["sample", str(sample_run), *common, "-r", "8x24", "--cfg-scale", "3"]) == 2
    assert "cfg_scale" in capsys.readouterr().err and (out / "sampling.json").read_text() == before
    assert main(["sample", str(sample_run), *common, "-r", "8x24"]) == 0
    assert json.loads((out / "sampling.json").read_text())["resolutions"] == [[16, 16], [8, 24]]


@pytest.mark.parametrize("flag, value, shown", [
    ("--cfg-scale", "nan", "--cfg-scale"),  # NaN guidance: every image black
    ("--steps", "0", "--steps"),
    ("-n", "0", "--num-images"),
    ("--batch-size", "0", "--batch-size"),
])
def test_sampling_counts_and_scales_that_cannot_work_are_argparse_errors(flag, value, shown, capsys):
    for command in (["sample", "RUN"], ["sweep", "RUN", "--reference", "REF"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, flag, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {shown}" in err and repr(value) in err


# --------------------------------------------------------------------------------------------------
# Config values: refused with the key, the value and the fix
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    ({"optim": {"grad_clip": -1.0}}, r"optim.grad_clip=-1.0; .*must be > 0 .*gradient ascent"),
    ({"optim": {"grad_clip": 0}}, r"optim.grad_clip=0.0; .*0 zeroes every gradient"),
    ({"optim": {"ema_decay": 1.5}}, r"optim.ema_decay=1.5; .*\[0, 1\]"),
    ({"optim": {"ema_decay": math.nan}}, r"optim.ema_decay=nan; .*\[0, 1\]"),
    ({"optim": {"lr": -1e-4}}, r"optim.lr=-0.0001; .*>= 0"),
    ({"train": {"steps": 3.5}}, r"config key train.steps=3.5 \(float\): expected a whole number"),
    ({"train": {"steps": 4.0}}, r"train.steps=4.0 \(float\): expected a whole number; write 4"),
    ({"train": {"steps": True}}, r"config key train.steps=True \(bool\): expected a whole number"),
    ({"train": {"steps": "abc"}}, r"config key train.steps='abc' \(str\): expected a whole number"),
    ({"train": {"batch_size": "8"}}, r"train.batch_size='8' \(str\): expected a whole number or null"),
    ({"train": {"ckpt_every": -5}}, r"train.ckpt_every=-5; .*>= 1"),
    ({"train": {"ckpt_every": 0}}, r"train.ckpt_every=0; .*>= 1"),
    ({"train": {"log_every": 0}}, r"train.log_every=0; .*>= 1"),
    ({"data": {"hflip": 1}}, r"data.hflip=1 \(int\): expected true or false"),
    ({"optim": {"lr": "1e-4"}}, r"optim.lr='1e-4' \(str\): expected a number"),
    ({"model": {"overrides": {"num_clases": 4}}}, r"unknown model override 'num_clases'.*num_classes"),
    ({"model": {"overrides": {"num_classes": 4.5}}}, r"model.overrides.num_classes=4.5 \(float\)"),
    ({"model": {"overrides": {"attention": "varlen"}}}, r"set model.attention instead"),
])
def test_harmful_config_values_are_refused_naming_key_value_and_fix(raw, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(raw)


def test_accepted_config_values_keep_their_meaning():
    cfg = config_from_dict({"optim": {"lr": 1, "betas": [0.9, 0.95], "grad_clip": math.inf},
                            "train": {"max_seconds": 3, "batch_size": None}})
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0  # an int is fine for a float
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.grad_clip == math.inf  # inf: no clipping
    assert cfg.train.max_seconds == 3.0 and cfg.train.batch_size == 256


def test_config_type_errors_are_one_line_on_the_command_line(tmp_path, capsys):
    config = tmp_path / "run.json"
    save_config(tiny_run(tmp_path / "run"), config)
    assert main(["train", str(config), "--set", "train.steps=abc"]) == 2
    assert "train.steps='abc' (str): expected a whole number" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "train.steps.x=5"]) == 2
    err = capsys.readouterr().err
    assert "override 'train.steps.x=5': train.steps is a value (6), not a section" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _image_folder(root: Path, classes: int) -> Path:
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 40 * c, np.uint8)).save(root / f"class_{c}" / "a.png")
    return root


def test_more_classes_than_the_model_embeds_are_refused(tmp_path):
    from maskfit.data.pipeline import build_training_data

    data = {"source": "folder", "root": str(_image_folder(tmp_path / "five", 5))}
    cfg = tiny_run(tmp_path / "run", data=data, train={"batch_size": 2})  # the model has num_classes=4
    with pytest.raises(ValueError, match=r"image folder \S*five has 5 classes but the model has num_classes=4: "
                                         r"class index 4 would be the guidance null label. Set "
                                         r"model.overrides.num_classes=5"):
        build_training_data(cfg, 4)
    data["root"] = str(_image_folder(tmp_path / "four", 4))
    assert build_training_data(tiny_run(tmp_path / "run", data=data, train={"batch_size": 2}), 4).channels == 3
    with pytest.raises(ValueError, match=r"synthetic set \(data.num_classes=8\) has 8 classes .* num_classes=4"):
        build_training_data(tiny_run(tmp_path / "run", data={"num_classes": 8}), 4)


def test_a_latent_cache_is_used_at_the_token_budget_it_was_built_for(tmp_path):
    from maskfit.data.datasets import SyntheticDataset
    from maskfit.data.latents import IdentityAutoencoder, build_latent_cache
    from maskfit.data.pipeline import build_dataset
    from maskfit.data.synthetic import SyntheticSizes

    cache = tmp_path / "cache"
    ds = SyntheticDataset(4, 4, seed=0, sizes=SyntheticSizes(token_budget=16, patch_px=4))
    build_latent_cache(ds, IdentityAutoencoder(), cache, batch_size=4, progress=False)
    data = config_from_dict({"data": {"source": "latents", "root": str(cache), "token_budget": 64}}).data
    with pytest.raises(ValueError, match=r"built at token_budget=16 but data.token_budget=64; set "
                                         r"data.token_budget=16, or rebuild"):
        build_dataset(data, 4, 0)
    data = config_from_dict({"data": {"source": "latents", "root": str(cache), "token_budget": 16}}).data
    assert len(build_dataset(data, 4, 0, num_classes=4)) == 4
    with pytest.raises(ValueError, match=r"latent cache .* has 4 classes but the model has num_classes=3"):
        build_dataset(data, 4, 0, num_classes=3)


# --------------------------------------------------------------------------------------------------
# A resumed run with another config keeps the history
# --------------------------------------------------------------------------------------------------


def test_a_config_change_on_resume_is_kept_in_the_history_and_said(tmp_path, capsys):
    from maskfit.train import train

    run = tmp_path / "run"
    train(tiny_run(run), progress=False, stop_after=3)  # a checkpoint at step 3
    train(tiny_run(run), progress=False, stop_after=0)  # unchanged: no history line
    assert not (run / "config_history.jsonl").exists()
    capsys.readouterr()
    train(tiny_run(run, optim={"lr": 2e-3, "grad_clip": 0.5}), progress=False)
    err = capsys.readouterr().err
    assert f"{run} resumes at step 3 with a changed config: optim.grad_clip 1.0 -> 0.5, optim.lr 0.001 -> 0.002" in err
    assert "config_history.jsonl" in err
    lines = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["step"] == 3
    assert lines[0]["changes"] == {"optim.grad_clip": {"from": 1.0, "to": 0.5}, "optim.lr": {"from": 0.001, "to": 0.002}}
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.002


# --------------------------------------------------------------------------------------------------
# Evaluation: broken statistics and activations are refused, naming the file
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def eval_files(tmp_path):
    from maskfit.evaluate.adm_npz import write_sample_npz
    from maskfit.evaluate.proxy import ProxyClassifier, ProxyConfig, load_proxy, save_proxy

    torch.manual_seed(0)
    proxy = tmp_path / "proxy.safetensors"
    save_proxy(ProxyClassifier(ProxyConfig(num_classes=3, input_size=16, width=4, num_stages=2)), proxy)
    network = load_proxy(proxy)
    rng = np.random.default_rng(0)
    samples = write_sample_npz(tmp_path / "samples.npz", rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8))
    return proxy, network, samples


def _reference(path: Path, network, mu, sigma) -> Path:
    np.savez(path, mu=mu, sigma=sigma, feature_network=np.array(network.feature_network_id))
    return path


def test_eval_refuses_a_reference_with_nan_or_inf_statistics(eval_files, tmp_path, capsys):
    from maskfit.evaluate.adm_npz import read_reference

    proxy, network, samples = eval_files
    d = network.config.feature_dim
    sigma = np.eye(d)
    sigma[0, 1] = math.nan  # gave proxy_fd: nan, exit 0
    ref = _reference(tmp_path / "ref.npz", network, np.zeros(d), sigma)
    assert main(["eval", str(samples), "--reference", str(ref), "--proxy", str(proxy), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"reference {ref} ('mu', 'sigma'): sigma (1 of {d * d} entries) hold NaN or infinite values" in err
    # inf made scipy.linalg.sqrtm spin forever (read here, not evaluated, so the old code fails instead of hanging)
    mu = np.zeros(d)
    mu[3] = math.inf
    ref = _reference(tmp_path / "ref_inf.npz", network, mu, np.eye(d))
    with pytest.raises(ValueError, match=rf"reference {ref} \('mu', 'sigma'\): mu \(1 of {d} entries\) hold NaN"):
        read_reference(ref)


def test_eval_refuses_misshapen_statistics_naming_the_file(eval_files, tmp_path):
    from maskfit.evaluate.adm_npz import read_reference

    _, network, _ = eval_files
    d = network.config.feature_dim
    ref = _reference(tmp_path / "ref.npz", network, np.zeros(d), np.eye(d)[:, :-1])  # sigma not square
    with pytest.raises(ValueError, match=rf"reference {ref} \('mu', 'sigma'\): GaussianStats wants mu \(D,\) and sigma"):
        read_reference(ref)


def test_fid_of_nan_statistics_is_an_error_not_a_number():
    from maskfit.evaluate.metrics import GaussianStats, frechet_distance

    good = GaussianStats(np.zeros(3), np.eye(3))
    bad = GaussianStats(np.array([0.0, math.nan, 0.0]), np.eye(3))
    with pytest.raises(ValueError, match=r"reference statistics: mu \(1 of 3 entries\) hold NaN"):
        frechet_distance(good, bad)


def test_a_network_that_gives_nan_features_is_refused_naming_its_file(eval_files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from maskfit.evaluate.proxy import load_proxy
    from maskfit.evaluate.report import evaluate_samples

    proxy, network, samples = eval_files
    images = np.load(samples)["arr_0"]
    with torch.no_grad():
        next(network.parameters()).fill_(math.nan)  # in memory: caught at the features
    with pytest.raises(ValueError, match=rf"\({proxy}\) gave NaN or infinite features for the reference images"):
        evaluate_samples(samples, images, network, batch_size=8, pr_precision="float32")
    with safe_open(str(proxy), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(str(proxy))
    weights[next(iter(weights))].fill_(math.nan)
    save_file(weights, str(proxy), metadata=metadata)
    with pytest.raises(ValueError, match=rf"{proxy} holds NaN or infinite weights"):
        load_proxy(proxy)
