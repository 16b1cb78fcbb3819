"""Many processes (train.parallel): 2 real gloo ranks on the CPU, started by torchrun as a user would.

2 ranks with B images each train the same model as 1 process with 2B (DDP and FSDP2); a 2-rank run
stopped and resumed on 1 rank (and 1 -> 2) continues as an uninterrupted run.
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maskfit import checkpoint as ckpt_io
from maskfit.data.pipeline import TokenBudgetSampler

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "model": {"preset": "FiTv2-tiny", "overrides": {"patch_size": 4, "num_classes": 4}},
    "data": {"source": "synthetic", "num_images": 64, "num_classes": 4, "token_budget": 16,
             "autoencoder": "identity", "layout": "packed"},
    "diffusion": {"objective": "flow"},
    "optim": {"lr": 1e-3, "ema_decay": 0.9},
    "train": {"steps": 4, "batch_size": 8, "log_every": 2, "ckpt_every": 2, "device": "cpu", "seed": 3},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tmp: Path, name: str, nproc: int, parallel: str, extra=(), **sections) -> Path:
    """`[torchrun --nproc-per-node N] python -m maskfit.cli train CONFIG`; returns the run folder."""
    raw = json.loads(json.dumps(BASE))
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    out = tmp / name
    raw["train"].update(out_dir=str(out), parallel=parallel)
    config = tmp / f"{name}.json"
    config.write_text(json.dumps(raw))
    launch = [sys.executable, "-m", "maskfit.cli"] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "maskfit.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, "train", str(config), "--quiet", *extra], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _weights(run: Path, step: int, name="model") -> dict:
    """A checkpoint's whole weights, from its safetensors file or its shards (FSDP writes sharded)."""
    folder = run / "checkpoints" / f"step_{step:07d}"
    if ckpt_io.is_sharded(folder):
        return ckpt_io.read_sharded_weights(folder, name)
    return load_file(str(folder / f"{name}.safetensors"))


def _assert_same_run(a: Path, b: Path, step: int) -> None:
    for name in ("model", "ema"):
        wa, wb = _weights(a, step, name), _weights(b, step, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=2e-6, msg=f"{name} {k}")
    la = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (b / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra["images_seen"] == rb["images_seen"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


MASKED = {"keep_ratio": 0.5, "ratio_distribution": "beta"}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_of_b_images_train_the_model_one_process_trains_with_2b(tmp_path, parallel):
    """Packed streams of different lengths per rank and per-image Beta mask ratios: the draws (labels, t,
    noise) and masks each image gets do not depend on which rank holds it."""
    one = _train(tmp_path, "one", 0, "none", mask=MASKED)
    two = _train(tmp_path, "two", 2, parallel, mask=MASKED)
    _assert_same_run(one, two, 4)
    # FSDP writes every rank's shards (train.checkpoint_format "auto"), DDP rank 0's one-process files
    assert ckpt_io.is_sharded(two / "checkpoints" / "step_0000004") == (parallel == "fsdp")
    assert (two / "log.jsonl").read_text().count("\n") == 2  # steps 2 and 4, written by rank 0 alone


def test_a_two_rank_run_resumes_on_one_rank_and_a_one_rank_run_on_two(tmp_path):
    straight = _train(tmp_path, "straight", 0, "none", train={"steps": 6})
    down = _train(tmp_path, "down", 2, "ddp", train={"steps": 6}, extra=["--set", "train.steps=2"])
    _train(tmp_path, "down", 1, "ddp", train={"steps": 6})  # torchrun on one rank picks up step 2
    _assert_same_run(straight, down, 6)
    up = _train(tmp_path, "up", 0, "none", train={"steps": 6}, extra=["--set", "train.steps=4"])
    _train(tmp_path, "up", 2, "fsdp", train={"steps": 6})  # FSDP loads the single-process checkpoint
    _assert_same_run(straight, up, 6)


def test_sharded_fsdp_checkpoints_reshard_two_to_one_to_two_ranks_and_load_in_one_process(tmp_path):
    """FSDP's sharded checkpoints (torch.distributed.checkpoint): 2 ranks write, 1 rank resumes (resharded),
    2 ranks resume that one's shards, and the whole is the uninterrupted one-process run; a plain process
    (no process group) samples from the shards."""
    straight = _train(tmp_path, "straight", 0, "none", train={"steps": 6})
    run = _train(tmp_path, "run", 2, "fsdp", train={"steps": 6}, extra=["--set", "train.steps=2"])
    _train(tmp_path, "run", 1, "fsdp", train={"steps": 6}, extra=["--set", "train.steps=4"])
    _train(tmp_path, "run", 2, "fsdp", train={"steps": 6})
    for step in (2, 4, 6):
        assert ckpt_io.is_sharded(run / "checkpoints" / f"step_{step:07d}")
        assert not (run / "checkpoints" / f"step_{step:07d}" / "model.safetensors").exists()
    _assert_same_run(straight, run, 6)
    from maskfit.runs import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(run)
    for k, v in _weights(straight, 6, "ema").items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=2e-6)


def test_a_two_rank_fsdp_run_stopped_by_sigterm_resumes_on_one_process(tmp_path):
    """Killed as a scheduler preempts a job (SIGTERM to torchrun and its ranks, whole process group): the
    ranks agree on one step, write its shards and exit; a plain process (no torchrun) resumes from them and
    ends where an uninterrupted one-process run ends."""
    import signal
    import time

    raw = json.loads(json.dumps(BASE))
    raw["train"].update(out_dir=str(tmp_path / "killed"), parallel="fsdp", steps=10**6, log_every=1,
                        ckpt_every=10**6)
    config = tmp_path / "killed.json"
    config.write_text(json.dumps(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "-m", "maskfit.cli", "train", str(config), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log, t0 = tmp_path / "killed" / "log.jsonl", time.time()
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        if proc.poll() is not None or time.time() - t0 > 120:
            proc.kill()
            raise AssertionError(f"training did not start: {proc.communicate()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    latest = ckpt_io.latest_checkpoint(tmp_path / "killed")
    assert latest is not None and ckpt_io.is_sharded(latest), err[-3000:]
    stopped = ckpt_io.load_state(latest)["step"]
    assert f"stopped by SIGTERM at step {stopped}" in err, err[-3000:]
    final = stopped + 2
    _train(tmp_path, "killed", 0, "none", train={"steps": final, "log_every": 1, "ckpt_every": 10**6})
    straight = _train(tmp_path, "straight", 0, "none", train={"steps": final, "log_every": 1, "ckpt_every": 10**6})
    _assert_same_run(straight, tmp_path / "killed", final)


def test_two_ranks_with_token_batching_take_alternate_bins_of_one_stream():
    """Token batching: each rank packs its own tokens_per_step; rank r trains on bin r, r + 2, ... of the
    stream one process would plan (disjoint shares, same stream for any world size, same state)."""
    grids = [(2 + i % 3, 3 + i % 2) for i in range(40)]
    one = TokenBudgetSampler(grids, 24, seed=1)
    ranks = [TokenBudgetSampler(grids, 24, seed=1, rank=r, world_size=2) for r in range(2)]
    stream = [one.next_bin() for _ in range(12)]
    for step in range(6):
        plans = [s.next_bin() for s in ranks]
        assert [p.indices for p in plans] == [stream[2 * step].indices, stream[2 * step + 1].indices]
        assert all(p.step == step for p in plans)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    assert ranks[0].state_dict()["cursor"] == one.state_dict()["cursor"]


def test_two_ranks_train_with_token_batching_and_resume_on_one(tmp_path):
    """What is equal with token batching: the image stream, its position and the images seen (a 2-rank
    step trains two of one process's bins); a 2-rank run resumed on 1 rank continues that stream."""
    tokens = {"batching": "tokens", "tokens_per_step": 64}
    one = _train(tmp_path, "one", 0, "none", data=tokens, train={"batch_size": None, "steps": 6})
    two = _train(tmp_path, "two", 2, "ddp", data=tokens, train={"batch_size": None, "steps": 2})
    _train(tmp_path, "two", 1, "ddp", data=tokens, train={"batch_size": None, "steps": 4})  # 2 more bins
    seen = lambda run: {r["step"]: r["images_seen"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}
    assert seen(two)[2] == seen(one)[4] and seen(two)[4] == seen(one)[6]  # 2 x 2 + 2 bins = 6 bins
    state = lambda run, step: torch.load(run / "checkpoints" / f"step_{step:07d}" / "state.pt", weights_only=True)["data"]
    a, b = state(two, 4), state(one, 6)
    assert (a["epoch"], a["cursor"], a["pending"]) == (b["epoch"], b["cursor"], b["pending"])


def test_ddp_wrapper_takes_the_configured_bucket_size(tmp_path):
    """train.ddp_bucket_mb reaches DDP (100 MB by default, not PyTorch's 25: config.py says why); 0 is refused."""
    import torch.distributed as dist

    from maskfit.config import TrainConfig
    from maskfit.distributed import Parallel, parallelize

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(4, 4)
        ddp = parallelize(layer, Parallel(mode="ddp"), torch.device("cpu"), bf16=False,
                          ddp_bucket_mb=TrainConfig().ddp_bucket_mb)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        assert ddp.bucket_bytes_cap == 100 * 1024 * 1024
        assert parallelize(torch.nn.Linear(4, 4), Parallel(mode="ddp"), torch.device("cpu"), bf16=False,
                           ddp_bucket_mb=7).bucket_bytes_cap == 7 * 1024 * 1024
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match=r"train.ddp_bucket_mb=0 must be a size in MB >= 1"):
        TrainConfig(ddp_bucket_mb=0)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("design", ["decoder", "side_interp"])
def test_two_ranks_train_a_full_grid_design_through_its_unmasked_fine_tune(tmp_path, design, parallel):
    """DDP refuses a step where a parameter got no gradient: the decoder design once carried an unused backbone final
    layer, and an unmasked fine-tune step leaves the mask token (and MDT's side-interpolator) out of the graph.
    FSDP2 shards those modules with the root: it must run through both phases too."""
    mask = {"keep_ratio": 0.5, "design": design, "final_unmasked_steps": 2, "decoder_hidden": 32, "decoder_heads": 2,
            "side_decode_depth": 1}
    run = _train(tmp_path, design, 2, parallel, mask=mask, train={"steps": 4})
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["loss"]) for r in rows)
