"""Sharded checkpoints (train.checkpoint_format="sharded", FSDP's default) in one process: they resume
exactly as the one-process files do, are refused when the weights hold NaN, and every reader of weights
(sampling, fine-tune bases, resume) finds them. Many ranks: tests/test_distributed.py."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskfit import checkpoint as ckpt_io
from maskfit.cli import main
from maskfit.config import TrainConfig
from maskfit.distributed import Parallel
from tests.test_distributed import BASE  # the tiny run the many-rank tests train

def _train(tmp: Path, name: str, fmt: str, *sets: str) -> Path:
    raw = json.loads(json.dumps(BASE))
    raw["train"].update(out_dir=str(tmp / name), checkpoint_format=fmt)
    config = tmp / f"{name}.json"
    config.write_text(json.dumps(raw))
    args = ["train", str(config), "--quiet"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return tmp / name


def test_a_sharded_run_resumes_exactly_as_the_one_process_files_do(tmp_path):
    full = _train(tmp_path, "full", "full")
    sharded = _train(tmp_path, "sharded", "sharded", "train.steps=2")
    _train(tmp_path, "sharded", "sharded")  # resumes at step 2 from the shards
    folder = sharded / "checkpoints" / "step_0000004"
    assert ckpt_io.is_sharded(folder) and ckpt_io.is_complete_checkpoint(folder)
    assert not (folder / "model.safetensors").exists() and not (folder / "optimizer.pt").exists()
    assert ckpt_io.latest_checkpoint(sharded) == folder and ckpt_io.resolve_checkpoint(folder) == folder
    assert ckpt_io.older_complete_checkpoints(folder) == [sharded / "checkpoints" / "step_0000002"]
    for name in ("model", "ema"):
        assert ckpt_io.has_weights(folder, name)
        want = load_file(str(full / "checkpoints" / "step_0000004" / f"{name}.safetensors"))
        got = ckpt_io.read_sharded_weights(folder, name)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{name} {k}")
    log = lambda run: [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log(sharded) == log(full)


def test_sharded_weights_with_nan_are_refused_and_nothing_is_written(tmp_path):
    good = {"w": torch.ones(3)}
    bad = {"w": torch.tensor([1.0, float("nan"), 0.0])}
    with pytest.raises(ValueError, match=r"refusing to write checkpoint .*step_0000007.*NaN or inf"):
        ckpt_io.save_sharded_checkpoint(tmp_path, 7, {"model": good, "ema": bad, "optimizer": {}}, {}, {},
                                        Parallel())
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_sharded_weights_load_into_the_architecture_they_came_from_only(tmp_path):
    folder = ckpt_io.save_sharded_checkpoint(
        tmp_path, 1, {"model": {"w": torch.ones(2, 3)}, "ema": {"w": torch.full((2, 3), 2.0)}, "optimizer": {}},
        {}, {}, Parallel())
    into = torch.nn.Module()
    into.w = torch.nn.Parameter(torch.zeros(2, 3))
    ckpt_io.load_weights(into, folder / "ema.safetensors")  # the name every reader uses, in either format
    assert torch.equal(into.w.detach(), torch.full((2, 3), 2.0))
    other = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"another architecture .*missing \['bias', 'weight'\]"):
        ckpt_io.load_weights(other, folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"optimizer.safetensors is missing"):
        ckpt_io.load_weights(into, folder / "optimizer.safetensors")


def test_the_checkpoint_format_is_one_of_three():
    with pytest.raises(ValueError, match=r"train.checkpoint_format"):
        TrainConfig(checkpoint_format="dcp")


class _Payload:
    """Unpickling this calls os.system: what a crafted .metadata could do under torch's plain pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_sharded_metadata_is_refused_and_its_payload_never_runs(tmp_path):
    import pickle

    folder = ckpt_io.save_sharded_checkpoint(
        tmp_path, 1, {"model": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}, "optimizer": {}}, {}, {},
        Parallel())
    marker = tmp_path / "payload_ran"
    (folder / "sharded" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    into = torch.nn.Module()
    into.w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"refusing to load .*\.metadata: GLOBAL (posix|os)\.system is not"):
        ckpt_io.load_weights(into, folder / "ema.safetensors")
    assert not marker.exists()


def test_sharded_entries_that_are_not_tensors_are_refused(tmp_path):
    """torch.distributed.checkpoint unpickles non-tensor entries with weights_only=False; ours has none."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "checkpoints" / "step_0000001"
    dcp.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}, "note": {"lr": 0.1}},
             checkpoint_id=str(folder / "sharded"), no_dist=True)
    with pytest.raises(ValueError, match=r"stores 1 entries that are not tensors \(first: \['note.lr'\]\)"):
        ckpt_io.read_sharded_weights(folder, "model")


def test_a_full_disk_during_a_sharded_write_is_named_and_the_earlier_checkpoint_stays(tmp_path, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    states = {"model": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}, "optimizer": {}}
    first = ckpt_io.save_sharded_checkpoint(tmp_path, 1, states, {}, {}, Parallel())

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(ckpt_io.CheckpointWriteError, match=r"step_0000002 .*the disk is full.*latest: step_0000001"):
        ckpt_io.save_sharded_checkpoint(tmp_path, 2, states, {}, {}, Parallel())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]
    assert ckpt_io.latest_checkpoint(tmp_path) == first
