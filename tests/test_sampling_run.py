"""`maskfit sample`'s bookkeeping: labels across batches, refusing to resume with other settings, and the
attention backend it samples with."""
import numpy as np
import pytest
import torch

from maskfit.cli import main
from maskfit.sampling_run import labels_for, sampling_attention
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
    assert sampling_attention("auto", cpu) == "dense"  # same math, the CPU's kernel
    assert sampling_attention("auto", cuda) == "varlen"  # any stream length, no recompilation
    assert sampling_attention("flex", cpu) == "flex"
    with pytest.raises(ValueError, match="attention 'varlen' needs a CUDA device.*--attention dense"):
        sampling_attention("varlen", cpu)
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
